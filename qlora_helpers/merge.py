"""Merging a LoRA adapter trained on a 4-bit base, and what each way of merging does to the numbers.

What it teaches (notebook ``05_merge_and_export``):

1. Three ways to serve a QLoRA adapter: (a) keep it beside the 4-bit base (what was trained);
   (b) merge ``W + ΔW`` into a 16/32-bit copy of the base, either the *dequantized* 4-bit weights
   (:func:`merge_to_fp`) or the original full-precision weights (:func:`merge_into_base`);
   (c) merge into the 4-bit weights (PEFT's ``merge_and_unload`` on ``Linear4bit``), which
   re-quantizes ``dequant(Q(W)) + ΔW`` to NF4 (:func:`merge_into_4bit`).
   :func:`compare_outputs` measures each against (a): max |logit diff|, KL, greedy agreement.
2. Why (b) with the original weights is not (a): the adapter was trained on top of
   ``dequant(Q(W))``, quantization error included (:func:`quantization_vs_update`).
3. Export: a merged model is a plain transformers checkpoint (:func:`save_merged`).
4. A trap (``TROUBLESHOOTING.md``, "The CPU repack"; the mechanism and the kit's defence are
   :mod:`qlora_helpers.cpu_layout`). On a CPU with AVX512-BF16, bitsandbytes rewrites a 4-bit
   weight into a kernel layout at its first eval-mode forward, and ``dequantize_4bit(weight.data,
   quant_state)`` then reads the codes in the wrong order, so a merge after an evaluation is
   silently wrong. Every model ``load_model`` returns has the repack switched off; on top of that,
   :func:`dequantize_weight` never trusts ``weight.data``: a repacked weight is converted back on
   a *copy* with bitsandbytes' own inverse, and :func:`merge_into_4bit` restores the layout in
   place before PEFT's merge, so a model that did not come through ``load_model`` merges right too.
   Note (bf16 absmax): the repack rounds the absmax to bf16 and the inverse re-quantizes it to
   8 bits; that precision is gone, so a merge after a real repack equals a fresh merge only to
   ~1e-3 relative (``tests/test_merge.py`` states the bound), not bit for bit.
5. Adapters that do not fit the base fail early and by name (:func:`check_adapter_matches`).

Papers: QLoRA, Dettmers et al. 2023, arXiv:2305.14314; LoRA, Hu et al. 2021, arXiv:2106.09685.

Production code it is checked against (peft 0.21.2, bitsandbytes 0.50.2): ``PeftModel.
merge_and_unload`` (``peft.tuners.lora.bnb.Linear4bit.merge``), ``bitsandbytes.functional.
dequantize_4bit``; and, independently of bitsandbytes' layout, the kit's own NF4 +
double quantization (:mod:`qlora_helpers.nf4`, :mod:`qlora_helpers.double_quant`).
"""
from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cpu_layout import (  # noqa: F401  (re-exported: notebook 05 teaches the trap with them)
    is_4bit, is_repacked, keep_standard_layout, linear4bit_modules, restore_standard_layout,
    simulate_cpu_repack, standard_layout)
from .evaluation import logits_and_mask  # noqa: F401  (re-exported: notebook 05 compares logits with it)

ADAPTER_NAME = "date-r16-all-linear"  # the kit's task adapter, saved under $QLORA_KIT_CACHE/adapters
TRAIN_RECIPE = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lr": 3e-3, "batch_size": 16}


class AdapterMismatchError(ValueError):
    """The adapter was trained on a different base (model type, layer names or shapes)."""


# ---------------------------------------------------------------------------------------------
# 1. The adapter to merge: trained once on the 4-bit base, cached as safetensors
# ---------------------------------------------------------------------------------------------
def adapter_dir(name: str = ADAPTER_NAME) -> Path:
    """``$QLORA_KIT_CACHE/adapters/<name>`` (the folder may not exist yet)."""
    from .offline import cache_root
    return cache_root() / "adapters" / name


def train_adapter(model, tok, rows, steps: int, lr: float = TRAIN_RECIPE["lr"],
                  batch_size: int = TRAIN_RECIPE["batch_size"], seed: int = 0) -> list[float]:
    """AdamW on the trainable (LoRA) weights over chat rows, with the kit's plain loop
    (:func:`qlora_helpers.sft.train_loop`: 10 warm-up steps, then constant ``lr``, grad norm 0.3).

    Args:
        model: a ``PeftModel`` (only its LoRA weights require grad). tok: its tokenizer.
        rows: a ``datasets.Dataset`` with ``messages``. steps: optimizer steps.
        lr, batch_size, seed: the recipe; ``seed`` fixes the batch order.
    Returns:
        The loss of every step. The model is left in eval mode.
    """
    from .sft import train_loop
    from .sft_data import shuffled_batches, tokenize_dataset
    batches = shuffled_batches(tokenize_dataset(rows, tok), tok, steps, seed, batch_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = train_loop(model, opt, batches, lr)["losses"]
    opt.zero_grad(set_to_none=True)
    model.eval()
    return losses


# Notebook 04 saves the adapter it trained under this name; notebook 05 merges it (and trains a
# stand-in with :func:`train_adapter` only when 05 runs before 04 has).
NB04_ADAPTER = "date-r16-all-linear-04"


def task_adapter(profile, steps: int = 300, name: str | None = None, retrain: bool = False):
    """The date-task adapter (LoRA r=16 on all linear layers) on the profile's 4-bit base.

    Loads ``$QLORA_KIT_CACHE/adapters/<name>`` if it is there, else trains it with
    :func:`train_adapter` (the offline profile: ~1 min on one CPU core) and saves it
    (``adapter_model.safetensors`` + ``adapter_config.json``).

    Args:
        profile: a :class:`qlora_helpers.runtime.Profile`. steps: optimizer steps if training.
        name: cache folder name (default: ``date-r16-all-linear-<steps>``). retrain: ignore the cache.
    Returns:
        ``(peft_model, info)``: the model in eval mode (its base loaded by ``load_model``, so the
        CPU repack is switched off), and ``{"path", "trained", "losses"}``.
    """
    from .runtime import load_model, load_task_dataset, load_tokenizer
    from .sft import lora_config
    path = adapter_dir(name or f"{ADAPTER_NAME}-{steps}")
    base = load_model(profile)  # 4-bit, CPU repack switched off (qlora_helpers.cpu_layout)
    if (path / "adapter_config.json").exists() and not retrain:
        return load_adapter(base, path), {"path": path, "trained": False, "losses": []}
    from peft import get_peft_model
    torch.manual_seed(0)
    cfg = lora_config(r=TRAIN_RECIPE["r"], lora_alpha=TRAIN_RECIPE["lora_alpha"],
                      lora_dropout=TRAIN_RECIPE["lora_dropout"])
    model = get_peft_model(base, cfg)  # 4-bit base frozen, A and B trainable (fp32)
    losses = train_adapter(model, load_tokenizer(profile), load_task_dataset(profile)["train"], steps)
    save_adapter(model, path)  # safetensors by default
    return model, {"path": path, "trained": True, "losses": losses}


# ---------------------------------------------------------------------------------------------
# 2. Reading a 4-bit weight safely (the CPU repack: qlora_helpers.cpu_layout)
# ---------------------------------------------------------------------------------------------
def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """``dequant(Q(W))`` of a ``Linear4bit``, fp32 (out, in), whatever layout it is in now."""
    from bitsandbytes.functional import dequantize_4bit
    packed, state = standard_layout(module)
    return dequantize_4bit(packed, state).float()  # (out, in)


def kit_dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The same as :func:`dequantize_weight`, through the kit's own NF4 and double quantization
    (:mod:`qlora_helpers.nf4`, :mod:`qlora_helpers.double_quant`): an independent check."""
    from . import double_quant, nf4
    packed, s = standard_layout(module)
    if s.quant_type != "nf4":
        raise ValueError(f"kit_dequantize_weight handles NF4 only, got {s.quant_type!r}")
    if s.nested:
        dq = double_quant.DoubleQuantState(s.absmax, s.state2.absmax, s.state2.code, s.offset,
                                           s.state2.blocksize)
        absmax = double_quant.dequantize_absmax(dq)  # (n_blocks,)
    else:
        absmax = s.absmax.float()
    return nf4.dequantize_nf4(packed.view(torch.uint8), absmax, tuple(s.shape), s.blocksize)


# ---------------------------------------------------------------------------------------------
# 3. Does the adapter fit the base? (checked before anything is loaded or written)
# ---------------------------------------------------------------------------------------------
BASE_INFO_FILE = "kit_base.json"  # written beside an adapter by save_adapter: what it was trained on


def base_info(model: nn.Module) -> dict:
    """The facts about a base model an adapter depends on: model type and layer sizes."""
    c = model.config
    return {"model_type": c.model_type, "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_hidden_layers, "vocab_size": c.vocab_size}


def save_adapter(model, path: str | Path) -> Path:
    """``save_pretrained`` (adapter_model.safetensors + adapter_config.json) plus ``kit_base.json``."""
    path = Path(path)
    model.save_pretrained(path)
    (path / BASE_INFO_FILE).write_text(json.dumps(base_info(model.get_base_model()), indent=1))
    return path


def _lora_tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open
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
    from peft import PeftModel
    check_adapter_matches(base, path)
    return PeftModel.from_pretrained(base, str(path)).eval()


# ---------------------------------------------------------------------------------------------
# 4. Three ways to merge
# ---------------------------------------------------------------------------------------------
def _lora_delta(layer) -> torch.Tensor:
    """ΔW = scaling * B @ A of a PEFT LoRA layer's active adapter, fp32 (out, in)."""
    if layer.merged:
        raise ValueError("the adapter is already merged into this layer; unmerge it first "
                         "(model.unmerge_adapter()) or merge from a freshly loaded model")
    return layer.get_delta_weight(layer.active_adapters[0]).float()  # (out, in)


def _merged_weight(module: nn.Module) -> torch.Tensor | None:
    """W + ΔW (a LoRA layer), dequant(W) (a 4-bit layer), or None (anything else)."""
    from peft.tuners.lora import LoraLayer
    if isinstance(module, LoraLayer):
        inner = module.get_base_layer()
        return _base_weight(inner) + _lora_delta(module)  # (out, in)
    return _base_weight(module) if is_4bit(module) else None


def _base_weight(module: nn.Module) -> torch.Tensor:
    if is_4bit(module):
        return dequantize_weight(module)  # safe whatever the layout (cpu_layout)
    return module.weight.detach().float()


def merge_to_fp(model, dtype: torch.dtype = torch.float32):
    """Merge a LoRA adapter on a 4-bit base into the *dequantized* base: (b).

    Every weight is written into a fresh plain transformers model: ``dequant(Q(W)) + ΔW`` for
    LoRA layers, ``dequant(Q(W))`` for other 4-bit layers, the rest copied. The input is not
    changed, and the result does not depend on bitsandbytes' CPU layout (:mod:`qlora_helpers.cpu_layout`).

    Args:
        model: a ``PeftModel`` (one active LoRA adapter, not merged) on a 4-bit base.
        dtype: the merged model's dtype (fp32 here; bf16/fp16 for a GPU export).
    Returns:
        A ``transformers`` model without PEFT or bitsandbytes layers, in eval mode.
    """
    from transformers import AutoModelForCausalLM
    base = model.get_base_model()
    config = copy.deepcopy(base.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {}
    for key, ref in plain.state_dict().items():
        mod_name, _, leaf = key.rpartition(".")
        module = base.get_submodule(mod_name)
        merged = _merged_weight(module) if leaf == "weight" else None
        state[key] = merged if merged is not None else _plain_param(module, leaf)
    plain.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return plain.eval()


def _plain_param(module: nn.Module, leaf: str) -> torch.Tensor:
    from peft.tuners.lora import LoraLayer
    if isinstance(module, LoraLayer):
        module = module.get_base_layer()
    return getattr(module, leaf).detach().float()


def merge_into_base(fp_model, path: str | Path):
    """Merge the adapter in ``path`` into full-precision base weights, PEFT's way: (b) original.

    Returns:
        ``PeftModel.from_pretrained(fp_model, path).merge_and_unload()``: a plain model.
    """
    return load_adapter(fp_model, path).merge_and_unload().eval()


def merge_into_4bit(model):
    """PEFT's ``merge_and_unload`` on a 4-bit base: (c).

    Note: merging into NF4 re-quantizes: each layer becomes ``Q(dequant(Q(W)) + ΔW)``, so the
    update is rounded to the NF4 grid (``TROUBLESHOOTING.md``, "Merging into 4-bit"). PEFT reads ``weight.data`` with
    ``dequantize_4bit``, which is wrong after a CPU repack (:mod:`qlora_helpers.cpu_layout`): the layout is restored first.
    In place on ``model``; returns the unloaded 4-bit transformers model.
    """
    restore_standard_layout(model)
    merged = model.merge_and_unload()
    return keep_standard_layout(merged).eval()


# ---------------------------------------------------------------------------------------------
# 5. Measuring the difference
# ---------------------------------------------------------------------------------------------
def conversation_texts(tok, rows) -> list[str]:
    """Each row's full conversation (prompt and answer) in the chat template: the logits to compare."""
    return [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]


def logit_gap(ref: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Max |logit difference| and mean KL(ref || other) per token over the real (unmasked) positions.

    Args:
        ref, other: logits (batch, seq, vocab). mask: bool (batch, seq), True on real tokens.
    Returns:
        ``{"max_abs_logit_diff", "kl"}`` (KL in nats per token).
    """
    a, b = ref[mask], other[mask]  # (tokens, vocab)
    kl = F.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    kl_mean = max(kl.mean().item(), 0.0)  # KL >= 0; float rounding can give -1e-9 for equal models
    return {"max_abs_logit_diff": (a - b).abs().max().item(), "kl": kl_mean}


def agreement(answers: list[str], reference: list[str]) -> float:
    """Share of greedy answers identical to the reference answers.

    >>> agreement(["17/03/2024", "01/01/2000"], ["17/03/2024", "02/01/2000"])
    0.5
    """
    if len(answers) != len(reference) or not answers:
        raise ValueError(f"need two equally long, non-empty answer lists, got {len(answers)} and {len(reference)}")
    return sum(a == b for a, b in zip(answers, reference)) / len(answers)


def quantization_vs_update(model, fp_model) -> list[dict]:
    """Per LoRA layer: size of the quantization error ``W - dequant(Q(W))`` and of the update ΔW.

    Args:
        model: the ``PeftModel`` on the 4-bit base. fp_model: the same base in full precision.
    Returns:
        One dict per layer: ``name``, ``quant_err`` and ``delta`` (Frobenius norms), and ``max_quant_err``, ``max_delta``.
    """
    from peft.tuners.lora import LoraLayer
    rows = []
    for name, m in model.get_base_model().named_modules():
        if isinstance(m, LoraLayer):
            w = fp_model.get_submodule(name).weight.detach().float()  # (out, in)
            err, delta = w - dequantize_weight(m.get_base_layer()), _lora_delta(m)
            rows.append({"name": name, "quant_err": err.norm().item(), "delta": delta.norm().item(),
                         "max_quant_err": err.abs().max().item(), "max_delta": delta.abs().max().item()})
    return rows


# ---------------------------------------------------------------------------------------------
# 6. Export
# ---------------------------------------------------------------------------------------------
def folder_bytes(path: str | Path) -> int:
    """Total size of the files in ``path`` (recursively), in bytes."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def save_merged(model, tok, path: str | Path) -> Path:
    """``save_pretrained`` of a merged plain model (safetensors) and its tokenizer into ``path``."""
    from peft import PeftModel
    if isinstance(model, PeftModel) or linear4bit_modules(model):
        raise ValueError("save_merged expects a plain merged model (merge_to_fp / merge_into_base); "
                         "to save an adapter use save_adapter")
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------
# 7. Exercise checkers (notebook 05, "Exercises")
# ---------------------------------------------------------------------------------------------
def check_merged_layer(merged_weight_fn, model) -> bool:
    """``merged_weight_fn(lora_layer) -> (out, in) tensor``: W + ΔW of one PEFT LoRA layer on a
    4-bit base, by hand (dequantize, then add ``scaling * B @ A``). Checked on every layer."""
    from peft.tuners.lora import LoraLayer
    layers = [m for m in model.get_base_model().modules() if isinstance(m, LoraLayer)]
    got = merged_weight_fn(layers[0])
    if got is None:
        print("Exercise 1: not attempted yet (the function returned None).")
        return False
    for layer in layers:
        want = _merged_weight(layer)
        got = merged_weight_fn(layer)
        assert tuple(got.shape) == tuple(want.shape), f"want shape (out, in) = {tuple(want.shape)}, got {tuple(got.shape)}"
        assert torch.allclose(got.float(), want, atol=1e-5), (
            "wrong merged weight: dequantize the 4-bit base (read it safely, see dequantize_weight), "
            "then add scaling * lora_B @ lora_A")
    print(f"Exercise 1: correct on all {len(layers)} LoRA layers.")
    return True


def check_adapter_bytes(answer, config, r: int = 16) -> bool:
    """Bytes of the fp32 LoRA tensors of an all-linear rank-``r`` adapter on ``config``'s model."""
    from .exercises import attempted
    from .lora import llama_lora_param_count
    if not attempted(answer, "Exercise 2"):
        return False
    want = 4 * llama_lora_param_count(config, r)  # fp32: 4 bytes per A or B entry
    assert int(answer) == want, (f"{answer} bytes: count r * (in + out) per targeted layer (7 per "
                                 f"decoder layer), times the layers, times 4 bytes (fp32)")
    print(f"Exercise 2: correct, {want:,} bytes of LoRA weights (the file adds a small JSON header).")
    return True
