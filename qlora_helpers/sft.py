"""QLoRA supervised fine-tuning with transformers' ``Trainer``, and the checks that it trained.

What it teaches: the whole QLoRA recipe (Dettmers et al., arXiv 2305.14314) on one code path
for the CPU (offline profile) and a GPU (gpu profile):

* a frozen base in NF4 with double quantization (:func:`qlora_helpers.runtime.load_model`),
  compute dtype from the runtime profile;
* ``peft.prepare_model_for_kbit_training`` (fp32 norms/embeddings, input grads for gradient
  checkpointing), LoRA on every linear layer (``target_modules="all-linear"``);
* ``TrainingArguments`` with the profile's optimizer (``paged_adamw_8bit`` on a GPU), bf16/fp16
  flags from the profile's compute dtype, max grad norm 0.3, a constant schedule after warm-up;
* :class:`TrainingHealthCallback`: LoRA gradients non-zero, loss finite and not stuck at zero
  (:class:`TrainingAlarm` otherwise), gradient norm recorded; :func:`base_tensor_hashes` proves the
  4-bit base stays byte-for-byte unchanged.

Every number of a run comes from one :class:`qlora_helpers.recipe.Recipe` (the kit's
:data:`~qlora_helpers.recipe.KIT_SFT`, the paper's :data:`~qlora_helpers.recipe.QLORA_PAPER`
presets). Data preparation lives in :mod:`qlora_helpers.sft_data`.
"""
from __future__ import annotations

import hashlib
import math
import time

import torch
from transformers import TrainerCallback

from .recipe import KIT_SFT, Recipe, prepare_qlora_model, recipe_for
from .training import TrainingAlarm, build_optimizer, check_loss, train_loop


# ----------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------
def lora_config(r: int = KIT_SFT.r, lora_alpha: float = KIT_SFT.lora_alpha,
                lora_dropout: float = KIT_SFT.lora_dropout):
    """A PEFT ``LoraConfig`` on all linear layers (QLoRA's choice; the output head excluded):
    :data:`qlora_helpers.recipe.KIT_SFT` with these three numbers, checked there.

    Args:
        r: adapter rank. lora_alpha: scale numerator (update scaled by ``lora_alpha / r``).
        lora_dropout: dropout on the adapter's input.
    Returns:
        ``peft.LoraConfig`` for a causal LM.
    """
    return KIT_SFT.replace(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout).lora_config()


def precision_flags(profile) -> dict[str, bool]:
    """``TrainingArguments`` mixed-precision flags from the profile: bf16 on Ampere+, fp16 on a T4,
    neither on the CPU (fp32)."""
    return {"bf16": profile.compute_dtype == torch.bfloat16,
            "fp16": profile.compute_dtype == torch.float16}


def training_kwargs(profile, output_dir: str, recipe: Recipe | None = None, **overrides) -> dict:
    """The keyword arguments of :func:`training_arguments`, as a dict: the one place a recipe
    becomes trainer settings, shared with TRL's ``SFTConfig`` (:func:`qlora_helpers.trl_sft.sft_config`).

    From ``recipe`` (default :func:`qlora_helpers.recipe.recipe_for` the profile): learning rate,
    warm-up steps, max grad norm, weight decay, batch size, steps, seed. Besides: the profile's
    optimizer and precision, a constant learning rate after the linear warm-up
    (``constant_with_warmup``; see the recipe module's note on the paper's warm-up), gradient
    checkpointing as the recipe says, the loss logged about 15 times a run (every 10 steps at most), no checkpoints, no
    external reporting, and NaN losses logged as NaN (transformers' ``logging_nan_inf_filter``
    leaves NaN steps out of the logged mean: logged every step, a NaN loss shows as 0.0, otherwise
    it vanishes in the mean of the finite steps; ``tests/test_sft.py`` injects one through
    ``Trainer``). Keyword ``overrides`` win.

    Raises:
        ValueError: a learning rate that is not a positive number.
    """
    recipe = recipe or recipe_for(profile)
    kw = dict(output_dir=output_dir, optim=profile.optimizer, learning_rate=recipe.lr,
              lr_scheduler_type="constant_with_warmup", warmup_steps=recipe.warmup_steps,
              max_grad_norm=recipe.max_grad_norm, weight_decay=recipe.weight_decay,
              per_device_train_batch_size=recipe.batch_size, max_steps=recipe.steps,
              logging_steps=max(1, min(10, recipe.steps // 15)), logging_nan_inf_filter=False,
              gradient_checkpointing=recipe.gradient_checkpointing,
              gradient_checkpointing_kwargs={"use_reentrant": False} if recipe.gradient_checkpointing else None,
              save_strategy="no", report_to="none", remove_unused_columns=False, seed=recipe.seed,
              data_seed=recipe.seed, dataloader_num_workers=0, use_cpu=profile.device == "cpu",
              **precision_flags(profile))
    kw.update(overrides)
    if kw["learning_rate"] <= 0 or not math.isfinite(kw["learning_rate"]):
        raise ValueError(f"learning_rate must be a positive number, got {kw['learning_rate']}")
    return kw


def training_arguments(profile, output_dir: str, recipe: Recipe | None = None, **overrides):
    """``TrainingArguments`` for QLoRA on ``profile`` from a recipe (:func:`training_kwargs`);
    keyword ``overrides`` win."""
    from transformers import TrainingArguments
    return TrainingArguments(**training_kwargs(profile, output_dir, recipe, **overrides))


# ----------------------------------------------------------------------------------------------
# Is it really training?
# ----------------------------------------------------------------------------------------------
def lora_parameters(model, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """The adapter weights by name (``lora_A`` / ``lora_B``); only trainable ones by default."""
    return {n: p for n, p in model.named_parameters()
            if "lora_" in n and (p.requires_grad or not trainable_only)}


def _tensor_digest(t: torch.Tensor) -> str:
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # the tensor's bytes
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def base_tensor_hashes(model) -> dict[str, str]:
    """SHA-256 of every non-LoRA tensor in ``model.state_dict()``: the packed NF4 bytes (uint8),
    the quantization state (absmax, nested absmax, quant map), embeddings, norms, head.

    Read through ``state_dict()``, not ``weight.data``: on CPUs with AVX512-BF16, bitsandbytes
    repacks ``weight.data`` in place at the first inference forward and ``state_dict()`` converts it
    back (:mod:`qlora_helpers.cpu_layout`; ``load_model`` also switches the repack off).
    """
    return {k: _tensor_digest(v) for k, v in model.state_dict().items()
            if "lora_" not in k and isinstance(v, torch.Tensor)}


class TrainingHealthCallback(TrainerCallback):
    """A ``TrainerCallback`` that checks training is real, and records what it saw.

    * before the first optimizer step: every LoRA tensor has a gradient, and some are non-zero
      (only ``lora_B`` starts at zero, so ``lora_A`` gets zero grads at step 1; both must be
      non-zero by :meth:`report` time);
    * on every log: :func:`check_loss` (NaN / zero alarm), loss and gradient norm recorded;
    * :meth:`report` after training: LoRA moved, base bytes unchanged.
    """

    def __init__(self, model):
        self.before_lora = {n: p.detach().clone() for n, p in lora_parameters(model).items()}
        self.before_base = base_tensor_hashes(model)
        self.history: list[dict] = []          # {"step", "loss", "grad_norm"} per log
        self.nonzero_grads: dict[str, bool] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for n, p in lora_parameters(model).items():
            if p.grad is None:
                raise TrainingAlarm(f"LoRA weight {n} has no gradient at step {state.global_step}; "
                                    "is the input wired for gradient checkpointing "
                                    "(prepare_model_for_kbit_training)?")
            self.nonzero_grads[n] = self.nonzero_grads.get(n, False) or bool(p.grad.abs().sum() > 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            check_loss(float(logs["loss"]), state.global_step)
            self.history.append({"step": state.global_step, "loss": float(logs["loss"]),
                                 "grad_norm": float(logs.get("grad_norm", float("nan")))})

    def report(self, model) -> dict:
        """What training did: LoRA change, gradient coverage, base bytes unchanged."""
        after = lora_parameters(model)
        moved = {n: (after[n].detach() - b).abs().max().item() for n, b in self.before_lora.items()}
        return {"n_lora_tensors": len(moved),
                "all_lora_had_nonzero_grad": bool(self.nonzero_grads) and all(self.nonzero_grads.values()),
                "all_lora_moved": all(v > 0 for v in moved.values()),
                "min_lora_change": min(moved.values()),
                "base_unchanged": base_tensor_hashes(model) == self.before_base,
                "n_base_tensors": len(self.before_base)}


class StopAtStep(TrainerCallback):
    """A ``TrainerCallback`` that ends training after step ``k`` (a simulated interruption)."""

    def __init__(self, k: int):
        self.k = k

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.k:
            control.should_save = True
            control.should_training_stop = True
        return control


def plot_training(history: list[dict]):
    """Loss and gradient-norm curves side by side; returns the matplotlib figure."""
    import matplotlib.pyplot as plt
    if not history:
        raise ValueError("history is empty: log at least once (logging_steps <= max_steps)")
    steps = [h["step"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.plot(steps, [h["loss"] for h in history], marker="o", ms=3)
    ax1.set(xlabel="optimizer step", ylabel="training loss (response tokens)", yscale="log",
            title="loss")
    ax2.plot(steps, [h["grad_norm"] for h in history], marker="o", ms=3, color="C1")
    ax2.set(xlabel="optimizer step", ylabel="gradient norm (before clipping)", title="grad norm")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# Throughput: padding versus packing
# ----------------------------------------------------------------------------------------------
def tokens_per_second(model, batches: list[dict], optimizer=None) -> dict[str, float]:
    """Training throughput: real (non-pad) tokens per second of :func:`~qlora_helpers.training.train_loop`
    steps (forward, backward, clipping, optimizer step) over ``batches``, and the pad share.

    Args:
        batches: collated batches (padded ones carry ``attention_mask``; packed ones
            ``position_ids``). The first batch is a warm-up step and is not timed.
        optimizer: the optimizer to step; default AdamW at learning rate 0, so the model's weights
            do not change while it is timed (AdamW's state does).
    Returns:
        ``{"tokens_per_s", "pad_share", "seconds"}``.
    """
    if len(batches) < 2:
        raise ValueError(f"tokens_per_second needs at least 2 batches (the first is a warm-up), got {len(batches)}")
    if optimizer is None:
        optimizer = build_optimizer("adamw_torch", [p for p in model.parameters() if p.requires_grad], lr=0.0)
    lr = optimizer.param_groups[0]["lr"]
    train_loop(model, optimizer, batches[:1], lr=lr, warmup=0)
    seconds = train_loop(model, optimizer, batches[1:], lr=lr, warmup=0)["seconds"]
    total = sum(b["input_ids"].numel() for b in batches[1:])
    real = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches[1:])
    model.zero_grad(set_to_none=True)
    return {"tokens_per_s": real / seconds, "pad_share": 1 - real / total, "seconds": seconds}


# ----------------------------------------------------------------------------------------------
# Saving and comparing adapters
# ----------------------------------------------------------------------------------------------
def lora_difference(a, b) -> float:
    """Largest absolute difference between two models' LoRA weights (same adapter layout)."""
    pa, pb = lora_parameters(a, False), lora_parameters(b, False)
    if pa.keys() != pb.keys():
        raise ValueError(f"the models have different LoRA weights: {sorted(pa.keys() ^ pb.keys())[:4]}")
    return max((pa[n].detach() - pb[n].detach()).abs().max().item() for n in pa)


# ----------------------------------------------------------------------------------------------
# The whole lesson in one call: any model of the kit, the GPU capstone included
# ----------------------------------------------------------------------------------------------
def run_sft(profile, output_dir: str, recipe: Recipe | None = None, n_test: int = 100,
            max_new_tokens: int = 12, log=print) -> dict:
    """Notebook 04 in one call, on ``profile``'s model: the date task, exact match of the 4-bit base
    on ``n_test`` held-out dates, QLoRA training with ``Trainer`` from ``recipe`` (default: the
    profile's), exact match after, the wall time and, on a GPU, the peak memory next to the
    planner's estimate for the same run (:func:`qlora_helpers.memory.estimate_memory` with no
    overhead allowance, as ``max_memory_allocated`` sees no CUDA context).

    The capstone of notebook 04 calls it on a 7B model on a T4 (``$QLORA_KIT_CAPSTONE``); the tests
    call it on the tiny model.

    Returns:
        a dict: ``model``, ``steps``, ``em_before``, ``em_after``, ``losses`` (logged),
        ``train_seconds``, ``peak_bytes`` (None on the CPU), ``planned_bytes``, ``seq_len``.
    """
    from transformers import Trainer
    from .evaluation import exact_match
    from .memory import KNOWN_CONFIGS, estimate_memory
    from .runtime import load_model, load_task_dataset, load_tokenizer
    from .sft_data import packed_collator, tokenize_dataset
    from .chat_data import padded_collator

    recipe = recipe or recipe_for(profile)
    tok = load_tokenizer(profile)
    ds = load_task_dataset(profile)
    train_ds = tokenize_dataset(ds["train"], tok)
    test_rows = ds["test"].select(range(n_test))
    seq_len = max(len(x) for x in train_ds["input_ids"])
    if profile.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(recipe.seed)
    base = load_model(profile)
    em_before, _ = exact_match(base, tok, test_rows, max_new_tokens=max_new_tokens)
    log(f"{profile.model}: exact match before training {em_before:.2f} ({n_test} test dates)")
    model = prepare_qlora_model(base, recipe)
    health = TrainingHealthCallback(model)
    collator = padded_collator(tok, None) if profile.device == "cpu" else packed_collator()
    trainer = Trainer(model=model, args=training_arguments(profile, output_dir, recipe),
                      train_dataset=train_ds, data_collator=collator, callbacks=[health])
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    em_after, _ = exact_match(model, tok, test_rows, max_new_tokens=max_new_tokens)
    log(f"{profile.model}: {recipe.steps} steps in {seconds:.0f} s, exact match after {em_after:.2f}")
    peak = torch.cuda.max_memory_allocated() if profile.device == "cuda" else None
    planner_name = profile.model if profile.model in KNOWN_CONFIGS else profile.model_files()
    plan = estimate_memory(planner_name, "qlora", r=recipe.r, batch_size=recipe.batch_size, seq_len=seq_len,
                           gradient_checkpointing=recipe.gradient_checkpointing,
                           optimizer=profile.optimizer,
                           cuda_context_gib=0, fragmentation=0)
    return {"model": profile.model, "steps": recipe.steps, "em_before": em_before, "em_after": em_after,
            "losses": [h["loss"] for h in health.history], "train_seconds": seconds, "peak_bytes": peak,
            "planned_bytes": plan.total, "seq_len": seq_len}
