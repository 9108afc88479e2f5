"""NF4 (4-bit NormalFloat) built from normal quantiles, bit for bit equal to bitsandbytes.

What it teaches (notebook ``02_nf4_quantiles``):

1. Quantile quantization: give each of the 16 codes an equal share of the weights. Pretrained
   weights are close to normal, so after dividing a block by its absmax the quantiles can be
   computed once, for N(0, 1), instead of sorting every tensor.
2. The NF4 table: 8 positive and 7 negative normal quantiles plus an exact zero, taken between
   probabilities 0.5 and the offset 0.9677083 = ((1 - 1/(2*15)) + (1 - 1/(2*16))) / 2, divided by
   the largest so that they span [-1, 1] (:func:`nf4_levels`).
3. Blockwise absmax quantization: blocks of ``blocksize`` consecutive values (64 by default),
   one fp32 absmax per block, each value replaced by the code of its nearest level, two 4-bit
   codes per byte (:func:`quantize_nf4`, :func:`dequantize_nf4`).
4. Why NF4: its error against bitsandbytes' FP4 and a symmetric absmax int4 (15 levels) on
   normal data and on a model's weights; blocksize against error and bits per parameter.

Paper: QLoRA, Dettmers et al. 2023, arXiv:2305.14314, section 3 ("4-bit NormalFloat").

Production code it is checked against (bitsandbytes 0.50.2): ``bitsandbytes.functional.
get_4bit_type("nf4")`` (the hardcoded table), ``create_normal_map`` (the recipe that made it; it
needs scipy), ``quantize_4bit(..., quant_type="nf4", compress_statistics=False)`` and
``dequantize_4bit``. ``tests/test_nf4.py`` and the notebook assert equal bytes, equal absmax and
equal dequantized tensors. Dequantization is compared with bitsandbytes' *reference*
implementation (its generic ``_dequantize_4bit_compute``, :func:`bnb_reference_dequantize`),
because bitsandbytes 0.50.2's native CPU kernel is wrong on AVX-512 CPUs when a block spans two
rows; :func:`whose_defect` tells the cases apart (``TROUBLESHOOTING.md``, "dequantize_4bit on
AVX-512"). The behaviour of bitsandbytes this module reproduces, each pinned by a
test so that a version bump that changes it is noticed:

Note (offset): bitsandbytes uses the literal 0.9677083, the paper's 0.96770833... rounded to 7
    digits. The two are different float32 numbers, and 12 of the 16 levels differ (by up to 3e-7)
    if the exact fraction is used. The recipe is float32 probabilities (``torch.linspace``), the
    inverse normal CDF in float64, each quantile rounded to float32, then divided in float32.
Note (ties): a value is coded by comparing it with the 15 float32 midpoints between adjacent
    levels (``torch.bucketize``): a value exactly on a midpoint gets the *lower* code. An argmin
    over ``|x - level|`` disagrees on 6 of the 15 midpoints (float rounding of the distances).
Note (tail): full blocks are multiplied by ``1 / absmax``; the last, partial block is *divided*
    by its absmax. The two differ in the last bit now and then, which can flip a code. The partial
    block's stored absmax is also clamped to at least 1e-38 (an all-zero tail stores 1e-38, a full
    all-zero block stores 0); either way such a block dequantizes to exact zeros.
Note (nibbles): the first value of each pair goes in the high nibble: codes (15, 0) -> 0xF0. An odd
    count is padded with the code of 0.0 (7 in NF4): [1.0, -1.0, 0.0] -> bytes F0 77.
"""
from __future__ import annotations

import math
from typing import Sequence

import bitsandbytes.functional as bnbF
import torch
import torch.nn.functional as F
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from bitsandbytes.functional import get_4bit_type

__all__ = [
    "NF4_OFFSET", "DEFAULT_BLOCKSIZE", "ALLOWED_BLOCKSIZES", "FLOAT_DTYPES",
    "paper_offset", "normal_quantiles", "nf4_levels", "fp4_levels", "int4_levels", "midpoints",
    "check_blocksize", "check_weights", "block_absmax", "scale_to_unit", "nearest_codes",
    "quantize_codes", "dequantize_codes", "roundtrip", "pack_nibbles", "unpack_nibbles",
    "quantize_nf4", "dequantize_nf4", "quantization_error", "blockwise_bits_per_param", "code_entropy",
    "bnb_reference_dequantize", "whose_defect", "block_spans_rows",
]

NF4_OFFSET = 0.9677083  # bitsandbytes' literal (Note: offset)
DEFAULT_BLOCKSIZE = 64  # bitsandbytes' and the QLoRA paper's default
ALLOWED_BLOCKSIZES = tuple(2 ** k for k in range(5, 13))  # 32 ... 4096, what bitsandbytes 0.50 accepts
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what quantize_4bit accepts
TINY = 1e-38  # bitsandbytes' floor for absmax before dividing (Note: tail)


# ---------------------------------------------------------------------------------------------
# 1. The levels
# ---------------------------------------------------------------------------------------------
def paper_offset(n_neg_levels: int = 15, n_pos_levels: int = 16) -> float:
    """The outermost probability of the NF4 table, halfway between the symmetric choices for 15
    and 16 levels (bitsandbytes writes 0.9677083):

    >>> round(paper_offset(), 10)
    0.9677083333

    Quantile ``i`` of ``k`` equal-probability bins sits at probability ``(i + 1/2) / k``; the last
    one at ``1 - 1/(2k)``. Using it instead of 1 keeps the top level finite (ndtri(1) = inf).

    Args:
        n_neg_levels: k for one side (15: 7 negative levels + zero + 7 positive, symmetric).
        n_pos_levels: k for the other side (16 levels).
    Returns:
        ``((1 - 1/(2*15)) + (1 - 1/(2*16))) / 2`` as a Python float.
    """
    return ((1 - 1 / (2 * n_neg_levels)) + (1 - 1 / (2 * n_pos_levels))) / 2


def normal_quantiles(offset: float, n: int) -> torch.Tensor:
    """Quantiles of N(0, 1) at ``n`` evenly spaced probabilities from ``offset`` down to 0.5.

    >>> [round(q, 3) for q in normal_quantiles(0.9677083, 9).tolist()]
    [1.848, 1.336, 1.04, 0.814, 0.625, 0.455, 0.297, 0.147, 0.0]

    Args:
        offset: the largest probability, in (0.5, 1).
        n: how many probabilities (the last one is 0.5, whose quantile is 0).
    Returns:
        float32 tensor (n,), descending: probabilities in float32 as ``torch.linspace`` makes
        them, inverse CDF in float64, rounded to float32 (the recipe of ``create_normal_map``).
    """
    probs = torch.linspace(offset, 0.5, n)  # (n,) float32, like bitsandbytes
    return torch.special.ndtri(probs.double()).float()  # (n,)


def nf4_levels(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 levels: 7 negative and 8 positive normal quantiles plus an exact 0, over [-1, 1].

    Args:
        offset: the outermost probability (Note: offset); 0.9677083 gives bitsandbytes' table.
    Returns:
        float32 tensor (16,), ascending, ``levels[0] == -1``, ``levels[7] == 0``, ``levels[15] == 1``.
    """
    positive = normal_quantiles(offset, 9)[:-1]  # (8,) drop the quantile at 0.5 (= 0)
    negative = -normal_quantiles(offset, 8)[:-1]  # (7,) one level fewer on the negative side
    levels = torch.cat([negative, torch.zeros(1), positive]).sort().values  # (16,)
    return levels / levels.max()  # float32 division, as in create_normal_map


def fp4_levels() -> torch.Tensor:
    """bitsandbytes' FP4 values (1 sign, 2 exponent, 1 mantissa bit), sorted, over [-1, 1].

    The magnitudes are {0, 0.0625, 2, 3, 4, 6, 8, 12} / 12 (``get_4bit_type("fp4")`` lists them in
    bit-pattern order). +0 and -0 are both there, so only 15 values are distinct.

    Returns:
        float32 tensor (16,), ascending.
    """
    magnitudes = torch.tensor([0.0, 0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]) / 12.0  # (8,)
    return torch.cat([-magnitudes, magnitudes]).sort().values  # (16,)


def int4_levels() -> torch.Tensor:
    """Symmetric absmax int4: the 15 levels k/7 for k = -7..7 (bitsandbytes' "int4" table).
    The 16th code (-8) is left out so that +absmax and -absmax are both exact.

    Returns:
        float32 tensor (15,), ascending.
    """
    return torch.arange(-7, 8, dtype=torch.float32) / 7  # (15,)


def midpoints(levels: torch.Tensor) -> torch.Tensor:
    """Decision boundaries between adjacent levels. Args: levels (k,) ascending. Returns: (k - 1,)
    in the levels' dtype.

    >>> midpoints(torch.tensor([-1.0, 0.0, 1.0])).tolist()
    [-0.5, 0.5]
    """
    return (levels[:-1] + levels[1:]) / 2  # (k - 1,)


# ---------------------------------------------------------------------------------------------
# 2. Checks that fail loudly
# ---------------------------------------------------------------------------------------------
def check_blocksize(blocksize: int) -> None:
    """Raise ``ValueError`` unless ``blocksize`` is one of 32, 64, ..., 4096."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in ALLOWED_BLOCKSIZES:
        raise ValueError(
            f"blocksize must be an int power of two from 32 to 4096 (one of "
            f"{', '.join(map(str, ALLOWED_BLOCKSIZES))}: what bitsandbytes 0.50 accepts), "
            f"got {blocksize!r}; the QLoRA default is 64")


def check_weights(w: torch.Tensor) -> None:
    """Raise ``ValueError`` for a tensor quantize_nf4 cannot code faithfully.

    Args:
        w: must be float32, float16 or bfloat16, non-empty, without NaN or Inf (bitsandbytes
            would silently give the whole block an absmax of NaN or Inf).
    """
    if w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"NF4 quantizes float32, float16 or bfloat16 weights, got dtype {w.dtype}; "
                         f"convert first, e.g. w.float()")
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(w.shape)})")
    n_nan, n_inf = int(torch.isnan(w).sum()), int(torch.isinf(w).sum())
    if n_nan or n_inf:
        raise ValueError(
            f"weights contain {n_nan} NaN and {n_inf} Inf values (shape {tuple(w.shape)}); their "
            f"blocks would get absmax NaN/Inf and decode to garbage. Find where they come from "
            f"(torch.nan_to_num only if replacing them is right)")


# ---------------------------------------------------------------------------------------------
# 3. Blockwise absmax quantization to any table of levels
# ---------------------------------------------------------------------------------------------
def block_absmax(flat: torch.Tensor, blocksize: int, floor_partial: bool = True) -> torch.Tensor:
    """The largest |value| of each block of ``blocksize`` consecutive values: the one blockwise
    absmax of the kit (NF4 here, the 8-bit constants of :mod:`qlora_helpers.double_quant`).

    Args:
        flat: float32 (n,); the last block may be partial.
        blocksize: values per block.
        floor_partial: floor a partial last block at 1e-38, as bitsandbytes' NF4 kernel does
            (Note: tail); its 8-bit blockwise kernel does not (False there).
    Returns:
        float32 (ceil(n / blocksize),).
    """
    n_blocks = -(-flat.numel() // blocksize)
    padded = F.pad(flat.abs(), (0, n_blocks * blocksize - flat.numel()))  # zeros do not change a max
    absmax = padded.view(n_blocks, blocksize).amax(dim=1)  # (n_blocks,)
    if floor_partial and flat.numel() % blocksize:
        absmax[-1] = absmax[-1].clamp(min=TINY)
    return absmax


def scale_to_unit(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Each value divided by its block's absmax, so that every block spans at most [-1, 1].

    Args:
        flat: float32 (n,).
        absmax: float32 (n_blocks,) from :func:`block_absmax`.
        blocksize: values per block.
    Returns:
        float32 (n,) in [-1, 1]. An all-zero block gives zeros, not 0/0 = NaN (absmax floored at
        1e-38); full blocks use ``x * (1 / absmax)``, the partial one ``x / absmax`` (Note: tail).
    """
    full = flat.numel() // blocksize * blocksize
    safe = absmax.clamp(min=TINY)  # (n_blocks,)
    head = flat[:full].view(-1, blocksize) * (1.0 / safe[: full // blocksize, None])  # (n_full, bs)
    tail = flat[full:] / safe[full // blocksize:]  # (n % blocksize,), empty if none
    return torch.cat([head.reshape(-1), tail]).clamp(-1, 1)  # (n,)


def nearest_codes(scaled: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The index of the nearest level for each value, ties to the lower level (Note: ties).

    Args:
        scaled: (n,) values in [-1, 1].
        levels: (k,) ascending.
    Returns:
        int64 (n,) codes in [0, k): ``code = #(midpoints < x)``, a binary search, as bitsandbytes.
    """
    return torch.bucketize(scaled, midpoints(levels).to(scaled.device))  # (n,) the table follows the data (GPU)


def quantize_codes(w: torch.Tensor, levels: torch.Tensor,
                   blocksize: int = DEFAULT_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization of ``w`` to the table ``levels`` (unpacked codes).

    Args:
        w: any shape, float32/float16/bfloat16, finite.
        levels: (k,) ascending table over [-1, 1] (NF4, FP4, int4, ...).
        blocksize: values per block, a power of two from 32 to 4096.
    Returns:
        codes int64 (n,) with n = w.numel(), absmax float32 (ceil(n / blocksize),).
    """
    check_blocksize(blocksize)
    check_weights(w)
    flat = w.reshape(-1).float()  # (n,) the math is float32 whatever w's dtype
    absmax = block_absmax(flat, blocksize)  # (n_blocks,)
    return nearest_codes(scale_to_unit(flat, absmax, blocksize), levels), absmax


def dequantize_codes(codes: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor,
                     blocksize: int = DEFAULT_BLOCKSIZE) -> torch.Tensor:
    """``levels[code] * absmax`` of its block, in float32.

    Args:
        codes: int (n,).
        absmax: float32 (ceil(n / blocksize),).
        levels: (k,) the table the codes index.
        blocksize: values per block.
    Returns:
        float32 (n,).
    """
    n = codes.numel()
    n_blocks = -(-n // blocksize)
    values = F.pad(levels.float().to(codes.device)[codes.long()], (0, n_blocks * blocksize - n))  # (n_blocks * bs,)
    return (values.view(n_blocks, blocksize) * absmax.float().to(codes.device)[:, None]).reshape(-1)[:n]  # (n,)


def roundtrip(w: torch.Tensor, levels: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE) -> torch.Tensor:
    """Quantize to ``levels`` and back: float32 with ``w``'s shape."""
    codes, absmax = quantize_codes(w, levels, blocksize)  # (n,), (n_blocks,)
    return dequantize_codes(codes, absmax, levels, blocksize).view(w.shape)


# ---------------------------------------------------------------------------------------------
# 4. NF4 in bitsandbytes' storage format: two codes per byte
# ---------------------------------------------------------------------------------------------
def pack_nibbles(codes: torch.Tensor, pad_code: int = 7) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble (Note: nibbles).

    >>> [hex(b) for b in pack_nibbles(torch.tensor([15, 0, 7])).tolist()]  # 7 pads the odd count
    ['0xf0', '0x77']

    Args:
        codes: int (n,) in [0, 16).
        pad_code: appended when n is odd; 7 is NF4's code for 0.0, what bitsandbytes pads with.
    Returns:
        uint8 (ceil(n / 2),).
    """
    c = codes.to(torch.uint8)
    if c.numel() % 2:
        c = torch.cat([c, c.new_tensor([pad_code])])  # (n + 1,)
    return (c[0::2] << 4) | c[1::2]  # (ceil(n / 2),)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 (ceil(n / 2),) -> int64 codes (n,)."""
    p = packed.reshape(-1).to(torch.uint8)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n].long()  # (n,)


def quantize_nf4(w: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4-quantize ``w``: the same bytes and absmax as bitsandbytes' ``quantize_4bit``.

    Args:
        w: any shape, float32/float16/bfloat16, finite; flattened in row-major order.
        blocksize: values per absmax block, a power of two from 32 to 4096 (default 64).
    Returns:
        packed uint8 (ceil(n / 2),) and absmax float32 (ceil(n / blocksize),). bitsandbytes returns
        the bytes as (ceil(n / 2), 1) and the absmax inside a QuantState.
    """
    codes, absmax = quantize_codes(w, nf4_levels(), blocksize)  # (n,), (n_blocks,)
    return pack_nibbles(codes), absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: Sequence[int],
                   blocksize: int = DEFAULT_BLOCKSIZE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Undo :func:`quantize_nf4`: ``level[code] * absmax`` in float32, then cast to ``dtype``.

    Args:
        packed: uint8 with ceil(n / 2) elements (any shape, e.g. bitsandbytes' (ceil(n / 2), 1)).
        absmax: float32 (ceil(n / blocksize),).
        shape: the original shape; n = prod(shape).
        blocksize: the blocksize used to quantize.
        dtype: float32, float16 or bfloat16.
    Returns:
        tensor of ``shape`` and ``dtype``, equal to bitsandbytes' ``dequantize_4bit``.
    """
    n = math.prod(shape)
    _check_packed(packed, absmax, n, blocksize, dtype)
    codes = unpack_nibbles(packed, n)  # (n,)
    return dequantize_codes(codes, absmax, nf4_levels(), blocksize).to(dtype).view(*shape)


def _check_packed(packed: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int,
                  dtype: torch.dtype) -> None:
    check_blocksize(blocksize)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed must be uint8 with ceil(n/2) = {(n + 1) // 2} elements for shape "
                         f"of {n} values, got {packed.dtype} with {packed.numel()}")
    if absmax.numel() != -(-n // blocksize):
        raise ValueError(f"absmax must have ceil({n}/{blocksize}) = {-(-n // blocksize)} elements, got "
                         f"{absmax.numel()}; was it quantized with another blocksize?")


# ---------------------------------------------------------------------------------------------
# 4b. Whose defect? bitsandbytes' native kernel against its own reference
# ---------------------------------------------------------------------------------------------
def bnb_reference_dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape: Sequence[int],
                             blocksize: int = DEFAULT_BLOCKSIZE, dtype: torch.dtype = torch.float32,
                             quant_type: str = "nf4") -> torch.Tensor:
    """bitsandbytes' own generic 4-bit dequantization, ``levels[code] * absmax`` in fp32
    (``bitsandbytes/backends/default/ops.py::_dequantize_4bit_compute``, run eagerly): the path
    its CPU backend itself falls back to for odd last dimensions, and the same arithmetic as its
    CUDA kernel. The oracle for :func:`dequantize_nf4` on every CPU.

    Args, Returns: as :func:`dequantize_nf4` (absmax as stored by ``quantize_4bit`` without
    double quantization).
    """
    code = get_4bit_type(quant_type, device=packed.device)  # (16,)
    with torch.compiler.set_stance("force_eager"):
        out = _dequantize_4bit_compute(packed.view(torch.uint8).reshape(-1), absmax.float(), code,
                                       blocksize, tuple(shape), dtype)
    return out.reshape(tuple(shape))


BOUNDARY_ULPS = 4   # CUDA's approximate 1/absmax and its float-literal constants: ~1-2 ulps each (compare_codes)


def explained_by_boundary(scaled: torch.Tensor, codes: torch.Tensor, other: torch.Tensor,
                          levels: torch.Tensor, ulps: int = BOUNDARY_ULPS) -> torch.Tensor:
    """Which codes two quantizers may give differently: equal codes, or neighbouring codes where the
    value sits within ``ulps`` fp32 ulps of the midpoint between their two levels (Note: CUDA
    boundaries). Anything else is a real disagreement.

    >>> levels = nf4_levels(); mid = midpoints(levels)
    >>> scaled = torch.tensor([mid[3].item(), levels[10].item(), levels[5].item()])  # a midpoint, two levels
    >>> explained_by_boundary(scaled, torch.tensor([3, 10, 5]), torch.tensor([4, 11, 5]), levels).tolist()
    [True, False, True]

    Args:
        scaled: float32 (n,), each value divided by its block's absmax (exactly, as the kit does).
        codes, other: int (n,), the two quantizers' codes for those values.
        levels: (k,) the ascending table both code into (NF4: 16 levels).
        ulps: how many fp32 ulps of the midpoint count as "at the boundary".
    Returns:
        bool (n,): True where the codes agree or the flip sits at the boundary between them.
    """
    lo, hi = torch.minimum(codes, other).long(), torch.maximum(codes, other).long()  # (n,)
    mids = midpoints(levels.float()).to(scaled.device)                               # (k - 1,)
    mid = mids[lo.clamp(max=mids.numel() - 1)]                                       # (n,) boundary above lo
    ulp = torch.nextafter(mid.abs(), torch.full_like(mid, float("inf"))) - mid.abs()  # (n,) fp32 spacing there
    at_boundary = (hi - lo == 1) & ((scaled.float() - mid).abs() <= ulps * ulp)
    return (codes == other) | at_boundary


def compare_codes(w: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                  blocksize: int = DEFAULT_BLOCKSIZE, boundary_ulps: int = BOUNDARY_ULPS) -> dict:
    """What "equal to bitsandbytes" means on a backend that rounds differently: compare another backend's
    NF4 of ``w`` (its ``packed`` bytes and ``absmax``) with the kit's, and explain every code that differs.

    On the CPU bitsandbytes gives the kit's bytes exactly. Its CUDA kernel is compiled with fast math: it
    scales by an approximate ``1/absmax``, so a value that sits on a decision boundary (the midpoint between
    two levels) can land on the other side. Such a flip is *explained*: the two codes are neighbours and
    the kit's scaled value lies within ``boundary_ulps`` float32 ulps of their midpoint
    (:func:`explained_by_boundary`). Anything
    else (codes two levels apart, a value far from any boundary, a different absmax) is a real difference.

    >>> w = torch.tensor([0.5, nf4_levels()[7:9].mean().item(), 1.0])   # the 2nd value is on a boundary
    >>> p, a = quantize_nf4(w)
    >>> flipped = pack_nibbles(unpack_nibbles(p, 3) + torch.tensor([0, 1, 0]))   # the neighbouring code
    >>> r = compare_codes(w, flipped, a); (r["differ"], r["unexplained"], r["absmax_equal"])
    (1, 0, True)
    >>> compare_codes(w, pack_nibbles(unpack_nibbles(p, 3) + torch.tensor([-1, 0, 0])), a)["unexplained"]
    1

    Args:
        w: the weights both quantized (any shape, as :func:`quantize_nf4` takes).
        packed: the other backend's bytes (ceil(n / 2) uint8, any shape, any device).
        absmax: its float32 absmax (ceil(n / blocksize),).
        blocksize: the blocksize both used.
        boundary_ulps: the distance from a midpoint, in float32 ulps at that midpoint, that still explains a flip.
    Returns:
        ``{"n", "differ", "unexplained", "absmax_equal", "max_boundary_distance"}``: values, codes that
        differ, those not explained by a boundary, whether the absmax agree exactly, and the largest
        distance (in units of the scaled value) of a differing code from its midpoint (0.0 if none).
    """
    n = w.numel()
    flat = w.detach().reshape(-1).float().cpu()
    kit_packed, kit_absmax = quantize_nf4(flat, blocksize)
    kit = unpack_nibbles(kit_packed, n)
    other = unpack_nibbles(packed.detach().reshape(-1).cpu(), n)
    where = (kit != other).nonzero().flatten()  # (d,)
    levels = nf4_levels()
    lo, hi = torch.minimum(kit[where], other[where]), torch.maximum(kit[where], other[where])  # (d,), (d,)
    scaled = scale_to_unit(flat, kit_absmax, blocksize)[where]  # (d,)
    distance = (scaled - (levels[lo] + levels[hi]) / 2).abs()  # (d,) from the midpoint of the two levels
    explained = explained_by_boundary(scaled, kit[where], other[where], levels, boundary_ulps)  # (d,)
    return {"n": n, "differ": int(where.numel()), "unexplained": int((~explained).sum()),
            "absmax_equal": torch.equal(kit_absmax, absmax.detach().reshape(-1).float().cpu()),
            "max_boundary_distance": float(distance.max()) if where.numel() else 0.0}


def whose_defect(w: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE) -> dict:
    """Quantize ``w`` with bitsandbytes, dequantize it three ways, and say who is wrong.

    The three: the kit's :func:`dequantize_nf4`, bitsandbytes' native ``dequantize_4bit`` (the
    CPU kernel of this machine) and bitsandbytes' reference :func:`bnb_reference_dequantize`.

    Returns:
        ``{"kit_ok", "native_ok", "native_max_err", "native_wrong", "verdict"}``: ``kit_ok`` /
        ``native_ok``: bit-equal to the reference; ``native_wrong``: how many values differ;
        ``verdict``: ``"agree"``, ``"bitsandbytes native kernel"`` (the kit and the reference
        agree, the kernel does not: an upstream defect), or ``"kit"`` (the kit differs from the
        reference: ours to fix).
    """
    with torch.compiler.set_stance("force_eager"):
        packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                           compress_statistics=False)
        native = bnbF.dequantize_4bit(packed, state).reshape(w.shape)
    ref = bnb_reference_dequantize(packed, state.absmax, w.shape, blocksize, w.dtype)
    kit = dequantize_nf4(packed.reshape(-1), state.absmax, w.shape, blocksize, w.dtype)
    diff = (native.float() - ref.float()).abs()
    kit_ok, native_ok = torch.equal(kit, ref), torch.equal(native, ref)
    verdict = "kit" if not kit_ok else "agree" if native_ok else "bitsandbytes native kernel"
    return {"kit_ok": kit_ok, "native_ok": native_ok, "native_max_err": diff.max().item(),
            "native_wrong": int((diff > 0).sum()), "verdict": verdict}


def block_spans_rows(shape: Sequence[int], blocksize: int) -> bool:
    """True if some block of ``blocksize`` consecutive values crosses a row boundary of a 2-D+
    ``shape``: where bitsandbytes 0.50.2's AVX-512 ``dequantize_4bit`` can go wrong.

    >>> block_spans_rows((128, 128), 256), block_spans_rows((128, 128), 64), block_spans_rows((4097,), 64)
    (True, False, False)
    """
    return len(shape) >= 2 and shape[-1] % blocksize != 0 and math.prod(shape) > shape[-1]


# ---------------------------------------------------------------------------------------------
# 5. Measuring: error, bits, how evenly the codes are used
# ---------------------------------------------------------------------------------------------
def quantization_error(w: torch.Tensor, levels: torch.Tensor,
                       blocksize: int = DEFAULT_BLOCKSIZE) -> dict[str, float]:
    """How far the round trip moves ``w``.

    Args:
        w: weights, any shape.
        levels: the table (NF4, FP4, int4).
        blocksize: values per block.
    Returns:
        ``{"mae": mean |w - w_hat|, "rmse": sqrt(mean (w - w_hat)^2), "rel_rmse": rmse / rms(w)}``.
    """
    w32 = w.float()
    err = roundtrip(w32, levels, blocksize) - w32  # (w.shape)
    rmse = err.double().pow(2).mean().sqrt().item()
    rms = w32.double().pow(2).mean().sqrt().item()
    return {"mae": err.double().abs().mean().item(), "rmse": rmse, "rel_rmse": rmse / rms}


def blockwise_bits_per_param(blocksize: int, code_bits: int = 4, absmax_bits: int = 32) -> float:
    """Storage per weight: a 4-bit code plus one fp32 absmax per block.

    >>> blockwise_bits_per_param(64), blockwise_bits_per_param(4096)
    (4.5, 4.0078125)

    Args:
        blocksize: values sharing one absmax.
        code_bits: bits per code (4).
        absmax_bits: bits per absmax (32 for fp32; about 8 with double quantization, notebook 03).
    Returns:
        bits per parameter.
    """
    bits_absmax = absmax_bits / blocksize  # one scale per block: 0.5 bit/param at 64
    return code_bits + bits_absmax


def code_entropy(codes: torch.Tensor, n_codes: int = 16) -> float:
    """Shannon entropy of the code histogram, in bits (4.0 when all 16 codes are equally used).

    Args:
        codes: int (n,).
        n_codes: size of the code book.
    Returns:
        ``-sum p log2 p`` over the codes that occur.
    """
    p = torch.bincount(codes.reshape(-1).long(), minlength=n_codes).double() / codes.numel()  # (n_codes,)
    p = p[p > 0]
    return float(-(p * p.log2()).sum())
