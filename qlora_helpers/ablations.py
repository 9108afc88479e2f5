"""Ablations: which LoRA/QLoRA recipe claims hold on one task, one budget, one seed set?

What it teaches (notebook ``06_ablations``): every variant trains the same 4-bit base on the same
batches in the same order for the same number of steps, and is measured the same way (final exact
match, final training and held-out loss, trainable parameters, memory, wall time). Seeds are
repeated for the main comparison, so a difference is only called real when it is larger than the
spread between seeds.

The claims and the papers they come from:

* rank r in {4, 8, 16, 32, 64}, scale ``alpha / r`` (LoRA, Hu et al., arXiv 2106.09685) versus
  ``alpha / sqrt(r)`` (rsLoRA, Kalajdzievski, arXiv 2312.03732: with ``alpha / r`` the update
  shrinks as r grows, so high ranks learn slower; ``1 / sqrt(r)`` keeps it rank-stable);
* targets: q,v only (the LoRA paper's choice) / all attention / all linear layers (QLoRA, Dettmers
  et al., arXiv 2305.14314, section 4: all layers are needed to match full fine-tuning);
* initialization: B = 0 on NF4(W) versus LoftQ (Li et al., arXiv 2310.08659), see
  :mod:`qlora_helpers.loftq`;
* optimizer: AdamW versus LoRA-FA (Zhang et al., arXiv 2308.03303: A frozen at its random init,
  only B trained, so the layer input need not be stored for A's gradient);
* DoRA (Liu et al., arXiv 2402.09353): magnitude and direction trained apart.

Production code used and checked against: PEFT 0.21.2 (``LoraConfig(use_rslora=..., use_dora=...)``,
``peft.optimizers.create_lorafa_optimizer``), the kit's training building blocks
(:func:`qlora_helpers.sft.lora_config`, :func:`~qlora_helpers.core.qlora_model.prepare_qlora_model`,
:func:`qlora_helpers.sft_data.tokenize_dataset`, :func:`~qlora_helpers.core.chat_data.padded_collator`),
and :func:`qlora_helpers.core.evaluation.exact_match`. The loop is :func:`qlora_helpers.core.training.train_loop`,
plain PyTorch (linear warm-up then constant learning rate, max grad norm 0.3 as in
:func:`qlora_helpers.sft.training_arguments`), because LoRA-FA needs its own optimizer object and
the memory probe needs the forward pass.

Memory on the CPU is counted, not sampled: ``state_bytes`` = bytes of trainable parameters +
their gradients + optimizer state (exact, from the tensors); ``activation_bytes`` = bytes of the
tensors autograd saves for backward in one training step (:class:`qlora_helpers.core.training.
saved_tensor_bytes`, each storage counted once, gradient checkpointing off so that what each
layer keeps is visible). The frozen 4-bit base is the same for all variants and is not counted.

This module is the runner (data, model, optimizer, one variant, a grid), the results files and the
command line. What to run is :mod:`qlora_helpers.ablation_plan`, statistics over seeds
:mod:`qlora_helpers.seed_stats`, the figures :mod:`qlora_helpers.ablation_plots` (notebook 06 imports each from its module).

Run the full grid: ``python -m qlora_helpers.ablations --full`` (writes build/ablations_full.json
and figures/06_full_*.png; ``--only`` runs a shard, ``--combine`` joins shards). The kit commits
one full-grid result, :data:`FULL_RESULTS`, which notebook 06 reads; the notebook itself trains a
reduced grid unless ``QLORA_KIT_FULL_GRID=1``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import bitsandbytes
import peft
import torch
import transformers
from peft.optimizers import create_lorafa_optimizer
from peft.optimizers import lorafa as peft_lorafa
from peft.optimizers.lorafa import LoraFAOptimizer

from . import sft_data
from .ablation_plan import CURVES, grid, lora_config_for, lorafa_parts, rslora_own_lr, variant_recipe

# Statistics over seeds, the grid's figures and the plan (baseline, variants, grids) live in modules of
# their own; notebook 06 imports them from there.
from .ablation_plots import plot_curves, plot_rank, plot_spread
from .core.artifacts import sha256_file
from .core.chat_data import padded_collator
from .core.evaluation import exact_match
from .core.figures import save_figure
from .core.qlora_model import prepare_qlora_model
from .core.runtime import get_profile, load_model, load_task_dataset, load_tokenizer, use_threads
from .core.training import build_optimizer, model_loss, on_model_device, train_loop
from .loftq import apply_loftq
from .measured_memory import optimizer_bytes
from .seed_stats import results_table

FULL_GRID_ENV = "QLORA_KIT_FULL_GRID"
# The full grid as the kit measured it (``--full``, two shards ``--combine``d); notebook 06 reads it.
FULL_RESULTS = Path(__file__).parent / "results" / "ablations_full.json"
# LoRA-FA taken apart (ablation_plan.lorafa_parts), the full grid's steps, seeds and test rows:
# python -m qlora_helpers.ablations --full --only freeze-a,lorafa-fp32 --out qlora_helpers/results/lorafa_parts.json
LORAFA_PARTS_RESULTS = Path(__file__).parent / "results" / "lorafa_parts.json"
# rsLoRA at r = 64 with the learning rate divided by 8 (ablation_plan.rslora_own_lr; notebook 06, exercise 4):
# python -m qlora_helpers.ablations --full --only r64-rs-lr8 --out qlora_helpers/results/rslora_own_lr.json
RSLORA_LR_RESULTS = Path(__file__).parent / "results" / "rslora_own_lr.json"
# ----------------------------------------------------------------------------------------------
# Data: the same batches, in a seed-determined order, for every variant
# ----------------------------------------------------------------------------------------------
@dataclass
class TaskData:
    tok: object
    train: object          # tokenized datasets.Dataset (input_ids, labels)
    test_rows: list        # dicts with prompt / answer / messages
    eval_batches: list     # padded batches of test rows, for the held-out loss
    fp_model: object       # the full-precision base (LoftQ's W, the initial-error reference)


def heldout_batches(test, tok, batch_size: int = 16) -> list[dict]:
    """The held-out rows (a ``datasets.Dataset`` of chat rows) tokenized and padded in batches of ``batch_size``,
    in order: what :func:`heldout_loss` averages over."""
    eval_tok = sft_data.tokenize_dataset(test, tok)
    collate = padded_collator(tok, None)
    return [collate([eval_tok[j] for j in range(i, min(i + batch_size, len(test)))])
            for i in range(0, len(test), batch_size)]


def load_task(profile, n_test: int = 200, batch_size: int = 16) -> TaskData:
    """Tokenizer, tokenized train split, ``n_test`` test rows and their batches, fp base model."""
    tok, ds = load_tokenizer(profile), load_task_dataset(profile)
    test = ds["test"].select(range(n_test))
    return TaskData(tok, sft_data.tokenize_dataset(ds["train"], tok), list(test),
                    heldout_batches(test, tok, batch_size), load_model(profile, quantized=False).eval())


def train_batches(data: TaskData, steps: int, seed: int, batch_size: int = 16) -> list[dict]:
    """The seed's batches of the task (:func:`qlora_helpers.sft_data.shuffled_batches`)."""
    return sft_data.shuffled_batches(data.train, data.tok, steps, seed, batch_size)


# ----------------------------------------------------------------------------------------------
# Model, optimizer, measurements
# ----------------------------------------------------------------------------------------------
def build_model(profile, variant: dict, data: TaskData, seed: int):
    """A fresh NF4 base + the variant's adapter (LoftQ applied before any forward). Returns the
    PEFT model and LoftQ's per-layer error report (empty for the default init)."""
    torch.manual_seed(seed)  # lora_A's random init
    model = prepare_qlora_model(load_model(profile), lora_config_for(variant),
                                    gradient_checkpointing=False)
    report = apply_loftq(model, data.fp_model, variant["loftq_iter"]) if variant["init"] == "loftq" else {}
    return model, report


class LoraFAFp32Optimizer(LoraFAOptimizer):
    """PEFT's LoRA-FA optimizer with B's projected gradient computed in fp32. PEFT has no switch for the
    bf16 autocast it applies wherever ``accelerate`` reports bf16 (on a CPU: always), so ``step`` tells
    its module, for the step only, that there is none."""

    def step(self, closure=None):
        with mock.patch.object(peft_lorafa, "is_bf16_available", lambda: False):
            return super().step(closure)


def make_optimizer(model, variant: dict):
    """The variant's method (:data:`~qlora_helpers.ablation_plan.OPTIMIZER_VARIANTS`, as the committed results
    record it): AdamW over the trainable weights; PEFT's LoRA-FA (A frozen, B's gradient projected); A frozen
    with AdamW on B; or PEFT's LoRA-FA with the projection in fp32."""
    recipe = variant_recipe(variant)
    if variant["optimizer"] in ("lorafa", "lorafa-fp32"):
        opt = create_lorafa_optimizer(model, r=variant["r"], lora_alpha=variant["lora_alpha"], lr=variant["lr"])
        if variant["optimizer"] == "lorafa-fp32":
            opt.__class__ = LoraFAFp32Optimizer   # the same state and groups; only step differs
        return opt
    if variant["optimizer"] == "freeze-a":
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)            # as create_lorafa_optimizer does
    return build_optimizer("adamw_torch", [p for p in model.parameters() if p.requires_grad], recipe.lr,
                           recipe.weight_decay)


def state_bytes(model, optimizer) -> int:
    """Bytes of trainable parameters + their gradients + optimizer state."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    params = sum(p.numel() * p.element_size() for p in trainable)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None)
    return params + grads + optimizer_bytes(optimizer)


@torch.no_grad()
def heldout_loss(model, batches: list[dict]) -> float:
    """Mean response-token loss over held-out batches (teacher forcing)."""
    model.eval()
    total = sum(model_loss(model, b).item() for b in batches) / len(batches)
    model.train()
    return total


@torch.no_grad()
def logit_error(model, reference, batch: dict) -> float:
    """Mean |logits - reference logits| over a batch's real tokens: how far a model starts from W."""
    model.eval()
    x = on_model_device({k: batch[k] for k in ("input_ids", "attention_mask")}, model)
    a = model(**x, use_cache=False).logits.float()
    b = reference(**on_model_device(x, reference), use_cache=False).logits.float().to(a.device)
    model.train()
    return (a - b).abs()[x["attention_mask"].bool()].mean().item()


# ----------------------------------------------------------------------------------------------
# Runner
# ----------------------------------------------------------------------------------------------
def run_variant(profile, variant: dict, steps: int, seed: int, data: TaskData | None = None) -> dict:
    """Train one variant for ``steps`` steps from ``seed``; measure it.

    Args:
        profile: the runtime profile. variant: from :func:`make_variant`. steps: optimizer steps (> 0).
        seed: adapter init and batch order. data: :func:`load_task` output (loaded if None).
    Returns:
        A flat dict: name, seed, settings, ``trainable``, ``init_loss``/``init_logit_err`` (before
        training, vs the fp base), ``losses``, ``final_loss`` (mean of the last 10 steps),
        ``eval_loss``, ``exact_match``, ``state_bytes``, ``activation_bytes``, ``seconds``, ``loftq``,
        ``peak_gpu_bytes`` (``torch.cuda.max_memory_allocated`` during training; None on the CPU).
    """
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    data = data or load_task(profile)
    model, loftq_report = build_model(profile, variant, data, seed)
    init_loss = heldout_loss(model, data.eval_batches)
    init_err = logit_error(model, data.fp_model, data.eval_batches[0])
    optimizer = make_optimizer(model, variant)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # after LoRA-FA froze A
    if torch.cuda.is_available():  # on a GPU, also the allocator's peak (base and all) while training
        torch.cuda.reset_peak_memory_stats()
    recipe = variant_recipe(variant, steps)
    log = train_loop(model, optimizer, train_batches(data, steps, seed), recipe.lr,
                         recipe.warmup_steps, recipe.max_grad_norm, count_activations=True)
    em, _ = exact_match(model, data.tok, data.test_rows)
    return {**variant, "seed": seed, "steps": steps, "trainable": trainable, "init_loss": init_loss,
            "init_logit_err": init_err, "losses": log["losses"],
            "final_loss": statistics.fmean(log["losses"][-10:]), "eval_loss": heldout_loss(model, data.eval_batches),
            "exact_match": em, "state_bytes": state_bytes(model, optimizer),
            "activation_bytes": log["activation_bytes"], "seconds": log["seconds"],
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            "loftq": _loftq_summary(loftq_report)}


def _loftq_summary(report: dict) -> dict:
    """Errors summed over layers as root-sum-of-squares: ||W - Q|| over the whole model."""
    if not report:
        return {}
    return {k: math.sqrt(sum(e[k] ** 2 for e in report.values())) for k in ("plain", "base", "loftq")}


def run_grid(profile, variants: list[dict], steps: int, seeds=(0,), data: TaskData | None = None,
             log=print) -> list[dict]:
    """:func:`run_variant` for every variant and seed (the data loaded once); one row each."""
    data = data or load_task(profile)
    rows = []
    for v in variants:
        for seed in seeds:
            rows.append(run_variant(profile, v, steps, seed, data))
            r = rows[-1]
            log(f"{v['name']:>10} seed {seed}: EM {r['exact_match']:.3f} eval loss {r['eval_loss']:.3f} "
                f"({r['seconds']:.1f} s)")
    return rows


# ----------------------------------------------------------------------------------------------
# Command line: python -m qlora_helpers.ablations [--full]
# ----------------------------------------------------------------------------------------------
def run_plan(profile, plan: dict, data: TaskData | None = None, log=print) -> list[dict]:
    """Every variant on ``plan["seeds"]``, then the main comparison on its missing seeds."""
    data = data or load_task(profile)
    rows = run_grid(profile, plan["variants"], plan["steps"], plan["seeds"], data, log)
    extra = [s for s in plan["main_seeds"] if s not in plan["seeds"]]
    main = [v for v in plan["variants"] if v["name"] in plan["main"]]
    return rows + run_grid(profile, main, plan["steps"], extra, data, log)



class DifferentBaseError(ValueError):
    """Committed results were made on another base model than the one loaded here."""


def base_file_sha256(profile) -> str:
    """What every number of the grid depends on first: the SHA-256 of the base model's weights
    file (``model.safetensors`` in a local model folder), or the hub id for a hub model."""
    weights = Path(profile.model_files()) / "model.safetensors"
    return sha256_file(weights) if weights.exists() else profile.model_source


def check_same_base(meta: dict, profile) -> None:
    """Raise :class:`DifferentBaseError` if ``meta`` (of :func:`load_results`) records another
    base than ``profile``'s: then a difference in losses is a different model, not drift."""
    here = base_file_sha256(profile)
    if meta.get("base") != here:
        raise DifferentBaseError(
            f"the committed grid was made on another base: it records {meta.get('base')!r}, this "
            f"profile's model is {here!r}. Its numbers describe that other model. Restore the kit's "
            f"model (git checkout -- qlora_helpers/assets), or re-make the grid on this one "
            f"(python -m qlora_helpers.ablations --full).")


def save_results(rows: list[dict], path, plan: dict | None = None, meta: dict | None = None,
                 profile=None) -> Path:
    """Write grid rows as JSON ``{"meta": ..., "rows": [...]}``; losses rounded to 5 digits.

    ``meta`` records what the numbers depend on: the base model (:func:`base_file_sha256` of
    ``profile``), steps, seeds, test rows, package versions, the number of torch threads, the
    torch CPU kernels, the date and how many grid processes ran at once (their wall times share
    the machine), so a committed result says how it was made. Pass the
    ``meta`` of :func:`load_results` to keep the shards' own record when joining them."""
    meta = meta or {
        "steps": sorted({r["steps"] for r in rows}), "seeds": sorted({r["seed"] for r in rows}),
        "n_test": (plan or {}).get("n_test"), "torch": torch.__version__, "peft": peft.__version__,
        "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__,
        "threads": torch.get_num_threads(), "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "base": base_file_sha256(profile) if profile is not None else None,
        "date": datetime.date.today().isoformat(), "processes": 1}
    slim = [{**r, "losses": [round(x, 5) for x in r["losses"]]} for r in rows]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": slim}, separators=(",", ":")) + "\n")
    return path


def load_results(*paths) -> tuple[dict, list[dict]]:
    """Rows of one or more :func:`save_results` files (shards of one grid), and the first meta.

    Raises:
        FileNotFoundError: a path does not exist (names the command that writes it).
        ValueError: the shards ran with different steps or test rows, or repeat a (variant, seed) pair.
    Returns:
        ``(meta, rows)``: the first file's meta with ``processes`` = the shards' sum and ``seeds``
        over all of them, and every row.
    """
    metas, rows = [], []
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"{p} does not exist; write it with "
                                    f"`python -m qlora_helpers.ablations --full --out {p}`")
        d = json.loads(Path(p).read_text())
        metas.append(d["meta"])
        rows += d["rows"]
    if len({tuple(m["steps"]) for m in metas}) > 1 or len({m["n_test"] for m in metas}) > 1:
        raise ValueError(f"the files ran with different steps or test rows: "
                         f"{[(m['steps'], m['n_test']) for m in metas]}")
    if len({m.get("base") for m in metas}) > 1:
        raise DifferentBaseError(f"the files were made on different base models: "
                                 f"{sorted({str(m.get('base')) for m in metas})}")
    keys = [(r["name"], r["seed"]) for r in rows]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"(variant, seed) pairs repeated across the files: {dup[:4]}")
    meta = {**metas[0], "seeds": sorted({r["seed"] for r in rows}),
             "processes": sum(m.get("processes", 1) for m in metas)}
    return meta, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="LoRA/QLoRA ablation grid on the kit's task")
    ap.add_argument("--full", action="store_true", help="r 4..64, 300 steps, 3 seeds (long)")
    ap.add_argument("--only", default="", help="comma-separated variant names: run a shard of the grid")
    ap.add_argument("--out", default=None, help="JSON to write (default build/ablations_{full,reduced}.json)")
    ap.add_argument("--combine", nargs="+", metavar="JSON",
                    help="train nothing: join these result files, print the table, draw the figures")
    args = ap.parse_args(argv)
    if args.combine:
        meta, rows = load_results(*args.combine)
        if args.out:
            save_results(rows, args.out, meta=meta)
    else:
        profile = get_profile(model="tiny")  # the grid runs on the tiny model (notebook 06 says why)
        use_threads(profile)
        plan = grid(args.full)
        if args.only:
            names = args.only.split(",")
            pool = plan["variants"] + lorafa_parts() + rslora_own_lr()   # these two run only when named
            unknown = set(names) - {v["name"] for v in pool}
            if unknown:
                raise SystemExit(f"--only: unknown variant(s) {sorted(unknown)}; "
                                 f"the grid has {[v['name'] for v in pool]}")
            plan["variants"] = [v for v in pool if v["name"] in names]
        rows = run_plan(profile, plan, load_task(profile, plan["n_test"]))
        out = args.out or f"build/ablations_{'full' if args.full else 'reduced'}.json"
        print("wrote", save_results(rows, out, plan, profile=profile))
    print(results_table(rows))
    full = max(r["steps"] for r in rows) >= grid(True)["steps"]
    if any(r["name"].startswith("r") and r["use_rslora"] for r in rows):
        save_figure(plot_rank(rows, "exact_match" if full else "eval_loss"), "06_full_rank" if full else "06_rank")
    save_figure(plot_curves(rows, CURVES if full else None), "06_full_curves" if full else "06_curves")
    if full:
        save_figure(plot_spread(rows, "exact_match"), "06_full_spread")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
