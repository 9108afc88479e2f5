"""Checkers for notebook 03's exercises (double quantization), on the protocol of
:mod:`qlora_helpers.exercises`; the bytes bitsandbytes really stores are the oracle."""
from __future__ import annotations

import math

import torch
from bitsandbytes.functional import quantize_4bit

from ..double_quant import bits_per_param, measured_bytes, storage_bytes
from ..memory import estimate_memory, will_it_fit
from . import attempted, call_without, expect, fresh_seed

# What exercise 2 asks the learner to write; calling one of these instead fails the check.
LIBRARY_BYTES = {"qlora_helpers.double_quant.storage_bytes": storage_bytes,
                 "qlora_helpers.double_quant.measured_bytes": measured_bytes,
                 "qlora_helpers.double_quant.bits_per_param": bits_per_param,
                 "bitsandbytes.functional.quantize_4bit": quantize_4bit}


def check_bits_per_param_dq(blocksize: int, answer) -> bool | None:
    """Exercise 1: bits per parameter with double quantization at NF4 block ``blocksize`` (DQ 256)."""
    if not attempted(answer, "Exercise 1"):
        return None   # waiting: nothing to display below the hint
    want = bits_per_param(blocksize, True)
    expect(math.isclose(float(answer), want, rel_tol=1e-9), f"got {answer}, want 4 + 8/{blocksize} + 32/({blocksize}*256): a 4-bit code, an 8-bit constant "
        f"shared by {blocksize} weights, an fp32 scale shared by {blocksize}*256")
    print(f"Exercise 1: correct, {want:.6f} bits per parameter at blocksize {blocksize}.")
    return True


def check_stored_bytes(stored_bytes_fn) -> bool | None:
    """Exercise 2: ``stored_bytes_fn(numel, blocksize, double_quant) -> int``, the total bytes bitsandbytes
    holds for one NF4 weight of ``numel`` values: checked against the tensors ``quantize_4bit`` really returns
    (:func:`qlora_helpers.double_quant.measured_bytes`) for random sizes (partial blocks included),
    blocksizes and both settings, drawn anew at every check; written by hand (:data:`LIBRARY_BYTES` may not
    be called)."""
    if not attempted(stored_bytes_fn, "Exercise 2"):
        return None   # waiting: nothing to display below the hint
    g = torch.Generator().manual_seed(fresh_seed())
    for dq in (True, False, True, False, True):
        numel = int(torch.randint(1_000, 300_000, (1,), generator=g))
        blocksize = (64, 128, 256)[int(torch.randint(0, 3, (1,), generator=g))]
        packed, state = quantize_4bit(torch.randn(numel, generator=g), blocksize=blocksize, quant_type="nf4",
                                      compress_statistics=dq)
        want = sum(measured_bytes(packed, state).values())
        got = call_without(stored_bytes_fn, LIBRARY_BYTES, "Exercise 2", numel, blocksize, dq)
        if not attempted(got, "Exercise 2"):
            return None   # waiting: nothing to display below the hint
        expect(int(got) == want, f"numel={numel:,}, blocksize {blocksize}, double_quant={dq}: got {int(got):,} bytes, "
                                 f"bitsandbytes holds {'more' if want > got else 'fewer'}. Count each tensor it keeps; "
                                 f"is the last block partial?")
    print("Exercise 2: correct on 5 random weights (sizes, blocksizes, with and without double quantization).")
    return True


def check_longest_fit(answer) -> bool | None:
    """Exercise 3: the longest sequence (a multiple of 512, up to 16384) at which Llama-2-7B QLoRA (r=16 on
    all linear layers, batch 1, paged 8-bit AdamW) fits a T4 *without* gradient checkpointing, by the
    kit's planner (:func:`qlora_helpers.memory.estimate_memory`)."""
    if not attempted(answer, "Exercise 3"):
        return None   # waiting: nothing to display below the hint

    def plan(seq_len: int, ckpt: bool):
        est = estimate_memory("llama-2-7b", "qlora", 16, "all-linear", 1, seq_len, ckpt, "paged_adamw_8bit")
        return est, will_it_fit(est, "t4")
    fitting = [s for s in range(512, 16384 + 1, 512) if plan(s, False)[1].fits]
    want = max(fitting) if fitting else 0
    expect(int(answer) % 512 == 0, f"{answer} is not a multiple of 512")
    est, fit = plan(int(answer), False)
    expect(int(answer) == want, f"at seq_len {int(answer)} without checkpointing the plan {fit}; "
                                f"{'try longer' if fit.fits else 'try shorter'}")
    with_ckpt = max(s for s in range(512, 16384 + 1, 512) if plan(s, True)[1].fits)
    print(f"Exercise 3: correct, {want} tokens without gradient checkpointing; with it, {with_ckpt}. "
          f"Compare the two tables' activation rows.")
    return True
