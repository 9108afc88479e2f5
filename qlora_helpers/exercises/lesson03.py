"""Checkers for notebook 03's exercises (double quantization), on the protocol of
:mod:`qlora_helpers.exercises`; the bytes bitsandbytes really stores are the oracle."""
from __future__ import annotations

import math

import torch
from bitsandbytes.functional import quantize_4bit

from ..double_quant import bits_per_param, measured_bytes
from . import attempted, expect


def check_bits_per_param_dq(blocksize: int, answer) -> bool | None:
    """Exercise 1: bits per parameter with double quantization at NF4 block ``blocksize`` (DQ 256)."""
    if not attempted(answer, "Exercise 1"):
        return None   # waiting: nothing to display below the hint
    want = bits_per_param(blocksize, True)
    expect(math.isclose(float(answer), want, rel_tol=1e-9), f"got {answer}, want 4 + 8/{blocksize} + 32/({blocksize}*256): a 4-bit code, an 8-bit constant "
        f"shared by {blocksize} weights, an fp32 scale shared by {blocksize}*256")
    print(f"Exercise 1: correct, {want:.6f} bits per parameter at blocksize {blocksize}.")
    return True


def check_layer_bytes(shape: tuple[int, int], answer) -> bool | None:
    """Exercise 2: total bytes bitsandbytes stores for an NF4+DQ weight of ``shape``."""
    if not attempted(answer, "Exercise 2"):
        return None   # waiting: nothing to display below the hint
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    packed, state = quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    want = sum(measured_bytes(packed, state).values())
    expect(int(answer) == want, f"got {answer}, bitsandbytes holds {want} bytes: packed codes, uint8 constants, fp32 scales "
        f"per 256 constants, the 256-entry map, the offset and the 16-entry NF4 table")
    print(f"Exercise 2: correct, {want:,} bytes for a {shape[0]}x{shape[1]} layer.")
    return True
