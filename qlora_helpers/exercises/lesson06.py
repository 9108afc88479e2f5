"""Checkers for notebook 06's exercises (ablations), on the protocol of
:mod:`qlora_helpers.exercises`."""
from __future__ import annotations

from ..ablation_plan import TARGETS
from ..lora import llama_lora_param_count
from . import attempted, expect


def check_param_count(config, answer) -> bool | None:
    """Exercise 1: trainable LoRA parameters at r = 32 on the four attention projections."""
    if not attempted(answer, "Exercise 1"):
        return None   # waiting: nothing to display below the hint
    want = llama_lora_param_count(config, 32, TARGETS["attention"])
    expect(int(answer) == want, f"got {answer}; per layer and projection r * (in + out), summed over "
                                 f"q, k, v, o (k and v are narrower: grouped-query attention), times layers")
    print(f"Exercise 1: correct, {want:,} parameters.")
    return True


def check_rslora_scale(answer) -> bool | None:
    """Exercise 2: the r at which rsLoRA's alpha/sqrt(r) is 4x LoRA's alpha/r (any alpha)."""
    if not attempted(answer, "Exercise 2"):
        return None   # waiting: nothing to display below the hint
    expect(int(answer) == 16, f"got {answer}; solve (alpha / sqrt(r)) / (alpha / r) = sqrt(r) = 4")
    print("Exercise 2: correct, r = 16: the gap grows as sqrt(r).")
    return True
