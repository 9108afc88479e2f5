"""Is it really training? The checks a ``Trainer`` run gets, and what they record.

What it teaches: a fine-tuning run can go through the motions and learn nothing (no gradient
reaches the adapter, the loss is NaN, every label is masked, the "frozen" base changes). QLoRA's
promise is a frozen 4-bit base and a trained adapter (Dettmers et al., arXiv 2305.14314); these
checks prove both on every run of notebook 04 and the GPU self-check:

* :class:`TrainingHealthCallback`, a transformers ``TrainerCallback``: every LoRA weight gets a
  gradient, the loss is finite and not stuck at zero (:func:`qlora_helpers.core.training.check_loss`),
  and after training every LoRA weight moved while :func:`base_tensor_hashes` of the base did not;
* :class:`StopAtStep` (a simulated interruption) and :func:`lora_difference` (a resumed run equals an
  uninterrupted one);
* :func:`plot_training`: the loss and gradient-norm curves the callback recorded.
"""
from __future__ import annotations

import hashlib

import matplotlib.pyplot as plt
import torch
from transformers import TrainerCallback

from .core.training import TrainingAlarm, check_loss


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
    back (:mod:`qlora_helpers.core.cpu_layout`; ``load_model`` also switches the repack off).
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



def lora_difference(a, b) -> float:
    """Largest absolute difference between two models' LoRA weights (same adapter layout)."""
    pa, pb = lora_parameters(a, False), lora_parameters(b, False)
    if pa.keys() != pb.keys():
        raise ValueError(f"the models have different LoRA weights: {sorted(pa.keys() ^ pb.keys())[:4]}")
    return max((pa[n].detach() - pb[n].detach()).abs().max().item() for n in pa)
