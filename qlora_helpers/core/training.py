"""The kit's one training loop in plain PyTorch, and the alarms every training step passes.

What it teaches: a training step is five lines (set the learning rate, forward, backward, clip,
step), and the kit writes them once. Every plain-PyTorch training in the kit runs through
:func:`train_loop`: notebook 01's LoRA from scratch (:func:`qlora_helpers.lora.train_steps`), the
offline model's pretraining (:func:`qlora_helpers.core.tiny_model.pretrain`), notebook 05's stand-in
adapter and notebook 06's grid. What differs between them is a parameter, not a copy: the loss
(the model's own, or a hand-written one), the schedule (warm-up then constant, or cosine), the
clipping norm. transformers' ``Trainer`` (notebook 04) is the production way to the same loop.

:func:`check_loss` raises :class:`TrainingAlarm` on a loss that means training broke (NaN, inf,
exactly zero); :class:`saved_tensor_bytes` counts the activations autograd keeps for backward.
:func:`build_optimizer` is the one way the kit makes an optimizer, named as ``TrainingArguments.optim``
names it (:data:`OPTIMIZERS`), so the loop, ``Trainer``, the planner and the profiles share one vocabulary.
"""
from __future__ import annotations

import importlib
import math
import time
from contextlib import nullcontext
from typing import Callable, Iterable

import torch

from .recipe import Recipe


class TrainingAlarm(RuntimeError):
    """Training produced a value that means it is broken (NaN loss, a loss stuck at zero, ...)."""


def check_loss(loss: float, step: int, zero_tol: float = 1e-6) -> None:
    """Raise :class:`TrainingAlarm` if ``loss`` is NaN/inf or (near) zero; else return None.

    A cross-entropy of exactly 0 on language data means something broke, most often fp16: the
    loss overflows, the grad scaler skips steps and logs 0, or every label is -100.

    >>> check_loss(2.3, step=5)
    >>> check_loss(float("nan"), step=5)
    Traceback (most recent call last):
    qlora_helpers.core.training.TrainingAlarm: loss is nan at step 5. Likely fix: fp16 overflow -> use bf16 (compute capability >= 8) or fp32, lower the learning_rate, keep max_grad_norm (0.3) on; check the inputs, and that not every label is -100 (a mean over no labelled token is nan).
    """
    if not math.isfinite(loss):
        raise TrainingAlarm(
            f"loss is {loss} at step {step}. Likely fix: fp16 overflow -> use bf16 (compute capability "
            f">= 8) or fp32, lower the learning_rate, keep max_grad_norm (0.3) on; check the inputs, and that "
            f"not every label is -100 (a mean over no labelled token is nan).")
    if loss <= zero_tol:
        raise TrainingAlarm(
            f"loss is {loss} at step {step}: a language-model loss is never exactly 0. Likely fix: if "
            f"fp16, switch to bf16/fp32 (a known fp16 failure logs 0.0); check that not every label is "
            f"-100 (response-only masking with a too-short max_length).")


# The optimizers the kit uses, by their TrainingArguments.optim names (the one vocabulary), built as Trainer
# builds each name (tests/test_runtime.py checks it against transformers' own choice): module, class, settings.
OPTIMIZERS = {
    "adamw_torch": ("torch.optim", "AdamW", {}),                                    # fp32 states: 8 B a weight
    "adamw_8bit": ("bitsandbytes.optim", "AdamW", {"optim_bits": 8}),               # 8-bit states, blockwise
    "paged_adamw_8bit": ("bitsandbytes.optim", "AdamW", {"optim_bits": 8, "is_paged": True}),  # paged (CUDA)
}


def build_optimizer(name: str, params, lr: float, weight_decay: float = 0.0, **kwargs):
    """The optimizer called ``name`` (a key of :data:`OPTIMIZERS`) over ``params``.

    >>> import torch
    >>> type(build_optimizer("adamw_torch", [torch.nn.Parameter(torch.zeros(2))], lr=1e-3)).__name__
    'AdamW'

    Raises:
        ValueError: a name the kit does not use, with the ones it does.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is not one of the kit's ({', '.join(OPTIMIZERS)}); these are "
                         f"TrainingArguments.optim names")
    module, cls, settings = OPTIMIZERS[name]
    return getattr(importlib.import_module(module), cls)(params, lr=lr, weight_decay=weight_decay,
                                                         **settings, **kwargs)


def warmup_lr(step: int, lr: float, warmup: int = Recipe.warmup_steps) -> float:
    """Linear warm-up over ``warmup`` steps, then constant (the Trainer's ``constant_with_warmup``).

    >>> [warmup_lr(s, 1.0, 10) for s in (0, 4, 9, 100)]
    [0.1, 0.5, 1.0, 1.0]
    """
    return lr * min(1.0, (step + 1) / warmup) if warmup > 0 else lr


class saved_tensor_bytes:
    """Context manager: bytes of the tensors autograd saves for backward inside it (activations).

    ``torch.autograd.graph.saved_tensors_hooks`` sees every saved tensor; each storage is counted
    once (views share it) and parameters are skipped (they are held anyway), views of them too:
    ``F.linear`` saves ``weight.t()``, a view, not the parameter, and counting it would add every
    frozen weight of a 16- or 32-bit base to its "activations" (notebook 07 found it: LoRA on the
    fp32 SmolLM2 then seemed to save 555 MB more than QLoRA). Read ``.total`` after the block::

        with saved_tensor_bytes() as saved:
            loss = model(**batch).loss
        saved.total  # bytes kept until loss.backward()
    """

    def __init__(self):
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        if not isinstance(t, torch.nn.Parameter) and not isinstance(t._base, torch.nn.Parameter):
            s = t.untyped_storage()
            self._seen[s.data_ptr()] = s.nbytes()
        # detach(): the same storage, without t's grad_fn. Returning t itself makes a cycle through C++ for a
        # saved output (t -> its grad_fn -> t) that Python's gc cannot see: the graph, every activation and the
        # model behind it were never freed (notebook 07's job kept ~2 GB per run; torch's own warning in
        # torch.autograd.graph.saved_tensors_hooks).
        return t.detach()

    @property
    def total(self) -> int:
        return sum(self._seen.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False


def on_model_device(batch: dict, model) -> dict:
    """``batch``'s tensors moved to the device of ``model``'s parameters (a GPU in the gpu profile;
    batches are built on the CPU). Every function that runs a model on a batch calls it.

    >>> import torch
    >>> on_model_device({"input_ids": torch.ones(1, 2)}, torch.nn.Linear(2, 2))["input_ids"].device.type
    'cpu'
    """
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def model_loss(model, batch: dict):
    """The model's own loss on a batch (transformers shifts the labels and ignores -100)."""
    return model(**on_model_device(batch, model), use_cache=False).loss


def train_loop(model, optimizer, batches: Iterable[dict], lr: float, warmup: int = Recipe.warmup_steps,
               max_grad_norm: float | None = Recipe.max_grad_norm, count_activations: bool = False,
               loss_fn: Callable = model_loss, schedule: Callable[[int], float] | None = None,
               log: Callable | None = None, log_every: int = 100) -> dict:
    """One optimizer step per batch: set the learning rate, forward, backward, clip, step, check.

    Args:
        model: what to train (only parameters with ``requires_grad`` are clipped and stepped).
        optimizer: over those parameters. batches: dicts of tensors, moved to the model's device;
            a list or any iterable (a generator of random windows works).
        lr, warmup: the learning rate after a linear warm-up (:func:`warmup_lr`), unless
            ``schedule(step) -> lr`` is given. max_grad_norm: gradient clipping (the QLoRA
            paper's 0.3); None: no clipping.
        count_activations: count the bytes autograd saves for backward on the first step
            (:class:`saved_tensor_bytes`; slow, so once). loss_fn: ``loss_fn(model, batch)``.
        log, log_every: ``log(message)`` every ``log_every`` steps and at the last one.
    Returns:
        ``{"losses": [...], "activation_bytes": int (0 unless counted), "seconds": float}``. The
        model is left in train mode with the last step's gradients (for measuring their bytes).
    Raises:
        TrainingAlarm: a NaN, inf or zero loss (:func:`check_loss`).
    """
    schedule = schedule or (lambda step: warmup_lr(step, lr, warmup))
    model.train()
    losses, act, t0 = [], 0, time.perf_counter()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for step, batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)
        optimizer.zero_grad(set_to_none=True)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with saved_tensor_bytes() if (count_activations and step == 0) else nullcontext() as saved:
            loss = loss_fn(model, batch)
        act = saved.total if saved is not None else act
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        value = loss.item()
        check_loss(value, step)
        losses.append(value)
        if log is not None and step % log_every == 0:
            log(f"step {step:5d}  loss {value:.3f}  {time.perf_counter() - t0:.0f}s")
    if log is not None and losses:
        log(f"step {len(losses) - 1:5d}  loss {losses[-1]:.3f}  {time.perf_counter() - t0:.0f}s (last)")
    return {"losses": losses, "activation_bytes": act, "seconds": time.perf_counter() - t0}
