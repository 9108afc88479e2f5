"""qlora_helpers.double_quant against bitsandbytes' nested quant state (CPU, bitsandbytes 0.50.2)."""
import bitsandbytes.functional as bnbF
import pytest
import torch

from qlora_helpers import double_quant as dq
from qlora_helpers.exercises import lesson03 as ex03


def bnb_dq(w):
    packed, state = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    with torch.compiler.set_stance("force_eager"):  # avoid the slow torch.compile fallback on odd shapes
        return packed, state, bnbF.dequantize_4bit(packed, state)


def test_dynamic_map_equals_bitsandbytes():
    code = dq.dynamic_map()
    assert torch.equal(code, bnbF.create_dynamic_map(signed=True))
    assert code.numel() == 256 and code[-1] == 1.0 and (code == 0).sum() == 1


@pytest.mark.parametrize("shape", [(128, 384), (77, 33), (1000,), (3, 5), (300, 257)])  # small for test speed
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_double_quant_bit_exact(shape, dtype):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    packed, state, ref = bnb_dq(w)
    mp, ms = dq.quantize_nf4_dq(w)
    assert torch.equal(mp, packed.reshape(-1))
    assert torch.equal(ms.qabsmax, state.absmax)            # 8-bit constants
    assert torch.equal(ms.absmax2, state.state2.absmax)     # fp32 scale per 256 constants
    assert torch.equal(ms.code, state.state2.code)          # the dynamic map
    assert torch.equal(ms.offset, state.offset)             # the mean
    assert torch.equal(dq.dequantize_nf4_dq(mp, ms, shape, dtype=dtype), ref.reshape(shape))  # bnb gives 1-D as (1, n)


def test_lut_is_not_nearest_code():
    """Pins Note (LUT): a nearest-code search disagrees with bitsandbytes on a few constants."""
    w = torch.randn(1024, 1100, generator=torch.Generator().manual_seed(1))
    _, state, _ = bnb_dq(w)
    _, absmax = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=False)
    x = absmax.absmax - absmax.absmax.mean()
    mine, scale = dq.quantize_blockwise_8bit(x)
    assert torch.equal(mine, state.absmax)
    per = torch.arange(x.numel()) // 256
    code = dq.dynamic_map()
    nearest = torch.bucketize(x / scale[per], (code[:-1] + code[1:]) / 2)
    assert 0 < int((nearest != state.absmax.long()).sum()) < x.numel() // 100


def test_zero_block():
    w = torch.full((64, 64), 0.5)   # every absmax equal: centred constants all 0 (Note: zero block)
    packed, state, ref = bnb_dq(w)
    mp, ms = dq.quantize_nf4_dq(w)
    assert torch.equal(ms.qabsmax, state.absmax) and torch.equal(ms.absmax2, state.state2.absmax)
    assert torch.equal(dq.dequantize_nf4_dq(mp, ms, (64, 64)), ref)


def test_bits_per_param_equals_bitsandbytes_storage():
    """Measured: everything bitsandbytes keeps for a double-quantized weight (codes, 8-bit constants,
    one fp32 scale per 256 constants) per weight; its 256-entry code table and the offset are a
    fixed 1028 bytes per tensor, which the large-matrix limit leaves out."""
    w = torch.randn(1024, 4096, generator=torch.Generator().manual_seed(0))
    packed, st = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    per_weight = [packed, st.absmax, st.state2.absmax]
    stored_bits = 8 * sum(t.numel() * t.element_size() for t in per_weight)
    assert stored_bits / w.numel() == dq.bits_per_param(64)
    fixed = st.state2.code.numel() * st.state2.code.element_size() + st.offset.numel() * st.offset.element_size()
    assert fixed == 1028
    saving = dq.bits_per_param(64, False) - dq.bits_per_param(64)
    assert round(saving, 3) == 0.373                          # the paper's figure
    assert round(saving * 65e9 / 8 / 1e9, 1) == 3.0           # ~3 GB at 65B


@pytest.mark.parametrize("bad", [0, -64, 1.5])
def test_bits_per_param_rejects_bad_blocksize(bad):
    with pytest.raises(ValueError, match="blocksize"):
        dq.bits_per_param(bad)


@pytest.mark.parametrize("double_quant", [True, False])
def test_storage_bytes_large_layer(double_quant):
    w = torch.randn(4096, 11008, generator=torch.Generator().manual_seed(0))
    packed, state = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=double_quant)
    got = dq.measured_bytes(packed, state)
    assert got == dq.storage_bytes(w.numel(), double_quant=double_quant)
    per_param_bits = 8 * sum(got.values()) / w.numel()
    layer_consts = 8 * (1024 + 4 + 64) / w.numel() if double_quant else 8 * 64 / w.numel()
    assert abs(per_param_bits - layer_consts - dq.bits_per_param(64, double_quant)) < 1e-4  # last partial DQ block


def test_offline_model_bytes(offline_profile):
    from qlora_helpers.core.runtime import load_model
    model = load_model(offline_profile)
    layers = [m for m in model.modules() if hasattr(getattr(m, "weight", None), "quant_state")]
    assert len(layers) == 28
    for m in layers:
        assert dq.measured_bytes(m.weight.data, m.weight.quant_state) == dq.storage_bytes(m.weight.quant_state.shape.numel())


def test_checkers_take_what_bitsandbytes_stores():
    """The exercise checkers against bitsandbytes itself: the bits per weight of a double-quantized 128-block
    layer, measured from quantize_4bit's own tensors; exercise 2's bytes by hand (the checker measures
    quantize_4bit on random sizes), refusing the kit's own storage_bytes; exercise 3 by the planner."""
    def by_hand(numel, blocksize, double_quant):
        blocks = -(-numel // blocksize)
        extra = blocks + -(-blocks // 256) * 4 + 256 * 4 + 4 if double_quant else 4 * blocks
        return -(-numel // 2) + 64 + extra
    assert ex03.check_stored_bytes(by_hand)
    with pytest.raises(AssertionError, match="partial"):
        ex03.check_stored_bytes(lambda n, b, d: by_hand(n // b * b, b, d))          # the partial block forgotten
    with pytest.raises(AssertionError, match="called qlora_helpers.double_quant.storage_bytes"):
        ex03.check_stored_bytes(lambda n, b, d: sum(dq.storage_bytes(n, b, d).values()))
    assert ex03.check_longest_fit(1536)
    with pytest.raises(AssertionError, match="try shorter"):
        ex03.check_longest_fit(2048)
    big = torch.randn(1024, 4096, generator=torch.Generator().manual_seed(0))
    packed, st = bnbF.quantize_4bit(big, blocksize=128, quant_type="nf4", compress_statistics=True)
    bits = 8 * sum(t.numel() * t.element_size() for t in (packed, st.absmax, st.state2.absmax)) / big.numel()
    assert ex03.check_bits_per_param_dq(128, bits)
    assert not ex03.check_bits_per_param_dq(64, None)              # not attempted yet
    with pytest.raises(AssertionError):
        ex03.check_bits_per_param_dq(64, 4.5)                      # double quantization forgotten
