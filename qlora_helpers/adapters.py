"""Adapters as files: save, load, and check that an adapter fits a base before anything is loaded.

What it teaches (notebook ``04_qlora_sft``, saving; ``05_merge_and_export``, loading and checking):
a QLoRA run's product is a small adapter, saved with PEFT's ``save_pretrained`` as
``adapter_model.safetensors`` + ``adapter_config.json``, plus ``kit_base.json`` (what base it was
trained on) and, when a recipe made it, ``kit_recipe.json`` (that recipe and its fingerprint). Loading it
onto the wrong base fails early and by name (:class:`AdapterMismatchError`: the model type, a layer the
base lacks, or a shape that does not fit), not deep inside PEFT. Trained adapters live in the kit's cache,
``$QLORA_KIT_CACHE/adapters/<name>`` (:func:`adapter_dir`); a cached one is reused only for the recipe that
trained it (:func:`recipe_fingerprint`, :func:`task_adapter`). The task adapter itself is trained here too
(:func:`task_adapter`, :func:`nb04_adapter`: notebook 05 merges what notebook 04 trained, or a stand-in).

Production code it is checked against: peft 0.21.2 ``PeftModel.save_pretrained`` /
``from_pretrained``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from peft import PeftModel, get_peft_model
from safetensors import safe_open

from .core.offline import cache_root
from .core.recipe import KIT_LOOP, Recipe, recipe_for
from .core.runtime import load_model, load_task_dataset, load_tokenizer
from .core.training import build_optimizer, train_loop
from .sft_data import shuffled_batches, tokenize_dataset

ADAPTER_NAME = "date-task"  # the kit's task adapters: $QLORA_KIT_CACHE/adapters/date-task-<recipe fingerprint>


# Notebook 04 saves the adapter it trained under this name; notebook 05 merges it.
NB04_ADAPTER = f"{ADAPTER_NAME}-04"   # kit_recipe.json beside it says which recipe trained it


class AdapterMismatchError(ValueError):
    """The adapter was trained on a different base (model type, layer names or shapes)."""


# ---------------------------------------------------------------------------------------------
# 1. Where adapters live
# ---------------------------------------------------------------------------------------------
def adapter_dir(name: str = ADAPTER_NAME) -> Path:
    """``$QLORA_KIT_CACHE/adapters/<name>`` (the folder may not exist yet)."""
    return cache_root() / "adapters" / name


# ---------------------------------------------------------------------------------------------
# 2. Does the adapter fit the base? (checked before anything is loaded or written)
# ---------------------------------------------------------------------------------------------
BASE_INFO_FILE = "kit_base.json"  # written beside an adapter by save_adapter: what it was trained on
RECIPE_FILE = "kit_recipe.json"   # written beside it when a recipe made it: the recipe and its fingerprint


def base_info(model: nn.Module) -> dict:
    """The facts about a base model an adapter depends on: model type and layer sizes."""
    c = model.config
    return {"model_type": c.model_type, "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_hidden_layers, "vocab_size": c.vocab_size}


def save_adapter(model, path: str | Path, recipe=None) -> Path:
    """``save_pretrained`` (adapter_model.safetensors + adapter_config.json) plus ``kit_base.json``, and
    ``kit_recipe.json`` when ``recipe`` (a :class:`qlora_helpers.core.recipe.Recipe`) trained it."""
    path = Path(path)
    model.save_pretrained(path)
    (path / BASE_INFO_FILE).write_text(json.dumps(base_info(model.get_base_model()), indent=1))
    (path / RECIPE_FILE).unlink(missing_ok=True)     # an older adapter's recipe must not stay behind
    if recipe is not None:
        (path / RECIPE_FILE).write_text(json.dumps({"fingerprint": recipe.fingerprint(), "recipe": recipe.as_dict()},
                                                   indent=1))
    return path


def recipe_fingerprint(path: str | Path) -> str | None:
    """The fingerprint of the recipe that trained the adapter in ``path``, or None if none was recorded."""
    f = Path(path) / RECIPE_FILE
    return json.loads(f.read_text())["fingerprint"] if f.exists() else None


def _lora_tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _target_module(key: str) -> tuple[str, str]:
    """(module name, "lora_A" or "lora_B") of an adapter tensor's key.

    >>> _target_module("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight")
    ('model.layers.0.mlp.up_proj', 'lora_A')
    """
    name, kind, _ = key.rsplit(".", 2)
    return name.removeprefix("base_model.model."), kind


def check_adapter_matches(model: nn.Module, path: str | Path) -> None:
    """Raise :class:`AdapterMismatchError` naming the first mismatch between the adapter in
    ``path`` and the base ``model`` (model type and sizes from ``kit_base.json`` if present; every
    LoRA tensor's module must exist with ``lora_A`` (r, in) and ``lora_B`` (out, r) matching)."""
    path = Path(path)
    if not (path / "adapter_config.json").exists():
        raise AdapterMismatchError(f"{path} holds no adapter_config.json: not a PEFT adapter folder")
    r = json.loads((path / "adapter_config.json").read_text())["r"]
    if (path / BASE_INFO_FILE).exists():
        want, have = json.loads((path / BASE_INFO_FILE).read_text()), base_info(model)
        bad = {k: (want[k], have.get(k)) for k in want if want[k] != have.get(k)}
        if bad:
            raise AdapterMismatchError(f"adapter {path.name} was trained on another base: "
                                       + ", ".join(f"{k} {a!r} (adapter) != {b!r} (model)"
                                                   for k, (a, b) in bad.items()))
    modules = dict(model.named_modules())
    for key, shape in _lora_tensor_shapes(path).items():
        name, kind = _target_module(key)
        _check_lora_shape(modules.get(name), name, kind, shape, r, path.name)


def _check_lora_shape(module, name: str, kind: str, shape: tuple, r: int, adapter: str) -> None:
    if module is None:
        raise AdapterMismatchError(f"adapter {adapter} has weights for {name!r}, which the base "
                                   f"model does not have (another architecture?)")
    out_f, in_f = module.out_features, module.in_features
    want = (r, in_f) if kind == "lora_A" else (out_f, r)
    if tuple(shape) != want:
        raise AdapterMismatchError(
            f"adapter {adapter}: {name}.{kind} has shape {tuple(shape)}, but the base layer is "
            f"{in_f} -> {out_f} with r={r}, so it must be {want}: trained on another base?")


def load_adapter(base: nn.Module, path: str | Path):
    """:func:`check_adapter_matches`, then ``PeftModel.from_pretrained(base, path)``, eval mode."""
    check_adapter_matches(base, path)
    return PeftModel.from_pretrained(base, str(path)).eval()


# ---------------------------------------------------------------------------------------------
# 3. The task adapter: trained once on the 4-bit base, cached with the recipe that made it
# ---------------------------------------------------------------------------------------------
def train_adapter(model, tok, rows, recipe: Recipe = KIT_LOOP) -> list[float]:
    """AdamW on the trainable (LoRA) weights over chat rows, with the kit's plain loop
    (:func:`qlora_helpers.core.training.train_loop`: linear warm-up, then constant lr, gradients clipped).

    Args:
        model: a ``PeftModel`` (only its LoRA weights require grad). tok: its tokenizer.
        rows: a ``datasets.Dataset`` with ``messages``.
        recipe: steps, lr, warm-up, clipping, weight decay, batch size and seed (the batch order).
    Returns:
        The loss of every step. The model is left in eval mode.
    """
    batches = shuffled_batches(tokenize_dataset(rows, tok), tok, recipe.steps, recipe.seed, recipe.batch_size)
    opt = build_optimizer("adamw_torch", [p for p in model.parameters() if p.requires_grad], recipe.lr,
                          recipe.weight_decay)
    losses = train_loop(model, opt, batches, recipe.lr, recipe.warmup_steps, recipe.max_grad_norm)["losses"]
    opt.zero_grad(set_to_none=True)
    model.eval()
    return losses


def task_adapter(profile, recipe: Recipe = KIT_LOOP, name: str | None = None, retrain: bool = False,
                 also_accept: tuple[Recipe, ...] = ()):
    """The date-task adapter (LoRA on all linear layers) on the profile's 4-bit base.

    Loads ``$QLORA_KIT_CACHE/adapters/<name>`` if it is there *and* was trained by ``recipe`` (or one of
    ``also_accept``), as its ``kit_recipe.json`` records; else trains it with :func:`train_adapter` (the
    offline profile: about a minute on one CPU core) and saves it (``adapter_model.safetensors`` +
    ``adapter_config.json`` + the recipe). So a changed recipe trains anew instead of reloading an
    adapter an older recipe made.

    Args:
        profile: a :class:`qlora_helpers.core.runtime.Profile`. recipe: what to train if training.
        name: cache folder name (default: ``date-task-<the recipe's fingerprint>``). retrain: ignore the cache.
        also_accept: other recipes whose adapter may be loaded under ``name`` (notebook 05 takes the one
            notebook 04 trained with its recipe, else trains a stand-in with ``recipe``).
    Returns:
        ``(peft_model, info)``: the model in eval mode (its base loaded by ``load_model``, so the
        CPU repack is switched off), and ``{"path", "trained", "losses"}``.
    """
    path = adapter_dir(name or f"{ADAPTER_NAME}-{recipe.fingerprint()}")
    base = load_model(profile)  # 4-bit, CPU repack switched off (qlora_helpers.core.cpu_layout)
    wanted = {r.fingerprint() for r in (recipe, *also_accept)}
    if (path / "adapter_config.json").exists() and not retrain:
        if recipe_fingerprint(path) in wanted:
            return load_adapter(base, path), {"path": path, "trained": False, "losses": []}
        print(f"{path.name}: the cached adapter was trained by another recipe (or records none); training anew")
    torch.manual_seed(recipe.seed)  # lora_A's random init
    model = get_peft_model(base, recipe.lora_config())  # 4-bit base frozen, A and B trainable (fp32)
    losses = train_adapter(model, load_tokenizer(profile), load_task_dataset(profile)["train"], recipe)
    save_adapter(model, path, recipe)  # safetensors by default
    return model, {"path": path, "trained": True, "losses": losses}


def nb04_adapter(profile, retrain: bool = False):
    """Notebook 04's adapter, if it is cached and was trained by notebook 04's recipe as it is now
    (:func:`qlora_helpers.core.recipe.recipe_for`); else a stand-in trained under the same name with
    :data:`KIT_LOOP`, so that notebook 05 also runs on its own. :func:`task_adapter`'s return."""
    return task_adapter(profile, KIT_LOOP, NB04_ADAPTER, retrain, also_accept=(recipe_for(profile),))
