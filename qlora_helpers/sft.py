"""QLoRA supervised fine-tuning with transformers' ``Trainer``: a recipe as trainer settings, and the run.

What it teaches: the whole QLoRA recipe (Dettmers et al., arXiv 2305.14314) on one code path
for the CPU (offline profile) and a GPU (gpu profile):

* a frozen base in NF4 with double quantization (:func:`qlora_helpers.core.runtime.load_model`),
  compute dtype from the runtime profile;
* ``peft.prepare_model_for_kbit_training`` (fp32 norms/embeddings, input grads for gradient
  checkpointing), LoRA on every linear layer (``target_modules="all-linear"``);
* ``TrainingArguments`` with the profile's optimizer (``paged_adamw_8bit`` on a GPU), bf16/fp16
  flags from the profile's compute dtype, max grad norm 0.3, a constant schedule after warm-up;
* :func:`run_sft`: notebook 04 in one call, with the health checks of :mod:`qlora_helpers.sft_checks`
  (LoRA gradients non-zero, loss finite, the 4-bit base byte-for-byte unchanged).

Every number of a run comes from one :class:`qlora_helpers.core.recipe.Recipe` (the kit's
:data:`~qlora_helpers.core.recipe.KIT_SFT`, the paper's :data:`~qlora_helpers.core.recipe.QLORA_PAPER`
presets). Data preparation lives in :mod:`qlora_helpers.sft_data`, throughput in
:mod:`qlora_helpers.throughput`.
"""
from __future__ import annotations

import math
import time

import torch
from transformers import Trainer, TrainingArguments

from .adapters import save_adapter
from .core.chat_data import padded_collator
from .core.evaluation import exact_match
from .core.qlora_model import prepare_qlora_model
from .core.recipe import KIT_SFT, Recipe, recipe_for
from .core.runtime import load_model, load_task_dataset, load_tokenizer
from .memory import KNOWN_CONFIGS, estimate_memory
from .sft_checks import TrainingHealthCallback
from .sft_data import packed_collator, tokenize_dataset


# ----------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------
def lora_config(r: int = KIT_SFT.r, lora_alpha: float = KIT_SFT.lora_alpha,
                lora_dropout: float = KIT_SFT.lora_dropout):
    """A PEFT ``LoraConfig`` on all linear layers (QLoRA's choice; the output head excluded):
    :data:`qlora_helpers.core.recipe.KIT_SFT` with these three numbers, checked there.

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

    From ``recipe`` (default :func:`qlora_helpers.core.recipe.recipe_for` the profile): learning rate,
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
              # transformers 5 renamed gradient_checkpointing*: the old names still work and warn (FutureWarning)
              activation_checkpointing=recipe.gradient_checkpointing,
              activation_checkpointing_kwargs={"use_reentrant": False} if recipe.gradient_checkpointing else None,
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
    return TrainingArguments(**training_kwargs(profile, output_dir, recipe, **overrides))


# ----------------------------------------------------------------------------------------------
# The whole lesson in one call: any model of the kit, the GPU capstone included
# ----------------------------------------------------------------------------------------------
def run_sft(profile, output_dir: str, recipe: Recipe | None = None, n_test: int = 100,
            max_new_tokens: int = 12, log=print, adapter_dir=None, quant_storage=None, **trainer_overrides) -> dict:
    """Notebook 04 in one call, on ``profile``'s model: the date task, exact match of the 4-bit base
    on ``n_test`` held-out dates, QLoRA training with ``Trainer`` from ``recipe`` (default: the
    profile's), exact match after, the wall time and, on a GPU, the peak memory next to the
    planner's estimate for the same run (:func:`qlora_helpers.memory.estimate_memory` with no
    overhead allowance, as ``max_memory_allocated`` sees no CUDA context).

    The capstone of notebook 04 calls it on a 7B model on a T4 (``$QLORA_KIT_CAPSTONE``); the tests
    call it on the tiny model; :mod:`qlora_helpers.train` calls it in every process of a launch.

    Args:
        n_test: held-out rows for exact match before and after; 0 skips both (the other processes of
            a launch: only the first one evaluates).
        adapter_dir: where :func:`qlora_helpers.adapters.save_adapter` writes the trained adapter (by
            the first process only), or None.
        quant_storage: the dtype of the stored 4-bit codes (:func:`qlora_helpers.core.runtime.load_model`).
        trainer_overrides: keyword arguments for :func:`training_arguments` (a launch's
            per-device batch).

    Returns:
        a dict: ``model``, ``steps``, ``em_before``, ``em_after`` (None with ``n_test=0``), ``losses``
        (logged), ``train_seconds``, ``peak_bytes`` (None on the CPU), ``planned_bytes``, ``seq_len``,
        ``world_size``, ``distributed_type`` (accelerate's), ``wrapped`` (the class ``Trainer`` trained:
        ``DistributedDataParallel``, ``FullyShardedDataParallel``, or the model's own), ``adapter_dir``.
    """
    recipe = recipe or recipe_for(profile)
    tok = load_tokenizer(profile)
    ds = load_task_dataset(profile)
    train_ds = tokenize_dataset(ds["train"], tok)
    test_rows = ds["test"].select(range(n_test))
    seq_len = max(len(x) for x in train_ds["input_ids"])
    if profile.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(recipe.seed)
    base = load_model(profile, quant_storage=quant_storage)
    em_before = em_after = None
    if n_test:
        em_before, _ = exact_match(base, tok, test_rows, max_new_tokens=max_new_tokens)
        log(f"{profile.model}: exact match before training {em_before:.2f} ({n_test} test dates)")
    model = prepare_qlora_model(base, recipe)
    health = TrainingHealthCallback(model)
    collator = padded_collator(tok, None) if profile.device == "cpu" else packed_collator()
    trainer = Trainer(model=model, args=training_arguments(profile, output_dir, recipe, **trainer_overrides),
                      train_dataset=train_ds, data_collator=collator, callbacks=[health])
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    if adapter_dir is not None and trainer.is_world_process_zero():
        save_adapter(model, adapter_dir, recipe)
    if n_test:
        em_after, _ = exact_match(model, tok, test_rows, max_new_tokens=max_new_tokens)
    log(f"{profile.model}: {recipe.steps} steps in {seconds:.0f} s"
        + (f", exact match after {em_after:.2f}" if n_test else ""))
    peak = torch.cuda.max_memory_allocated() if profile.device == "cuda" else None
    planner_name = profile.model if profile.model in KNOWN_CONFIGS else profile.model_files()
    plan = estimate_memory(planner_name, "qlora", r=recipe.r, batch_size=recipe.batch_size, seq_len=seq_len,
                           gradient_checkpointing=recipe.gradient_checkpointing,
                           optimizer=profile.optimizer,
                           cuda_context_gib=0, fragmentation=0)
    return {"model": profile.model, "steps": recipe.steps, "em_before": em_before, "em_after": em_after,
            "losses": [h["loss"] for h in health.history], "train_seconds": seconds, "peak_bytes": peak,
            "planned_bytes": plan.total, "seq_len": seq_len, "world_size": trainer.args.world_size,
            "distributed_type": str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1],
            "wrapped": type(trainer.model_wrapped).__name__, "adapter_dir": None if adapter_dir is None else str(adapter_dir)}
