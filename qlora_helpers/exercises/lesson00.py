"""Checkers for notebook 00's exercise (a model in 4 bits), on the protocol of
:mod:`qlora_helpers.exercises`. The oracle is what bitsandbytes stores: every tensor of each
layer's quantization state, as ``QuantState.as_dict`` lists them."""
from __future__ import annotations

import bitsandbytes as bnb
import torch

from ..core.runtime import load_model
from . import attempted, expect


def linear4bit_bytes(model) -> int:
    """Bytes of every ``Linear4bit`` weight: packed codes plus every tensor of its quantization state."""
    total = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            state = m.weight.quant_state.as_dict(packed=False).values()
            total += m.weight.numel() * m.weight.element_size()
            total += sum(t.numel() * t.element_size() for t in state if isinstance(t, torch.Tensor))
    return total


def check_no_dq_bytes(answer, profile) -> bool | None:
    """The 4-bit linear layers' bytes without double quantization (one fp32 scale per 64 weights)."""
    if not attempted(answer, "Exercise"):
        return None   # waiting: nothing to display below the hint
    want = linear4bit_bytes(load_model(profile, double_quant=False))
    expect(int(answer) == want, f"got {int(answer):,} bytes, bitsandbytes stores {want:,}: packed codes (half a byte "
                                f"per weight) plus one fp32 absmax per 64 weights plus the 16-entry NF4 table per layer")
    print(f"Exercise: correct, {want:,} bytes: each 64-weight block pays 32 bits for its scale instead of about 8.")
    return True
