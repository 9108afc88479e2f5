"""The GPU self-check: does this machine's GPU run the kit? ``python -m qlora_helpers.gpu_check``.

What it is for: a learner runs it once on Colab (or any CUDA machine), before the notebooks, and
gets one table. Each row is one thing the course needs from the GPU stack, measured, next to the
bound it must meet, with a verdict: pass, FAIL or n/a. A row that raises is a FAIL that names the
exception; the other rows still run, so the table always shows every row.

1. bitsandbytes' CUDA library loads, and a 4-bit quantize runs on the GPU.
2. a bitsandbytes ``Linear4bit`` (NF4, double quantization, the profile's compute dtype): forward
   and backward are finite, and the output equals ``x @ dequantize(W).T`` within a bound from the
   dtype (Note: tolerances).
3. one ``bitsandbytes.optim.PagedAdamW8bit`` step on a LoRA-shaped pair: the weights move, finite.
4. tensors made in a cell follow the 4-bit model to its device
   (:func:`qlora_helpers.core.training.on_model_device`), and the forward runs there.
5. the kit's NF4 (:mod:`qlora_helpers.nf4`) against bitsandbytes' ``quantize_4bit`` on 1M normal
   values: the same codes, except on CUDA where a value sits within a few fp32 ulps of a decision
   boundary (:func:`qlora_helpers.nf4.compare_codes`; Note: CUDA boundaries).
6. the packing trap (:mod:`qlora_helpers.sft_data`): packed examples without a cache equal each
   example alone within a bound from the dtype (Note: tolerances); with a cache they do not (the leak).
7. 30 ``Trainer`` steps of the kit's recipe (:mod:`qlora_helpers.sft`, in the GPU's dtype: fp16
   with the grad scaler below compute capability 8, bf16 from 8 on, fp32 on the CPU): finite, falling
   loss, and a run stopped at step 15 and resumed ends bit for bit where the straight run ends.
8. the peak memory of row 7's run (``torch.cuda.max_memory_allocated``) against the planner
   (:func:`qlora_helpers.memory.estimate_memory`, as :func:`qlora_helpers.sft.run_sft` calls it).

Always the kit's tiny model, so the whole check takes seconds on a GPU and under a minute on the
kit's 2-core CI machine, where the CUDA-only rows (1, 8) read ``n/a (no CUDA)`` and the rest run in
fp32. Exit status 0 when no row FAILs, 1 otherwise; ``--json PATH`` also writes the rows.

Paper: QLoRA, Dettmers et al. 2023, arXiv:2305.14314 (NF4, double quantization, paged
optimizers). Production code it checks: bitsandbytes 0.50.2 (``nn.Linear4bit``,
``functional.quantize_4bit``, ``optim.PagedAdamW8bit``), transformers' ``Trainer`` (checkpoints and
``resume_from_checkpoint``), PyTorch's CUDA allocator statistics.

Note (CUDA boundaries): bitsandbytes' CUDA kernel scales a block by an approximate ``1 / absmax`` and
compares with decision constants written as float literals, so a value within a few fp32 ulps of the
midpoint between two NF4 levels can get the other neighbour's code. That is rounding, not a defect;
a code that differs anywhere else is. On the CPU bitsandbytes computes as the kit does: no code
may differ.
Note (tolerances): every bound is :func:`qlora_helpers.core.evaluation.logit_tolerance`'s rule, ``growth x
eps(dtype) x scale``, so a T4's fp16 and an A100's bf16 are judged by their own rounding, never by a
constant written for one dtype. Its growth (128) was measured on SmolLM2-135M's 30 layers, and the
rounding errors add up over the layers, so a model of ``L`` layers gets ``128 / 30 x L`` (row 6: 17 on the
tiny model's 4). One matrix product of ``K`` terms (row 2) gets ``sqrt(K)``: each product is rounded
by up to eps / 2, and ``K`` such errors all of one sign reach ``K x eps / 2`` of a typical term, which is
``sqrt(K) x eps / 2`` of an output of typical size. Measured on this kit's CPU with a T4's and a bf16
GPU's numerics (``runtime.emulate_gpu``): row 2 0.5 and 0.3 eps x max|y|, row 6 0.6 eps x max|logit|
in both, the leak 8.3 (bounds 0.2 and 1.7).
Note (determinism): the resume of row 7 is compared bit for bit. On CUDA the check asks PyTorch for
deterministic algorithms during that row (``warn_only``: an operation without one warns instead of
failing the row) and sets ``CUBLAS_WORKSPACE_CONFIG=:16:8`` before CUDA starts, the setting PyTorch's
reproducibility notes give for deterministic cuBLAS; the smallest of the two it names, so the
workspace (allocated through PyTorch's allocator) weighs as little as possible in row 8.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import bitsandbytes
import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import peft
import torch
import transformers
from bitsandbytes.cextension import lib
from bitsandbytes.functional import dequantize_4bit
from transformers import Trainer
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.utils import logging as hf_logging

from . import nf4
from .core.chat_data import padded_collator
from .core.cpu_layout import defend
from .core.evaluation import logit_tolerance
from .core.qlora_model import prepare_qlora_model
from .core.recipe import recipe_for
from .core.runtime import PROFILE_ENV, get_profile, load_model, load_task_dataset, load_tokenizer, use_threads
from .core.training import build_optimizer, on_model_device
from .memory import KNOWN_CONFIGS, estimate_memory
from .sft import training_arguments
from .sft_checks import StopAtStep, TrainingHealthCallback, lora_parameters
from .sft_data import packed_collator, packed_logits, packing_error, tokenize_chat, tokenize_dataset

SEED = 0
NO_CUDA = "(no CUDA)"
NF4_VALUES = 1_000_000     # row 5: 15,625 blocks of 64
TRAIN_STEPS, RESUME_AT = 30, 15
LOSS_WINDOW = 5            # row 7: mean of the last 5 logged losses below the mean of the first 5
GROWTH_PER_LAYER = 128 / 30  # logit_tolerance's growth, measured on SmolLM2-135M's 30 layers (Note: tolerances)
MiB = 2 ** 20


@dataclass(frozen=True)
class Row:
    """One line of the table: ``result`` is ``"pass"``, ``"FAIL"`` or ``"n/a"``."""
    name: str
    result: str
    measured: str
    bound: str
    seconds: float = 0.0


@dataclass
class Context:
    """What the rows share: the profile, and what one row measures for a later one (row 7's peak)."""
    profile: object
    notes: dict = field(default_factory=dict)

    @property
    def device(self) -> str:
        return self.profile.device

    @property
    def dtype(self) -> torch.dtype:
        return self.profile.compute_dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _finite(*tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# ---------------------------------------------------------------------------------------------
# The rows: each returns (ok, measured, bound); ok None means n/a
# ---------------------------------------------------------------------------------------------
def check_bnb_cuda(ctx: Context):
    """Row 1: bitsandbytes loaded its CUDA library, and quantize/dequantize 4-bit runs on the GPU."""
    bound = "CUDA library loaded; quantize_4bit on cuda"
    if ctx.device != "cuda":
        return None, NO_CUDA, bound
    if not getattr(lib, "compiled_with_cuda", False):
        raise RuntimeError(f"bitsandbytes loaded no CUDA library ({type(lib).__name__}); "
                           f"`python -m bitsandbytes` says why")
    w = torch.randn(4096, generator=torch.Generator().manual_seed(SEED)).to("cuda")  # (4096,)
    packed, state = bnbF.quantize_4bit(w, blocksize=nf4.DEFAULT_BLOCKSIZE, quant_type="nf4")
    back = bnbF.dequantize_4bit(packed, state)                                       # (4096,)
    torch.cuda.synchronize()
    name = os.path.basename(getattr(getattr(lib, "_lib", None), "_name", "?"))
    ok = packed.is_cuda and _finite(back)
    return ok, f"{name}; quantize_4bit on {packed.device}, finite {_finite(back)}", bound


def check_linear4bit(ctx: Context):
    """Row 2: ``Linear4bit`` forward and backward against ``x @ dequantize(W).T`` in fp32."""
    g = torch.Generator().manual_seed(SEED)
    w = torch.randn(128, 256, generator=g) * 0.05                                    # (out, in) fp32
    layer = bnb.nn.Linear4bit(256, 128, bias=False, compute_dtype=ctx.dtype, compress_statistics=True,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4")
    layer = defend(layer.to(ctx.device))                                             # quantized on .to()
    x = torch.randn(8, 256, generator=g).to(ctx.device, ctx.dtype).requires_grad_()  # (batch, in)
    y = layer(x)                                                                     # (batch, out)
    y.float().square().sum().backward()
    w_deq = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()     # (out, in)
    ref = x.detach().float() @ w_deq.T                                               # (batch, out) fp32
    err = (y.detach().float() - ref).abs().max().item()
    tol = logit_tolerance(ctx.dtype, ref.abs().max().item(), growth=math.sqrt(w.shape[1]))  # Note: tolerances
    finite = _finite(y.detach(), x.grad)
    return (finite and err <= tol, f"max|y - x@deq(W).T| {err:.2e}; y, dx finite: {finite}",
            f"<= {tol:.2e} (16 eps x max|y|, {_dtype_name(ctx.dtype)})")


def check_paged_adamw8bit(ctx: Context):
    """Row 3: one ``PagedAdamW8bit`` step on a LoRA pair (A random, B zero) with random gradients."""
    g = torch.Generator().manual_seed(SEED)
    r, d = 16, 256                            # A (16, 256) and B (256, 16): 4096 values each, 8-bit states
    a = torch.nn.Parameter((torch.randn(r, d, generator=g) * 0.01).to(ctx.device))   # (r, in)
    b = torch.nn.Parameter(torch.zeros(d, r).to(ctx.device))                         # (out, r) LoRA's zero B
    before = [a.detach().clone(), b.detach().clone()]
    opt = build_optimizer("paged_adamw_8bit", [a, b], lr=recipe_for(ctx.profile).lr)
    for p in (a, b):
        p.grad = torch.randn(p.shape, generator=g).to(ctx.device)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        opt.step()
    moved = [(p.detach() - q).abs().max().item() for p, q in zip((a, b), before)]
    state = opt.state[a]["state1"]
    paged = "paged" if getattr(state, "is_paged", False) else (
        "not paged (bitsandbytes' CPU fallback)" if any("not supported on CPU" in str(w.message) for w in seen)
        else "not paged")
    ok = min(moved) > 0 and _finite(a.detach(), b.detach())
    return (ok, f"max|dA| {moved[0]:.1e}, max|dB| {moved[1]:.1e}; {state.dtype} states, {paged}",
            "both move (> 0), finite")


def check_device_follow(ctx: Context):
    """Row 4: ids made as a cell makes them (``torch.randint``, on the CPU) reach the 4-bit model's device."""
    model = load_model(ctx.profile).eval()
    want = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(SEED))
    batch = on_model_device({"input_ids": ids}, model)
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits                             # (2, 16, vocab)
    ok = logits.device == batch["input_ids"].device == want and _finite(logits)
    return ok, f"ids {ids.device} -> {batch['input_ids'].device}; logits on {logits.device}", f"model on {want}"


def check_nf4_backend(ctx: Context):
    """Row 5: the kit's NF4 codes against bitsandbytes' ``quantize_4bit`` on the model's device."""
    w = torch.randn(NF4_VALUES, generator=torch.Generator().manual_seed(SEED)).to(ctx.device)  # (n,) fp32
    packed, state = bnbF.quantize_4bit(w, blocksize=nf4.DEFAULT_BLOCKSIZE, quant_type="nf4",
                                       compress_statistics=False)
    r = nf4.compare_codes(w, packed, state.absmax)
    measured = (f"{r['differ']} of {r['n']:,} codes differ, {r['unexplained']} not at a boundary; "
                f"absmax equal {r['absmax_equal']}")
    if ctx.device == "cuda":
        return r["unexplained"] == 0 and r["absmax_equal"], measured, \
            f"0 not within {nf4.BOUNDARY_ULPS} ulps of a boundary"
    return r["differ"] == 0 and r["absmax_equal"], measured, "0 differ (CPU)"


def check_packing_trap(ctx: Context):
    """Row 6: packed logits without a cache equal each example alone; with a cache they leak."""
    tok = load_tokenizer(ctx.profile)
    rows = load_task_dataset(ctx.profile)["train"].select(range(4))
    examples = [tokenize_chat(r, tok)["input_ids"] for r in rows]
    model = load_model(ctx.profile).eval()
    scale = max(lg.abs().max().item() for lg in packed_logits(model, examples))
    layers = model.config.num_hidden_layers
    tol = logit_tolerance(ctx.dtype, scale, growth=GROWTH_PER_LAYER * layers)   # Note: tolerances
    exact = packing_error(model, examples, use_cache=False)
    leak = packing_error(model, examples, use_cache=True)
    return (exact <= tol < leak, f"max|packed - alone| no cache {exact:.2e}, cache {leak:.2e}",
            f"no cache <= {tol:.2e} < cache ({GROWTH_PER_LAYER * layers:.0f} eps x max|logit|, "
            f"{_dtype_name(ctx.dtype)})")


@contextmanager
def _quiet():
    """No weight-loading progress bars and no FutureWarnings (transformers 5.23 renaming gradient
    checkpointing) inside the block: the table is the output. Restored after."""
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


@contextmanager
def _deterministic(device: str):
    """Deterministic algorithms on CUDA inside the block (Note: determinism); nothing on the CPU."""
    if device != "cuda":
        yield
        return
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def _trainer_run(profile, recipe, train_ds, collator, out: str, stop_at: int | None = None,
                 resume: str | None = None):
    """Notebook 04's interrupt-and-resume run: the kit's model, arguments and callbacks, a loss logged
    every step; saves a checkpoint every ``RESUME_AT`` steps when stopping or resuming."""
    torch.manual_seed(recipe.seed)
    model = prepare_qlora_model(load_model(profile), recipe)
    health = TrainingHealthCallback(model)
    saving = stop_at is not None or resume is not None
    args = training_arguments(profile, out, recipe, logging_steps=1, disable_tqdm=True,
                              save_strategy="steps" if saving else "no", save_steps=RESUME_AT)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=collator,
                      callbacks=[health] + ([StopAtStep(stop_at)] if stop_at else []))
    for quiet in (PrinterCallback, ProgressCallback):   # the table is the output, not a log line per step
        trainer.remove_callback(quiet)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer, health


def check_training(ctx: Context):
    """Row 7: 30 Trainer steps (finite, falling loss), then stopped at 15, resumed: bit for bit the same."""
    p = ctx.profile
    recipe = recipe_for(p).replace(steps=TRAIN_STEPS)
    tok = load_tokenizer(p)
    train_ds = tokenize_dataset(load_task_dataset(p)["train"], tok)
    collator = padded_collator(tok, None) if p.device == "cpu" else packed_collator()   # as run_sft
    ctx.notes.update(recipe=recipe, seq_len=max(len(x) for x in train_ds["input_ids"]))
    with tempfile.TemporaryDirectory() as out, _deterministic(p.device):
        if p.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        straight, _, health = _trainer_run(p, recipe, train_ds, collator, f"{out}/straight")
        if p.device == "cuda":
            torch.cuda.synchronize()
            ctx.notes["peak_bytes"] = torch.cuda.max_memory_allocated()
        _trainer_run(p, recipe, train_ds, collator, f"{out}/cut", stop_at=RESUME_AT)
        resumed, trainer, health_r = _trainer_run(p, recipe, train_ds, collator, f"{out}/cut",
                                                  resume=f"{out}/cut/checkpoint-{RESUME_AT}")
    losses = [h["loss"] for h in health.history]
    first, last = sum(losses[:LOSS_WINDOW]) / LOSS_WINDOW, sum(losses[-LOSS_WINDOW:]) / LOSS_WINDOW
    a, b = lora_parameters(straight, False), lora_parameters(resumed, False)
    if a.keys() != b.keys():
        raise RuntimeError(f"the resumed model has other LoRA weights: {sorted(a.keys() ^ b.keys())[:4]}")
    same_weights = all(torch.equal(a[n], b[n]) for n in a)
    max_dw = max((a[n].detach().float() - b[n].detach().float()).abs().max().item() for n in a)
    d_loss = abs(losses[-1] - health_r.history[-1]["loss"])
    ok = (len(losses) == TRAIN_STEPS and trainer.state.global_step == TRAIN_STEPS and last < first
          and same_weights and d_loss == 0.0)
    return (ok, f"loss {first:.3f} -> {last:.3f} (mean of {LOSS_WINDOW}); resumed at {RESUME_AT}: "
                f"|dloss| {d_loss:.1e}, max|dLoRA| {max_dw:.1e}",
            f"finite, last < first; resume bit for bit ({_dtype_name(p.compute_dtype)})")


def check_memory(ctx: Context):
    """Row 8: row 7's peak GPU memory against the planner's estimate for the same run."""
    bound = "measured <= planned (memory.estimate_memory)"
    if ctx.device != "cuda":
        return None, NO_CUDA, bound
    if "peak_bytes" not in ctx.notes:
        raise RuntimeError("row 7 ended before its straight run did: no peak memory to compare")
    p, recipe = ctx.profile, ctx.notes["recipe"]
    name = p.model if p.model in KNOWN_CONFIGS else p.model_files()
    plan = estimate_memory(name, "qlora", r=recipe.r, batch_size=recipe.batch_size, seq_len=ctx.notes["seq_len"],
                           gradient_checkpointing=recipe.gradient_checkpointing,
                           optimizer=p.optimizer,
                           cuda_context_gib=0, fragmentation=0)   # max_memory_allocated sees no CUDA context
    peak = ctx.notes["peak_bytes"]
    return (peak <= plan.total, f"peak {peak / MiB:.1f} MiB (max_memory_allocated)",
            f"<= {plan.total / MiB:.1f} MiB planned")


# (key, name, the function's name in this module, the rule shown when the row raised)
ROWS = (
    ("bnb_cuda", "bitsandbytes CUDA library", "check_bnb_cuda", "CUDA library loaded; quantize_4bit on cuda"),
    ("linear4bit", "Linear4bit NF4 forward/backward", "check_linear4bit", "finite; = x @ deq(W).T (logit_tolerance)"),
    ("paged_adamw8bit", "PagedAdamW8bit step", "check_paged_adamw8bit", "both move (> 0), finite"),
    ("device", "cell tensors follow the model", "check_device_follow", "forward on the model's device"),
    ("nf4_backend", "NF4: kit vs bitsandbytes", "check_nf4_backend", "0 codes differ off a boundary"),
    ("packing", "packing trap (use_cache)", "check_packing_trap", "no cache exact, cache leaks (logit_tolerance)"),
    ("training", f"{TRAIN_STEPS} Trainer steps + resume", "check_training", "finite, falling, resume bit for bit"),
    ("memory", "peak memory vs planner", "check_memory", "measured <= planned"),
)


def run_checks(profile, only: tuple[str, ...] | None = None, log=print) -> list[Row]:
    """Every row of the check (or the keys in ``only``, in table order) on ``profile``, one progress
    line each through ``log``. A row that raises comes back as FAIL with the exception's type and
    message; the next row runs all the same."""
    ctx, rows = Context(profile), []
    todo = [r for r in ROWS if only is None or r[0] in only]
    for i, (key, name, fn, rule) in enumerate(todo, 1):
        log(f"[{i}/{len(todo)}] {name} ...")
        t0 = time.perf_counter()
        try:
            with _quiet():
                ok, measured, bound = getattr(sys.modules[__name__], fn)(ctx)
            result = "n/a" if ok is None else "pass" if ok else "FAIL"
        except Exception as err:   # every row reports, whatever broke
            result, measured, bound = "FAIL", f"{type(err).__name__}: {err}", rule
        rows.append(Row(name, result, measured, bound, round(time.perf_counter() - t0, 2)))
        log(f"[{i}/{len(todo)}] {name}: {result} ({rows[-1].seconds:.1f} s)")
    return rows


def header(profile) -> dict[str, str]:
    """The facts printed above the table: device, GPU, compute capability, dtype, versions."""
    cap = profile.compute_capability
    return {"profile": profile.name, "device": profile.device, "gpu": profile.gpu_name or "-",
            "compute capability": f"{cap[0]}.{cap[1]}" if cap else "-",
            "compute dtype": _dtype_name(profile.compute_dtype), "torch": torch.__version__,
            "bitsandbytes": bitsandbytes.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "model": f"{profile.model} (the kit's tiny model)"}


def table(rows: list[Row]) -> str:
    """The rows as one plain-text table; a FAIL's message on its first line only (``--json`` has it all)."""
    cells = [("#", "check", "result", "measured", "bound")]
    cells += [(str(i), r.name, r.result, r.measured.splitlines()[0][:160] if r.measured else "", r.bound)
              for i, r in enumerate(rows, 1)]
    widths = [max(len(c[k]) for c in cells) for k in range(4)]
    return "\n".join("  ".join(c[k].ljust(widths[k]) for k in range(4)) + "  " + c[4] for c in cells)


def main(argv: list[str] | None = None) -> int:
    """Run the check, print the facts and the table; exit status 0 when no row FAILs, 1 otherwise."""
    ap = argparse.ArgumentParser(prog="python -m qlora_helpers.gpu_check",
                                 description="Does this GPU run the QLoRA course kit? One table, row by row.")
    ap.add_argument("--json", metavar="PATH", help="also write the facts and the rows to PATH as JSON")
    args = ap.parse_args(argv)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":16:8")   # before CUDA starts (Note: determinism)
    profile = get_profile(model="tiny")   # QLORA_KIT_PROFILE=gpu without CUDA raises here, saying so
    use_threads(profile)
    facts = header(profile)
    width = max(map(len, facts))
    print("\n".join(f"{k:>{width}} : {v}" for k, v in facts.items()), flush=True)
    if profile.device == "cpu" and torch.cuda.is_available():
        print(f"warning: CUDA is available but {PROFILE_ENV}={os.environ.get(PROFILE_ENV)} runs this check on the "
              f"CPU; unset it (or set {PROFILE_ENV}=gpu) to check the GPU", flush=True)
    rows = run_checks(profile, log=lambda line: print(line, flush=True))
    failed = [r.name for r in rows if r.result == "FAIL"]
    print("\n" + table(rows))
    print(f"\n{len(failed)} of {len(rows)} rows FAIL" + (f": {', '.join(failed)}" if failed else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"facts": facts, "rows": [asdict(r) for r in rows], "failed": len(failed)}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # the tiny model ships with the kit: no hub needed
    raise SystemExit(main())
