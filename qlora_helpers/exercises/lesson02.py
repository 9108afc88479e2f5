"""Checkers for notebook 02's exercises (NF4 from normal quantiles), on the protocol of
:mod:`qlora_helpers.exercises`; bitsandbytes is the oracle where it has the answer."""
from __future__ import annotations

import math
from typing import Callable

import torch
from bitsandbytes.functional import get_4bit_type, quantize_4bit

from ..nf4 import (
    DEFAULT_BLOCKSIZE,
    NF4_OFFSET,
    blockwise_bits_per_param,
    fp4_levels,
    int4_levels,
    nf4_levels,
    pack_nibbles,
    paper_offset,
    quantization_error,
    quantize_nf4,
)
from . import attempted, call_without, expect, fresh_seed


def check_nf4_level_count(levels) -> bool | None:
    """Exercise 1: build the 16 NF4 levels yourself (any float32 tensor (16,)); they must be
    bitsandbytes' table exactly."""
    if not attempted(levels, "Exercise 1"):
        return None   # waiting: nothing to display below the hint
    levels = torch.as_tensor(levels)
    expect(levels.numel() == 16, f"NF4 has 16 levels (4 bits), got {levels.numel()}")
    neg, zero, pos = int((levels < 0).sum()), int((levels == 0).sum()), int((levels > 0).sum())
    expect((neg, zero, pos) == (7, 1, 8), f"want 7 negative, 1 zero, 8 positive levels, got {neg}, {zero}, {pos}: positive side "
        f"linspace(offset, 0.5, 9), negative side linspace(offset, 0.5, 8), each without its 0.5")
    want = get_4bit_type("nf4", device="cpu")
    got = levels.float().sort().values
    expect(torch.equal(got, want), f"close but not bit-exact (max diff {(got - want).abs().max().item():.2e}): float32 "
        f"probabilities, ndtri in float64, round each quantile to float32, divide in float32")
    print("Exercise 1: correct, 7 + 1 + 8 levels, bit for bit bitsandbytes' NF4 table.")
    return True


def check_offset(offset) -> bool | None:
    """Exercise 2: the offset from the paper's reasoning (15 and 16 equal-probability bins)."""
    if not attempted(offset, "Exercise 2"):
        return None   # waiting: nothing to display below the hint
    expect(abs(float(offset) - paper_offset()) < 1e-12, f"got {offset}; the last of k equal-probability bins is centred at 1 - 1/(2k): average "
        f"k = 15 and k = 16")
    print(f"Exercise 2: correct, {float(offset):.10f}; bitsandbytes writes it as {NF4_OFFSET}.")
    return True


# What exercise 3 asks the learner to write; calling one of these instead fails the check.
LIBRARY_PACK = {"qlora_helpers.nf4.pack_nibbles": pack_nibbles, "qlora_helpers.nf4.quantize_nf4": quantize_nf4,
                "bitsandbytes.functional.quantize_4bit": quantize_4bit}


def check_pack(pack_fn: Callable[[torch.Tensor], torch.Tensor]) -> bool | None:
    """Exercise 3: ``pack_fn(codes int64 (n,)) -> uint8 (ceil(n/2),)`` in bitsandbytes' order, checked
    against ``quantize_4bit`` on values that sit exactly on NF4 levels; random codes and counts (odd and
    even) drawn anew at every check; written by hand (:data:`LIBRARY_PACK` may not be called)."""
    if not attempted(pack_fn, "Exercise 3"):
        return None   # waiting: nothing to display below the hint
    g = torch.Generator().manual_seed(fresh_seed())
    for parity in (0, 1, 0, 1):
        n = 2 * int(torch.randint(8, 200, (1,), generator=g)) + parity   # even, then odd counts
        codes = torch.randint(0, 16, (n,), generator=g)
        codes[::DEFAULT_BLOCKSIZE] = 15  # level 1.0 in every block: its absmax is 1, so the codes are kept
        want = quantize_4bit(nf4_levels()[codes], blocksize=DEFAULT_BLOCKSIZE, quant_type="nf4")[0].reshape(-1)
        got = call_without(pack_fn, LIBRARY_PACK, "Exercise 3", codes.clone())
        if not attempted(got, "Exercise 3"):
            return None   # waiting: nothing to display below the hint
        got = torch.as_tensor(got).reshape(-1)
        expect(got.dtype == torch.uint8 and got.numel() == want.numel(),
               f"n={n}: want uint8 with {want.numel()} bytes, got {got.dtype} with {got.numel()}")
        expect(torch.equal(got, want), f"n={n}: bytes differ from bitsandbytes (first {got[:2].tolist()} vs "
                                       f"{want[:2].tolist()}): which code goes in the high nibble, and what pads an odd count?")
    print("Exercise 3: correct on 4 random code sequences (odd and even counts): your bytes are bitsandbytes' bytes.")
    return True


def check_bits_per_param(blocksize: int, answer) -> bool | None:
    """Exercise 4: bits per parameter for NF4 with one fp32 absmax per ``blocksize`` values."""
    if not attempted(answer, "Exercise 4"):
        return None   # waiting: nothing to display below the hint
    want = blockwise_bits_per_param(blocksize)
    expect(math.isclose(float(answer), want), f"got {answer}, want 4 bits per code plus 32 bits shared by {blocksize} values")
    print(f"Exercise 4: correct, {want} bits per parameter at blocksize {blocksize}.")
    return True


def check_uniform_winner(answer) -> bool | None:
    """Exercise 5: which table ("nf4", "fp4" or "int4") has the lowest error on uniform weights
    (blocksize 64)? NF4 is built for normal data; the answer says what it gives up."""
    if not attempted(answer, "Exercise 5"):
        return None   # waiting: nothing to display below the hint
    g = torch.Generator().manual_seed(5)
    w = torch.rand(1 << 16, generator=g) * 2 - 1  # (65536,) uniform on [-1, 1]
    tables = {"nf4": nf4_levels(), "fp4": fp4_levels(), "int4": int4_levels()}
    errors = {name: quantization_error(w, lv)["rel_rmse"] for name, lv in tables.items()}
    best = min(errors, key=errors.get)
    expect(str(answer).lower() == best, f"{answer!r} has relative RMSE {errors.get(str(answer).lower(), float('nan')):.4f}; measure "
        f"all three with quantization_error and compare")
    print(f"Exercise 5: correct, {best} ({errors[best]:.4f} vs NF4 {errors['nf4']:.4f}): evenly "
          f"spaced levels suit evenly spread values; NF4 spends its levels where normal weights are.")
    return True
