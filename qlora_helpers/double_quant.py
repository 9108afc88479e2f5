"""Double quantization: the NF4 block scales quantized again, bit for bit equal to bitsandbytes.

What it teaches (notebook ``03_double_quant_memory``):

1. Why: NF4 stores one fp32 absmax per 64 weights, 32/64 = 0.5 bit per parameter on top of the
   4-bit codes (12.5% more). QLoRA quantizes those constants a second time (section 3, "Double
   Quantization"): subtract their mean (the *offset*, they are all positive), then blockwise 8-bit
   quantization in blocks of 256 with bitsandbytes' signed *dynamic* map, one fp32 scale per 256
   constants. Cost: 8/64 + 32/(64*256) = 0.127 bit per parameter, a saving of 0.373
   (:func:`bits_per_param`).
2. The dynamic map (:func:`dynamic_map`): 8-bit codes whose magnitudes span 1e-7 .. 1 on a
   log-like scale (an exponent of 0..6 zeros, then a linear fraction), built here and checked equal
   to ``bitsandbytes.functional.create_dynamic_map()``.
3. The exact bytes bitsandbytes stores per layer (:func:`storage_bytes`, :func:`measured_bytes`).

Paper: QLoRA, Dettmers et al. 2023, arXiv:2305.14314, section 3; the dynamic map: Dettmers 2015,
arXiv:1511.04561.

Production code it is checked against (bitsandbytes 0.50.2, CPU): ``quantize_4bit(w,
quant_type="nf4", compress_statistics=True)`` (``state.absmax``, ``state.state2.absmax``,
``state.state2.code``, ``state.offset``) and ``dequantize_4bit``; ``tests/test_double_quant.py``
asserts equality to the byte. The behaviour reproduced, each pinned by a test:

Note (offset): the offset is ``absmax.mean()`` in float32, computed by torch, one 0-d fp32 tensor.
Note (LUT): bitsandbytes' CPU kernel does not search the 256 codes for the nearest one. It scales a
    value by ``x * (1 / absmax)``, maps it to one of 65536 evenly spaced bins over [-1, 1] with
    ``int(((v + 1) * 0.5) * 65535 + 0.5)`` (float32, truncated), and reads the code from a table
    built once per code map: bin value ``-1 + 2i/65535``, code = number of code midpoints below it.
    The bins are 3.05e-5 wide, wider than the gaps between the smallest dynamic-map values, so some
    codes near zero can never be produced and a value can get a code that is not its nearest.
    A nearest-code search (``torch.bucketize`` on the midpoints) disagrees on ~0.2% of constants.
Note (zero block): a block of 256 centred constants that are all exactly 0 gets absmax 0 and codes 0
    (it happens when every absmax is equal, e.g. a weight matrix of one repeated value).
Note (GPU): the CUDA kernel uses a binary search with its own rounding; codes can differ by one
    step from the CPU's now and then. The bytes stored are the same in number either way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from . import nf4

__all__ = [
    "DQ_BLOCKSIZE", "LUT_SIZE", "DoubleQuantState", "dynamic_map", "quantize_lut",
    "quantize_blockwise_8bit", "dequantize_blockwise_8bit", "double_quantize", "dequantize_absmax",
    "quantize_nf4_dq", "dequantize_nf4_dq", "bits_per_param", "storage_bytes", "measured_bytes",
]

DQ_BLOCKSIZE = 256  # constants per second-level block (bitsandbytes' and the paper's choice)
LUT_SIZE = 65536    # bins of bitsandbytes' CPU lookup table over [-1, 1] (Note: LUT)


@dataclass
class DoubleQuantState:
    """What double quantization keeps for one weight matrix (bitsandbytes' names in brackets).

    qabsmax: uint8 (n_blocks,), the 8-bit codes of ``absmax - offset`` [``state.absmax``].
    absmax2: float32 (ceil(n_blocks / 256),), one scale per 256 constants [``state.state2.absmax``].
    code: float32 (256,), the dynamic map [``state.state2.code``].
    offset: float32 0-d, the mean of the original absmax [``state.offset``].
    """
    qabsmax: torch.Tensor
    absmax2: torch.Tensor
    code: torch.Tensor
    offset: torch.Tensor
    dq_blocksize: int = DQ_BLOCKSIZE


# ---------------------------------------------------------------------------------------------
# 1. The dynamic 8-bit map
# ---------------------------------------------------------------------------------------------
def dynamic_map(max_exponent_bits: int = 7) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map: 256 float32 values over [-0.99297, 1], sorted.

    For exponent ``i = 0..6`` the values ``10**(i - 6) * m`` and their negatives, where ``m`` are
    the ``2**i`` midpoints of ``linspace(0.1, 1, 2**i + 1)``: 2 * (1 + 2 + ... + 64) = 254 values,
    plus 0 and 1.0. Small magnitudes get few, coarse codes; values near 1 get 64 each side.

    Args:
        max_exponent_bits: 7, bitsandbytes' default for 8 bits (signed).
    Returns:
        float32 (256,), ascending, equal to ``create_dynamic_map(signed=True)``.
    """
    data: list[float] = []
    for i in range(max_exponent_bits):
        boundaries = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)  # (2**i + 1,)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0                      # (2**i,)
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()     # positive
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()    # negative
    data += [0.0, 1.0]
    if len(data) != 256:  # 7 exponent bits of (2**i) means, both signs, plus 0 and 1
        raise ValueError(f"dynamic_map builds 256 values only with max_exponent_bits=7, got {len(data)}")
    return torch.tensor(sorted(data), dtype=torch.float32)                    # (256,)


def quantize_lut(code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU lookup table (Note: LUT): bin ``i`` of 65536 over [-1, 1] -> a code.

    Args:
        code: float32 (256,) ascending.
    Returns:
        int64 (65536,): the number of float32 code midpoints strictly below ``-1 + 2i/65535``.
    """
    mids = 0.5 * (code[:-1] + code[1:])                                # (255,) float32
    i = torch.arange(LUT_SIZE, dtype=torch.float32, device=code.device)  # (65536,) on the code's device
    values = -1.0 + (2.0 * i) / (LUT_SIZE - 1)                          # (65536,) float32
    return torch.searchsorted(mids, values, side="left")                # (65536,)


# ---------------------------------------------------------------------------------------------
# 2. Blockwise 8-bit quantization (bitsandbytes' CPU kernel)
# ---------------------------------------------------------------------------------------------
def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor | None = None,
                            blocksize: int = DQ_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise absmax quantization, as ``bitsandbytes.functional.quantize_blockwise`` on CPU.

    Args:
        x: float32 (n,), finite.
        code: float32 (256,) ascending; default the dynamic map.
        blocksize: values per block (256 for double quantization).
    Returns:
        codes uint8 (n,), absmax float32 (ceil(n / blocksize),).
    """
    x = x.reshape(-1).float()                                          # (n,)
    code = (dynamic_map() if code is None else code).to(x.device)      # (256,) the table follows the data (GPU)
    absmax = nf4.block_absmax(x, blocksize, floor_partial=False)       # (n_blocks,)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))  # (Note: zero block)
    per_value = torch.arange(x.numel(), device=x.device) // blocksize  # (n,) block of each value
    v = (x * inv[per_value]).clamp(-1, 1)                              # (n,) multiply, not divide
    bins = (((v + 1.0) * 0.5) * (LUT_SIZE - 1) + 0.5).long()           # (n,) truncation, float32 math
    codes = quantize_lut(code)[bins]                                   # (n,)
    codes[(absmax == 0)[per_value]] = 0                                # (Note: zero block)
    return codes.to(torch.uint8), absmax


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                              blocksize: int = DQ_BLOCKSIZE) -> torch.Tensor:
    """``code[q] * absmax`` of its block, float32 (n,): bitsandbytes' ``dequantize_blockwise``."""
    per_value = torch.arange(codes.numel(), device=codes.device) // blocksize  # (n,)
    return code.to(codes.device)[codes.reshape(-1).long()] * absmax.to(codes.device)[per_value]  # (n,)


# ---------------------------------------------------------------------------------------------
# 3. Double quantization of the NF4 constants
# ---------------------------------------------------------------------------------------------
def double_quantize(absmax: torch.Tensor, dq_blocksize: int = DQ_BLOCKSIZE) -> DoubleQuantState:
    """Quantize the fp32 NF4 block constants to 8 bits (QLoRA's double quantization).

    Args:
        absmax: float32 (n_blocks,), one per NF4 block, all >= 0.
        dq_blocksize: constants per second-level block (256).
    Returns:
        :class:`DoubleQuantState`, equal field by field to bitsandbytes' nested quant state.
    """
    offset = absmax.mean()                                             # 0-d fp32 (Note: offset)
    code = dynamic_map().to(absmax.device)                             # (256,)
    qabsmax, absmax2 = quantize_blockwise_8bit(absmax - offset, code, dq_blocksize)
    return DoubleQuantState(qabsmax, absmax2, code, offset, dq_blocksize)


def dequantize_absmax(state: DoubleQuantState) -> torch.Tensor:
    """The NF4 constants back: ``code[q] * absmax2 + offset``, float32 (n_blocks,)."""
    return dequantize_blockwise_8bit(state.qabsmax, state.absmax2, state.code,
                                     state.dq_blocksize) + state.offset


def quantize_nf4_dq(w: torch.Tensor, blocksize: int = nf4.DEFAULT_BLOCKSIZE
                    ) -> tuple[torch.Tensor, DoubleQuantState]:
    """NF4 with double quantization: ``quantize_4bit(w, quant_type="nf4", compress_statistics=True)``.

    Args:
        w: any shape, float32/float16/bfloat16, finite.
        blocksize: NF4 block (64).
    Returns:
        packed uint8 (ceil(n / 2),) (the same bytes as without double quantization) and the state.
    """
    packed, absmax = nf4.quantize_nf4(w, blocksize)                    # (ceil(n/2),), (n_blocks,)
    return packed, double_quantize(absmax)


def dequantize_nf4_dq(packed: torch.Tensor, state: DoubleQuantState, shape: Sequence[int],
                      blocksize: int = nf4.DEFAULT_BLOCKSIZE,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Undo :func:`quantize_nf4_dq`: NF4 codes times the *dequantized* constants (``dequantize_4bit``)."""
    return nf4.dequantize_nf4(packed, dequantize_absmax(state), shape, blocksize, dtype)


# ---------------------------------------------------------------------------------------------
# 4. Bits and bytes
# ---------------------------------------------------------------------------------------------
def bits_per_param(blocksize: int = nf4.DEFAULT_BLOCKSIZE, double_quant: bool = True, dq_blocksize: int = DQ_BLOCKSIZE) -> float:
    """Storage per weight in the limit of a large matrix.

    >>> bits_per_param(64, False), bits_per_param(64, True)  # the QLoRA paper: 4.5 and 4.127
    (4.5, 4.126953125)

    Args:
        blocksize: weights per NF4 absmax (64).
        double_quant: whether the absmax are stored as 8-bit codes with fp32 second-level scales.
        dq_blocksize: absmax per second-level scale (256).
    Returns:
        bits per parameter. Leaves out per-layer constants (code table, offset): see storage_bytes.
    """
    for name, value in (("blocksize", blocksize), ("dq_blocksize", dq_blocksize)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}; the QLoRA defaults are 64 and 256")
    if not double_quant:
        return nf4.blockwise_bits_per_param(blocksize)                           # 4 + 32/64 = 4.5
    absmax_bits = 8 + 32 / dq_blocksize                                # an 8-bit code, plus its share of one fp32 per 256
    return nf4.blockwise_bits_per_param(blocksize, absmax_bits=absmax_bits)      # 4 + 8/64 + 32/(64*256) = 4.127


def storage_bytes(numel: int, blocksize: int = nf4.DEFAULT_BLOCKSIZE, double_quant: bool = True,
                  dq_blocksize: int = DQ_BLOCKSIZE) -> dict[str, int]:
    """The exact bytes bitsandbytes keeps for one NF4 weight of ``numel`` values.

    Args:
        numel: weights in the matrix (e.g. 4096 * 11008).
        blocksize, double_quant, dq_blocksize: as in :func:`bits_per_param`.
    Returns:
        bytes per tensor: ``packed`` ceil(n/2) uint8; ``absmax`` one per block (uint8 with DQ, fp32
        without); with DQ ``absmax2`` fp32 per 256 blocks, ``code2`` the 256-entry fp32 map
        (1024 B) and ``offset`` one fp32; ``code`` the 16-entry fp32 NF4 table (64 B) either way.
        ``code2``, ``offset`` and ``code`` are per layer: the per-parameter formula leaves them out.
    """
    if not isinstance(numel, int) or numel <= 0:
        raise ValueError(f"numel must be a positive int, got {numel!r}")
    n_blocks = -(-numel // blocksize)                                  # NF4 blocks, the last may be partial
    out = {"packed": -(-numel // 2)}                                   # two 4-bit codes per byte
    if double_quant:
        out["absmax"] = n_blocks * 1                                   # uint8 code per block
        out["absmax2"] = -(-n_blocks // dq_blocksize) * 4              # fp32 per 256 blocks
        out["code2"] = 256 * 4                                         # the dynamic map, fp32
        out["offset"] = 4                                              # the mean, one fp32
    else:
        out["absmax"] = n_blocks * 4                                   # fp32 per block
    out["code"] = 16 * 4                                               # NF4 table, fp32
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measured_bytes(packed: torch.Tensor, quant_state) -> dict[str, int]:
    """The bytes of the tensors bitsandbytes actually holds for one 4-bit weight.

    Args:
        packed: the packed weight (``Linear4bit.weight.data`` or ``quantize_4bit``'s first output).
        quant_state: its ``bitsandbytes.functional.QuantState``.
    Returns:
        the same keys as :func:`storage_bytes`, each ``numel * element_size`` of the real tensor.
    """
    out = {"packed": _nbytes(packed), "absmax": _nbytes(quant_state.absmax)}
    if quant_state.nested:
        out["absmax2"] = _nbytes(quant_state.state2.absmax)
        out["code2"] = _nbytes(quant_state.state2.code)
        out["offset"] = _nbytes(quant_state.offset)
    out["code"] = _nbytes(quant_state.code)
    return out
