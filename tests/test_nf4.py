"""qlora_helpers.nf4 against bitsandbytes 0.50.2 (the oracle): the table, the bytes, the absmax,
the dequantized tensor, and the corner cases where a plausible re-implementation would differ."""
import math

import pytest
import torch
from bitsandbytes import functional as bnbF

from qlora_helpers import nf4
from qlora_helpers.exercises import lesson02 as ex02
from qlora_helpers.nf4 import ALLOWED_BLOCKSIZES, FLOAT_DTYPES, dequantize_nf4, nf4_levels, quantize_nf4

DTYPES = list(FLOAT_DTYPES)
# Sizes divisible by the block, not divisible, odd (a padded nibble), odd last dim, 1-D, 3-D.
SHAPES = [(64, 128), (3, 50), (5, 33), (7,), (1000,), (4097,), (2, 3, 40)]


def bnb_nf4(w: torch.Tensor, blocksize: int):
    """bitsandbytes' packed bytes (flattened), absmax and dequantized tensor (reshaped to w).

    The dequantized tensor comes from bitsandbytes' reference implementation
    (``nf4.bnb_reference_dequantize``, run eagerly), not from its native CPU kernel, which is wrong
    on AVX-512 CPUs when a block spans rows (TROUBLESHOOTING.md; the kernel is checked separately
    by ``test_native_kernel_disagrees_only_where_blocks_span_rows``).
    """
    with torch.compiler.set_stance("force_eager"):
        packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                           compress_statistics=False)
    deq = nf4.bnb_reference_dequantize(packed, state.absmax, w.shape, blocksize, w.dtype)
    return packed.reshape(-1), state.absmax, deq


def weights(shape, dtype, seed=0, std=0.02):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * std).to(dtype)  # like a linear layer's init


# --- the table -------------------------------------------------------------------------------
def test_levels_equal_bitsandbytes_table_exactly():
    levels = nf4_levels()
    assert levels.dtype == torch.float32 and levels.shape == (16,)
    assert torch.equal(levels, bnbF.get_4bit_type("nf4", device="cpu"))
    from bitsandbytes.backends.utils import CODE  # the copy the CPU backend quantizes with
    assert torch.equal(levels, CODE["nf4"])


def test_levels_equal_create_normal_map_or_it_needs_scipy():
    try:
        import scipy  # noqa: F401
    except ImportError:  # why bitsandbytes hardcodes the table
        with pytest.raises(ImportError, match="[Ss]cipy"):
            bnbF.create_normal_map()
        return
    ref = bnbF.create_normal_map(offset=nf4.NF4_OFFSET, use_extra_value=True)  # (256,) zero-padded
    assert torch.equal(nf4_levels(), ref.unique())  # unique() sorts: the 16 levels


def test_level_counts_hand_worked():
    levels = nf4_levels()
    assert (int((levels < 0).sum()), int((levels == 0).sum()), int((levels > 0).sum())) == (7, 1, 8)
    assert levels[0] == -1 and levels[7] == 0 and levels[15] == 1
    assert torch.all(levels[1:] > levels[:-1])


def test_offset_literal_is_the_rounded_paper_offset_and_the_rounding_matters():
    assert math.isclose(nf4.paper_offset(), (1 - 1 / 30 + 1 - 1 / 32) / 2)
    assert round(nf4.paper_offset(), 7) == nf4.NF4_OFFSET == 0.9677083
    exact = nf4_levels(nf4.paper_offset())  # a different float32 offset: different levels
    table = bnbF.get_4bit_type("nf4", device="cpu")
    assert not torch.equal(exact, table)
    assert (exact - table).abs().max() < 1e-6


def test_float64_normalization_would_not_be_bit_exact():
    # The recipe matters: same quantiles, normalized in float64 then rounded, misses the table.
    pos = torch.special.ndtri(torch.linspace(nf4.NF4_OFFSET, 0.5, 9)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(nf4.NF4_OFFSET, 0.5, 8)[:-1].double())
    v = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    assert not torch.equal((v / v.max()).float(), bnbF.get_4bit_type("nf4", device="cpu"))


def test_fp4_levels_equal_bitsandbytes_table():
    assert torch.equal(nf4.fp4_levels(), bnbF.get_4bit_type("fp4", device="cpu").sort().values)


def test_int4_levels_equal_bitsandbytes_int4_table(monkeypatch):
    """bitsandbytes 0.50.2's ``get_4bit_type("int4")`` writes its table as Python ints and divides
    it in place, which fails (a defect there, pinned here so a fix is noticed). Its own data, made
    float as intended, is the oracle: 16 codes, 15 distinct levels (0 and -0)."""
    with pytest.raises(RuntimeError, match="can't be cast"):
        bnbF.get_4bit_type("int4", device="cpu")
    real = torch.tensor
    monkeypatch.setattr(bnbF.torch, "tensor", lambda data, *a, **k: real(data, *a, **{**k, "dtype": torch.float32}))
    table = bnbF.get_4bit_type("int4", device="cpu")
    assert table.numel() == 16 and torch.equal(nf4.int4_levels(), table.unique())


# --- quantize / dequantize against the oracle ------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_bitsandbytes_blocksize_64(shape, dtype):
    w = weights(shape, dtype)
    packed, absmax = quantize_nf4(w)
    want_packed, want_absmax, want_deq = bnb_nf4(w, 64)
    assert packed.shape == (math.ceil(w.numel() / 2),) and packed.dtype == torch.uint8
    assert torch.equal(packed, want_packed)
    assert torch.equal(absmax, want_absmax)
    got = dequantize_nf4(packed, absmax, w.shape, dtype=dtype)
    assert got.dtype == dtype and got.shape == w.shape
    assert torch.equal(got, want_deq)


@pytest.mark.parametrize("blocksize", ALLOWED_BLOCKSIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_bitsandbytes_every_blocksize(blocksize, dtype):
    w = weights((5000,), dtype, seed=blocksize, std=1.0)  # 5000: never a multiple of the block
    packed, absmax = quantize_nf4(w, blocksize)
    want_packed, want_absmax, want_deq = bnb_nf4(w, blocksize)
    assert torch.equal(packed, want_packed) and torch.equal(absmax, want_absmax)
    assert torch.equal(dequantize_nf4(packed, absmax, w.shape, blocksize, dtype), want_deq)


# --- whose defect? bitsandbytes' native CPU kernel against its own reference ---------------------
NATIVE_CASES = [((128, 128), 256), ((256, 64), 128), ((2, 96), 64), ((64, 128), 64), ((4097,), 64),
                ((5, 33), 64)]


@pytest.mark.parametrize("shape,blocksize", NATIVE_CASES)
def test_native_kernel_disagrees_only_where_blocks_span_rows(shape, blocksize):
    """On every CPU the kit equals bitsandbytes' reference; the native kernel may differ only in
    the defect's class (AVX-512, a block spanning rows): measured wrong on AVX-512 for the first
    three cases, exact for the last three on every CPU."""
    r = nf4.whose_defect(weights(shape, torch.float32), blocksize)
    assert r["kit_ok"], r
    assert r["native_ok"] or nf4.block_spans_rows(shape, blocksize), r
    assert r["verdict"] in ("agree", "bitsandbytes native kernel"), r


def test_whose_defect_blames_a_faulty_kernel_on_any_cpu(monkeypatch):
    """Simulate the AVX-512 defect on any CPU: a dequantize_4bit that reads rows in the wrong
    order. The kit's claim (equal to the reference) must still hold, and the verdict must name
    bitsandbytes' kernel, not the kit."""
    real = bnbF.dequantize_4bit

    def faulty(packed, state, *a, **k):
        out = real(packed, state, *a, **k)
        return out.flip(0) if out.dim() == 2 and out.shape[0] > 1 else out  # rows swapped

    monkeypatch.setattr(bnbF, "dequantize_4bit", faulty)
    r = nf4.whose_defect(weights((128, 128), torch.float32), 256)
    assert (r["kit_ok"], r["native_ok"], r["verdict"]) == (True, False, "bitsandbytes native kernel")
    assert r["native_wrong"] > 16_000 * 0.5 and r["native_max_err"] > 0.01


def test_whose_defect_blames_the_kit_when_the_kit_is_wrong(monkeypatch):
    """And the other way round: a kit table off by one float32 step is the kit's defect."""
    wrong = nf4_levels().clone()
    wrong[15] = torch.nextafter(wrong[15], torch.tensor(0.0))
    monkeypatch.setattr(nf4, "nf4_levels", lambda *a, **k: wrong)
    r = nf4.whose_defect(weights((64, 128), torch.float32), 64)
    assert (r["kit_ok"], r["verdict"]) == (False, "kit")


def test_bitsandbytes_accepts_exactly_these_blocksizes():
    for bs in ALLOWED_BLOCKSIZES:
        bnbF.quantize_4bit(torch.ones(64), blocksize=bs, quant_type="nf4")
    for bs in (16, 48, 8192):
        with pytest.raises(ValueError, match=str(bs)):
            bnbF.quantize_4bit(torch.ones(64), blocksize=bs, quant_type="nf4")


def test_nibble_order_and_odd_padding():
    w = torch.tensor([1.0, -1.0, 0.0])  # codes 15, 0, 7 (+ pad 7)
    packed, _ = quantize_nf4(w)
    assert packed.tolist() == [0xF0, 0x77]
    assert torch.equal(packed, bnb_nf4(w, 64)[0])
    assert torch.equal(nf4.unpack_nibbles(packed, 3), torch.tensor([15, 0, 7]))


def test_ties_go_to_the_lower_code_like_bitsandbytes():
    mids = nf4.midpoints(nf4_levels())  # (15,)
    w = torch.cat([torch.ones(1), mids])  # absmax 1: every midpoint is an exact tie
    packed, _ = quantize_nf4(w)
    assert nf4.unpack_nibbles(packed, 16)[1:].tolist() == list(range(15))
    assert torch.equal(packed, bnb_nf4(w, 64)[0])
    # A naive argmin |x - level| breaks some ties upward: the decision rule matters.
    argmin = (mids[:, None] - nf4_levels()).abs().argmin(dim=1)
    assert (argmin != torch.arange(15)).any()


def test_partial_last_block_is_divided_not_multiplied():
    # Found by search: x * (1/a) and x / a fall on different sides of the first midpoint.
    x, a = -1.93611478805542, 2.2828948497772217
    w = torch.cat([weights((64,), torch.float32), torch.tensor([x, a])])  # tail block [x, a]
    packed, absmax = quantize_nf4(w)
    want_packed, want_absmax, _ = bnb_nf4(w, 64)
    assert torch.equal(packed, want_packed) and torch.equal(absmax, want_absmax)
    mids = nf4.midpoints(nf4_levels())
    xt, at = torch.tensor(x), torch.tensor(a)
    assert torch.bucketize(xt * (1.0 / at), mids) != torch.bucketize(xt / at, mids)


@pytest.mark.parametrize("n", [128, 70])  # a zero full block; a zero partial block
def test_zero_blocks_give_zeros_not_nan(n):
    w = torch.zeros(n)
    w[:64] = weights((64,), torch.float32)  # first block non-zero, the rest zeros
    packed, absmax = quantize_nf4(w)
    want_packed, want_absmax, want_deq = bnb_nf4(w, 64)
    assert torch.equal(packed, want_packed) and torch.equal(absmax, want_absmax)
    deq = dequantize_nf4(packed, absmax, w.shape)
    assert not deq.isnan().any() and torch.equal(deq[64:], torch.zeros(n - 64))
    assert torch.equal(deq, want_deq)
    # Note (tail): a zero full block stores absmax 0, a zero partial block 1e-38
    assert absmax[-1] == (torch.tensor(1e-38) if n % 64 else 0.0)


def test_values_on_levels_round_trip_exactly():
    levels = nf4_levels()
    w = torch.cat([levels, levels.flip(0)]).repeat(2) * 0.5  # (64,): absmax 0.5, a power of two
    packed, absmax = quantize_nf4(w)
    assert absmax.tolist() == [0.5]
    assert torch.equal(dequantize_nf4(packed, absmax, w.shape), w)


def test_pack_unpack_round_trip():
    codes = torch.randint(0, 16, (101,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(nf4.unpack_nibbles(nf4.pack_nibbles(codes), 101), codes)


def test_fp4_round_trip_equals_bitsandbytes_fp4():
    w = weights((3, 100), torch.float32, std=1.0)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="fp4")
    want = bnbF.dequantize_4bit(packed, state)
    assert torch.equal(nf4.roundtrip(w, nf4.fp4_levels(), 64), want)


# --- why NF4 ---------------------------------------------------------------------------------
def test_nf4_beats_int4_and_fp4_on_normal_weights():
    w = weights((1 << 16,), torch.float32, std=1.0)
    err = {name: nf4.quantization_error(w, lv)["rel_rmse"]
           for name, lv in [("nf4", nf4_levels()), ("fp4", nf4.fp4_levels()), ("int4", nf4.int4_levels())]}
    assert err["nf4"] < err["int4"] < err["fp4"], err
    assert 0.08 < err["nf4"] < 0.10, err  # measured 0.092 at blocksize 64 (notebook 02)


@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_bits_per_param_equals_bitsandbytes_storage(blocksize):
    """Measured: the bytes bitsandbytes stores (packed codes + fp32 absmax) per weight."""
    w = weights((256, 4096), torch.float32)
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    stored_bits = 8 * (packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size())
    assert stored_bits / w.numel() == nf4.blockwise_bits_per_param(blocksize)


def test_code_entropy_hand_worked():
    assert nf4.code_entropy(torch.arange(16).repeat(10)) == pytest.approx(4.0)   # uniform: 4 bits
    assert nf4.code_entropy(torch.tensor([0, 0, 1, 1])) == pytest.approx(1.0)    # two codes: 1 bit
    assert nf4.code_entropy(torch.zeros(8, dtype=torch.long)) == pytest.approx(0.0)


# --- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [16, 48, 8192, 64.0, True])
def test_bad_blocksize_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=rf"blocksize .* got {bad!r}; the QLoRA default is 64"):
        quantize_nf4(torch.ones(64), bad)
    with pytest.raises(ValueError, match="blocksize"):
        dequantize_nf4(torch.zeros(32, dtype=torch.uint8), torch.ones(1), (64,), bad)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.float64], ids=str)
def test_non_float_dtype_is_a_clear_error(dtype):
    with pytest.raises(ValueError, match=rf"got dtype {dtype}; convert first"):
        quantize_nf4(torch.ones(64, dtype=dtype))


@pytest.mark.parametrize("bad, what", [(float("nan"), "1 NaN and 0 Inf"), (float("inf"), "0 NaN and 1 Inf"),
                                       (float("-inf"), "0 NaN and 1 Inf")])
def test_nan_or_inf_is_a_clear_error(bad, what):
    w = torch.ones(4, 64)
    w[2, 5] = bad
    with pytest.raises(ValueError, match=rf"{what} values \(shape \(4, 64\)\)"):
        quantize_nf4(w)


def test_empty_and_mismatched_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.zeros(0))
    packed, absmax = quantize_nf4(torch.ones(128))
    with pytest.raises(ValueError, match="absmax must have ceil"):
        dequantize_nf4(packed, absmax, (128,), blocksize=32)
    with pytest.raises(ValueError, match="packed must be uint8"):
        dequantize_nf4(packed, absmax, (130,))
    with pytest.raises(ValueError, match="dtype"):
        dequantize_nf4(packed, absmax, (128,), dtype=torch.int8)


# --- exercise checkers -----------------------------------------------------------------------
def test_checkers_accept_right_answers_and_reject_wrong_ones(capsys):
    assert ex02.check_nf4_level_count(None) is None
    assert "not attempted" in capsys.readouterr().out
    assert ex02.check_nf4_level_count(nf4_levels())
    with pytest.raises(AssertionError, match="bit-exact"):
        ex02.check_nf4_level_count(nf4_levels(nf4.paper_offset()))
    assert ex02.check_offset(nf4.paper_offset())
    with pytest.raises(AssertionError):
        ex02.check_offset(1 - 1 / 32)
    def by_hand(codes, high_first=True):
        c = codes.to(torch.uint8)
        c = torch.cat([c, c.new_tensor([7])]) if c.numel() % 2 else c
        return (c[0::2] << 4) | c[1::2] if high_first else (c[1::2] << 4) | c[0::2]
    assert ex02.check_pack(by_hand)
    with pytest.raises(AssertionError, match="high nibble"):
        ex02.check_pack(lambda codes: by_hand(codes, high_first=False))
    assert ex02.check_bits_per_param(128, 4.25)
    with pytest.raises(AssertionError):
        ex02.check_bits_per_param(128, 4.5)
    assert ex02.check_uniform_winner("int4")  # evenly spaced levels win on uniform data
    with pytest.raises(AssertionError):
        ex02.check_uniform_winner("nf4")


def test_compare_codes_counts_and_explains_another_backends_codes():
    """What "equal to bitsandbytes" means on CUDA (nf4.compare_codes): on the CPU bitsandbytes' codes are the
    kit's (0 differ); a flip at a decision boundary (what CUDA's approximate 1/absmax can do) is counted and
    explained; a flip away from any boundary, or another absmax, is not."""
    import bitsandbytes.functional as bnbF
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 128, generator=g) * 0.02
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    same = nf4.compare_codes(w, packed, state.absmax)
    assert (same["n"], same["differ"], same["unexplained"], same["absmax_equal"]) == (w.numel(), 0, 0, True)
    # put value 10 exactly on the boundary between its code and the next, then flip it as another kernel might
    codes = nf4.unpack_nibbles(packed, w.numel())
    k = int(codes[10]) if int(codes[10]) < 15 else 14
    a0 = state.absmax[0].item()
    w2 = w.clone().reshape(-1)
    w2[10] = float(nf4.nf4_levels()[k:k + 2].mean()) * a0
    p2, s2 = bnbF.quantize_4bit(w2, blocksize=64, quant_type="nf4", compress_statistics=False)
    c2 = nf4.unpack_nibbles(p2, w2.numel())
    c2[10] = c2[10] + 1 if c2[10] == k else c2[10] - 1      # the other side of that boundary
    r = nf4.compare_codes(w2, nf4.pack_nibbles(c2), s2.absmax)
    assert (r["differ"], r["unexplained"], r["absmax_equal"]) == (1, 0, True) and r["max_boundary_distance"] < 1e-6
    c2[20] = (c2[20] + 2) % 16                              # two levels over: no rounding does that
    assert nf4.compare_codes(w2, nf4.pack_nibbles(c2), s2.absmax)["unexplained"] == 1
    assert not nf4.compare_codes(w, packed, state.absmax * 1.001)["absmax_equal"]
