"""Full fine-tuning, LoRA on the full-precision base and QLoRA, trained the same way and measured (notebook 07).

What it teaches: the claim the QLoRA paper rests on (Dettmers et al., arXiv 2305.14314: 4-bit QLoRA
"matches 16-bit full fine-tuning and 16-bit LoRA") and the source documents' comparison table (trainable
share, memory, "QLoRA is somewhat slower", accuracy "nearly the same") are measurements, so here they are
measured, on the course model (SmolLM2-135M-Instruct), with one design that makes the three comparable:

* the same task, data and held-out rows; for every seed the same batches in the same order
  (:func:`qlora_helpers.sft_data.batch_order`); the same loop (:func:`qlora_helpers.core.training.train_loop`),
  warm-up, clipping, AdamW, batch and steps (:data:`qlora_helpers.core.recipe.KIT_LOOP`);
* LoRA and QLoRA differ only in the base: fp32 weights, or NF4 with double quantization. Given a seed they
  start from the same ``lora_A`` (the same random draws, asserted in the notebook), so their difference is
  the quantization's;
* the learning rate cannot be shared: full fine-tuning moves every weight, LoRA a low-rank update scaled by
  ``alpha / r``. Each gets its own by the same rule, a sweep on seed 0 where the lowest loss on the
  validation rows wins (:data:`FULL_LRS`, :data:`LORA_LRS`; both sweeps are committed). The validation rows
  are test rows :data:`N_TEST` to ``N_TEST + N_VAL``, disjoint from the rows every result is reported on, so
  no reported number chose its own rate. QLoRA takes LoRA's rate: the claim is that
  it matches 16-bit LoRA with the same hyper-parameters;
* a difference is judged on paired seeds: per seed, method minus method, then mean and spread of those
  differences (:func:`paired_differences`).

Memory is counted by component on the objects (weights, trainable weights, gradients, optimizer state,
activations held for backward) next to :func:`qlora_helpers.memory.estimate_memory`'s prediction
(:func:`planner_components`). What one step costs, by operation, is :mod:`qlora_helpers.step_cost`'s job.

Run: ``python -m qlora_helpers.method_compare`` (writes :data:`RESULTS`: about 50 minutes on a 2-core AMD EPYC
with 2 threads, 37 of them for the two sweeps and the nine runs; ``--resume`` keeps what an interrupted job
made, and re-makes the sweeps if they have no validation loss, as those made before :data:`N_VAL` existed:
23.5 minutes for the eight; ``--step-cost`` measures the step costs again, on a machine doing nothing else);
notebook 07 reads it and retraces a few steps live. Memory: the process used to keep about 2 GB per run (4.05 ->
10.51 GB over four 2-step runs; the whole job reached 24 GB and was killed once): the counter of saved activations
(:class:`~qlora_helpers.core.training.saved_tensor_bytes`) made a reference cycle through autograd that Python's gc
cannot see. Fixed: four 2-step runs (full, LoRA, QLoRA, full) now end at 2.41, 2.41, 2.42 and 3.11 GB resident.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path

import bitsandbytes
import peft
import torch
import transformers
from peft import get_peft_model

from . import seed_recipe, step_cost
from .ablations import base_file_sha256, check_same_base, heldout_batches, heldout_loss
from .core.evaluation import exact_match, generate_ids
from .core.qlora_model import prepare_qlora_model
from .core.recipe import KIT_LOOP, Recipe
from .core.runtime import get_profile, load_model, load_task_dataset, load_tokenizer, use_threads
from .core.training import build_optimizer, model_loss, saved_tensor_bytes, train_loop, warmup_lr
from .measured_memory import loaded_model_bytes, optimizer_bytes
from .memory import estimate_memory
from .merge import conversation_texts
from .sft_data import shuffled_batches, tokenize_dataset

METHODS = ("full", "lora", "qlora")
# The planner's name for each (qlora_helpers.memory.METHODS): full fine-tuning in fp32 on the CPU; the planner's
# LoRA row is a 16-bit base (a GPU's bf16), so this CPU's fp32 base holds twice its weight bytes (notebook 07).
PLANNER_METHOD = {"full": "full_fp32", "lora": "lora16", "qlora": "qlora"}
# The learning-rate sweeps (seed 0, held-out loss after the recipe's steps; the lowest wins, the seeds use it).
FULL_LRS = (1e-5, 3e-5, 1e-4, 3e-4)   # full fine-tuning: AdamW rates around the usual 2e-5
LORA_LRS = (1e-4, 3e-4, 1e-3, 3e-3)   # LoRA, around the recipe's 1e-3; QLoRA takes LoRA's rate (the paper's claim
                                       # is QLoRA matching 16-bit LoRA with the same hyper-parameters)
SEEDS = (0, 1, 2)
EVAL_EVERY = 10                        # held-out loss every 10 steps, besides the end
N_TEST = 100
N_VAL = 100                            # the sweeps' validation rows: test rows 100-199, never reported
GEN_TOKENS = 48                        # new tokens allowed when generation lengths are measured
RESULTS = Path(__file__).parent / "results" / "methods.json"


@dataclass
class MethodData:
    tok: object
    train_rows: object      # datasets.Dataset of chat rows (messages)
    train: object           # the same, tokenized (input_ids, labels)
    test_rows: list         # dicts with prompt / answer / messages
    eval_batches: list      # padded batches of the test rows, for the held-out loss
    val_batches: list       # the same for the validation rows, on which the sweeps choose a rate


def load_method_data(profile, n_test: int = N_TEST, batch_size: int = 16, n_val: int = N_VAL) -> MethodData:
    """Tokenizer, train split (raw and tokenized), the first ``n_test`` test rows and their batches, and the
    next ``n_val`` test rows' batches (validation: the sweeps choose on them, nothing is reported on them).

    Raises:
        ValueError: the test split has fewer than ``n_test + n_val`` rows.
    """
    tok, ds = load_tokenizer(profile), load_task_dataset(profile)
    if n_test + n_val > len(ds["test"]):
        raise ValueError(f"n_test={n_test} reported rows and n_val={n_val} validation rows need {n_test + n_val} "
                         f"test rows; the task has {len(ds['test'])}: lower one of them")
    test, val = ds["test"].select(range(n_test)), ds["test"].select(range(n_test, n_test + n_val))
    return MethodData(tok, ds["train"], tokenize_dataset(ds["train"], tok), list(test),
                      heldout_batches(test, tok, batch_size), heldout_batches(val, tok, batch_size))


def build_method_model(profile, method: str, recipe: Recipe = KIT_LOOP, seed: int = 0):
    """The trainable model of ``method``: every weight of the fp32 base (``full``); LoRA on the fp32 base
    (``lora``); LoRA on the NF4 + double-quantized base, prepared as every kit QLoRA run is (``qlora``).
    ``torch.manual_seed(seed)`` first: LoRA and QLoRA draw the same ``lora_A``.

    Raises:
        ValueError: an unknown method.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    torch.manual_seed(seed)
    if method == "qlora":
        return prepare_qlora_model(load_model(profile), recipe)
    base = load_model(profile, quantized=False, dtype=torch.float32)
    if method == "full":
        return base.requires_grad_(True)
    return get_peft_model(base, recipe.lora_config())


def memory_components(model, optimizer, activation_bytes: int) -> dict[str, int]:
    """Bytes by component, measured on the tensors: frozen weights (packed NF4 or fp32) with their quantization
    constants and buffers, trainable weights, their gradients, the optimizer's state, the activations held
    for backward (counted by :class:`~qlora_helpers.core.training.saved_tensor_bytes`)."""
    held = loaded_model_bytes(model)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    return {"frozen weights": held["weights"] - trainable + held["quant constants"] + held["buffers"],
            "trainable weights": trainable, "gradients": grads, "optimizer state": optimizer_bytes(optimizer),
            "activations": activation_bytes}


def planner_components(profile, method: str, recipe: Recipe, batch_size: int, seq_len: int) -> dict[str, int]:
    """:func:`qlora_helpers.memory.estimate_memory` for the same run, in :func:`memory_components`' terms
    (no CUDA context or fragmentation: a CPU has neither; no gradient checkpointing, as the recipe)."""
    est = estimate_memory(profile.model_source, PLANNER_METHOD[method], r=recipe.r,
                          target_modules=recipe.target_modules, batch_size=batch_size, seq_len=seq_len,
                          gradient_checkpointing=False, cuda_context_gib=0, fragmentation=0).components
    trainable = est["lora params"] if method != "full" else est["weights"]
    frozen = 0 if method == "full" else est["weights"] + est.get("quant constants", 0)
    return {"frozen weights": frozen, "trainable weights": trainable, "gradients": est["gradients"],
            "optimizer state": est["optimizer states"], "activations": est["activations"]}


def train_method(profile, method: str, seed: int, data: MethodData, lr: float | None = None,
                 recipe: Recipe = KIT_LOOP, steps: int | None = None, evaluate: bool = True) -> dict:
    """Train ``method`` from ``seed`` on that seed's batches; measure it.

    Args:
        lr: the learning rate (default the recipe's; the command line takes each method's from its sweep).
        steps: optimizer steps (default the recipe's). evaluate: exact match and generation lengths at the end
            (slow: greedy generation of every test row), else only losses.
    Returns:
        A flat dict: method, seed, lr, steps, ``trainable``/``total`` parameters, ``losses``, ``eval_losses``
        (``{step: held-out loss}``, step 0 before training), ``eval_loss``, ``exact_match``, ``gen_tokens``
        (mean new tokens, EOS included), ``stopped`` (share of answers ending in EOS), ``memory`` and
        ``planned`` (:func:`memory_components`, :func:`planner_components`), ``seconds_per_step``.
    """
    lr = recipe.lr if lr is None else lr
    steps = steps or recipe.steps
    model = build_method_model(profile, method, recipe, seed)
    batches = shuffled_batches(data.train, data.tok, steps, seed, recipe.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer("adamw_torch", params, lr, recipe.weight_decay)
    model.train()
    with saved_tensor_bytes() as saved:          # what the first batch holds for backward (not a step)
        model_loss(model, batches[0])
    eval_losses, losses, seconds = {0: heldout_loss(model, data.eval_batches)}, [], 0.0
    for start in range(0, steps, EVAL_EVERY):    # the loop in chunks, the schedule continuous across them
        log = train_loop(model, opt, batches[start:start + EVAL_EVERY], lr, max_grad_norm=recipe.max_grad_norm,
                         schedule=lambda s, o=start: warmup_lr(s + o, lr, recipe.warmup_steps))
        losses += log["losses"]
        seconds += log["seconds"]
        eval_losses[start + len(log["losses"])] = heldout_loss(model, data.eval_batches)
    row = {"method": method, "seed": seed, "lr": lr, "steps": steps,
           "trainable": sum(p.numel() for p in params), "total": sum(p.numel() for p in model.parameters()),
           "losses": losses, "eval_losses": eval_losses, "eval_loss": eval_losses[steps],
           "val_loss": heldout_loss(model, data.val_batches),
           "memory": memory_components(model, opt, saved.total),
           "planned": planner_components(profile, method, recipe, recipe.batch_size,
                                         batches[0]["input_ids"].shape[1]),
           "seq_len": batches[0]["input_ids"].shape[1], "seconds_per_step": seconds / steps}
    if evaluate:
        row.update(exact_match=exact_match(model, data.tok, data.test_rows)[0],
                   **generation_lengths(model, data.tok, data.test_rows))
    return row


def generation_lengths(model, tok, rows, max_new_tokens: int = GEN_TOKENS) -> dict:
    """Greedy generation on every row's prompt with room for ``max_new_tokens``: ``gen_tokens`` (mean new
    tokens, EOS included) and ``stopped`` (share that ended with EOS: a model that learnt to stop)."""
    ids = generate_ids(model, tok, [r["prompt"] for r in rows], max_new_tokens)
    return {"gen_tokens": statistics.fmean(len(x) for x in ids),
            "stopped": sum(bool(x) and x[-1] == tok.eos_token_id for x in ids) / len(ids)}


def train_seed_recipe(profile, data: MethodData, seed: int = 0, recipe: Recipe = KIT_LOOP) -> dict:
    """QLoRA trained on the source document's data pipeline (:mod:`qlora_helpers.seed_recipe`: every row padded
    to 256 tokens, pad = EOS, every token a label but padding and EOS), with the recipe's model, steps, rate and
    the same rows in the same order as :func:`train_method`'s seed; measured like it."""
    model = build_method_model(profile, "qlora", recipe, seed)
    texts = conversation_texts(data.tok, data.train_rows)
    batches = seed_recipe.seed_batches(texts, data.tok, recipe.steps, seed, recipe.batch_size)
    opt = build_optimizer("adamw_torch", [p for p in model.parameters() if p.requires_grad], recipe.lr,
                          recipe.weight_decay)
    log = train_loop(model, opt, batches, recipe.lr, recipe.warmup_steps, recipe.max_grad_norm)
    reports = [seed_recipe.label_report(b, data.tok) for b in batches]
    return {"method": "qlora-seed-recipe", "seed": seed, "lr": recipe.lr, "steps": recipe.steps,
            "losses": log["losses"], "eval_loss": heldout_loss(model, data.eval_batches),
            "pad_share": statistics.fmean(r["pad_share"] for r in reports),
            "eos_in_text": sum(r["eos_in_text"] for r in reports),
            "eos_labelled": sum(r["eos_labelled"] for r in reports),
            "seconds_per_step": log["seconds"] / recipe.steps,
            "exact_match": exact_match(model, data.tok, data.test_rows)[0],
            **generation_lengths(model, data.tok, data.test_rows)}


def step_costs(profile, data: MethodData, seed: int = 0, recipe: Recipe = KIT_LOOP) -> dict:
    """What one step costs on the first batch of ``seed`` (:mod:`qlora_helpers.step_cost`): for each method, the
    seconds of a forward and backward pass, of a training step (AdamW's step too, at lr 0 so nothing changes),
    and bitsandbytes' operators' share of the pass; for QLoRA, gradient checkpointing off and on (time, and bytes
    held for backward counted twice)."""
    batch = shuffled_batches(data.train, data.tok, 1, seed, recipe.batch_size)[0]
    out = {"batch": list(batch["input_ids"].shape)}
    for method in METHODS:
        model = build_method_model(profile, method, recipe, seed)
        opt = build_optimizer("adamw_torch", [p for p in model.parameters() if p.requires_grad], lr=0.0)
        out[method] = {"seconds": step_cost.step_seconds(model, batch),           # forward and backward
                       "step_seconds": step_cost.step_seconds(model, batch, opt),  # and AdamW's step (lr 0)
                       **step_cost.op_share(model, batch)}
    out["checkpointing"] = step_cost.checkpointing(
        lambda on: build_method_model(profile, "qlora", recipe.replace(gradient_checkpointing=on), seed), batch)
    return out


# ----------------------------------------------------------------------------------------------
# Reading the results
# ----------------------------------------------------------------------------------------------
def best_lr(sweep: list[dict]) -> float:
    """The sweep's learning rate with the lowest final loss on the validation rows (``val_loss``), never on the
    rows the results are reported on.

    >>> best_lr([{"lr": 1e-4, "val_loss": 0.3, "eval_loss": 0.1}, {"lr": 1e-3, "val_loss": 0.2, "eval_loss": 0.4}])
    0.001

    Raises:
        ValueError: a row without ``val_loss`` (made before the validation rows existed: re-make the sweeps with
            ``python -m qlora_helpers.method_compare --resume``, which keeps the other runs).
    """
    old = [r["lr"] for r in sweep if "val_loss" not in r]
    if old:
        raise ValueError(f"sweep rows at lr {old} have no val_loss: they chose on the reported rows; re-make them "
                         f"with `python -m qlora_helpers.method_compare --resume` (the sweeps only, ~24 minutes)")
    return min(sweep, key=lambda r: r["val_loss"])["lr"]


def paired_differences(rows: list[dict], a: str, b: str, key: str = "eval_loss") -> dict:
    """Per seed ``key`` of method ``a`` minus method ``b`` (the same batches), their mean and sample std, whether
    every seed agrees in sign (``"a<b"``, ``"a>b"``, or ``"mixed"``), and whether the difference is *separated*:
    every seed agrees and the mean is beyond twice the spread of the differences (notebook 06's 2-std rule, on
    pairs). With three seeds, agreement alone happens by chance one time in four.

    >>> rows = [{"method": m, "seed": s, "eval_loss": v} for m, s, v in
    ...         [("x", 0, 1.0), ("x", 1, 2.0), ("y", 0, 1.5), ("y", 1, 2.4)]]
    >>> d = paired_differences(rows, "x", "y")
    >>> [round(v, 2) for v in d["diffs"]], round(d["mean"], 2), d["sign"], d["separated"]
    ([-0.5, -0.4], -0.45, 'a<b', True)
    """
    by = {(r["method"], r["seed"]): r[key] for r in rows}
    seeds = sorted(s for (m, s) in by if m == a and (b, s) in by)
    if len(seeds) < 2:
        raise ValueError(f"paired_differences needs >= 2 seeds with both {a!r} and {b!r}, got {seeds}")
    diffs = [by[(a, s)] - by[(b, s)] for s in seeds]
    sign = "a<b" if all(d < 0 for d in diffs) else "a>b" if all(d > 0 for d in diffs) else "mixed"
    mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
    return {"seeds": seeds, "diffs": diffs, "mean": mean, "std": std, "sign": sign,
            "separated": sign != "mixed" and abs(mean) > 2 * std}


def save_results(payload: dict, path, profile) -> Path:
    """``payload`` (sweep, rows, seed_recipe, step_cost) with a meta record of what made it; losses rounded."""
    def slim(r):
        return {**r, "losses": [round(x, 5) for x in r["losses"]]} if "losses" in r else r
    meta = {"base": base_file_sha256(profile), "recipe": KIT_LOOP.as_dict(), "n_test": N_TEST, "n_val": N_VAL,
            "torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__,
            "bitsandbytes": bitsandbytes.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "date": datetime.date.today().isoformat()}
    out = {"meta": meta, **{k: [slim(r) for r in v] if isinstance(v, list) else v for k, v in payload.items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    return path


def load_results(path=RESULTS) -> dict:
    """The committed comparison (:func:`save_results`' file); ``eval_losses`` keys back to ints.

    Raises:
        FileNotFoundError: naming the command that writes it.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; write it with `python -m qlora_helpers.method_compare "
                                f"--out {path}` (about 50 minutes on a 2-core CPU)")
    d = json.loads(path.read_text())
    for r in d["sweep"] + d["rows"] + d.get("lora_sweep", []):
        r["eval_losses"] = {int(k): v for k, v in r["eval_losses"].items()}
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Full fine-tuning vs LoRA vs QLoRA on the course model, paired seeds")
    ap.add_argument("--out", default=str(RESULTS), help=f"JSON to write (default {RESULTS})")
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs --out already holds (made on this base), run only the missing ones")
    ap.add_argument("--step-cost", action="store_true",
                    help="measure the step costs again (on a machine doing nothing else: they are timings)")
    args = ap.parse_args(argv)
    profile = get_profile()
    use_threads(profile)
    data = load_method_data(profile)
    payload = {"step_cost": None, "sweep": [], "lora_sweep": [], "rows": [], "seed_recipe": []}
    if args.resume and Path(args.out).exists():
        old = load_results(args.out)
        check_same_base(old["meta"], profile)
        payload.update({k: v for k, v in old.items() if k != "meta"})

    def run(bucket: str, method: str, seed: int, lr: float, evaluate: bool) -> dict:
        """The run from ``payload[bucket]`` if it is there (a sweep's only with its validation loss), else
        trained, put in its place and saved at once (a long job that stops keeps what it made)."""
        kept = [r for r in payload[bucket] if (r["method"], r["seed"], r["lr"]) == (method, seed, lr)]
        if kept and (bucket == "rows" or "val_loss" in kept[0]):
            return kept[0]
        r = train_method(profile, method, seed, data, lr=lr, evaluate=evaluate)
        payload[bucket] = [x for x in payload[bucket] if x not in kept] + [r]
        save_results(payload, args.out, profile)
        print(f"{bucket}: {method} seed {seed} lr {lr:g}: held-out loss {r['eval_loss']:.4f}"
              + (f", EM {r['exact_match']:.2f}" if evaluate else ""), flush=True)
        return r

    if args.step_cost or not payload["step_cost"]:
        payload["step_cost"] = step_costs(profile, data)
        save_results(payload, args.out, profile)
    full_lr = best_lr([run("sweep", "full", 0, lr, False) for lr in FULL_LRS])
    lora_lr = best_lr([run("lora_sweep", "lora", 0, lr, False) for lr in LORA_LRS])
    for seed in SEEDS:
        for method in METHODS:
            run("rows", method, seed, full_lr if method == "full" else lora_lr, True)
    if not payload["seed_recipe"]:
        payload["seed_recipe"] = [train_seed_recipe(profile, data, recipe=KIT_LOOP.replace(lr=lora_lr))]
        r = payload["seed_recipe"][0]
        print(f"seed recipe: EM {r['exact_match']:.2f}, {r['gen_tokens']:.1f} new tokens, stopped {r['stopped']:.2f}")
    print("wrote", save_results(payload, args.out, profile))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
