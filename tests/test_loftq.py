"""LoftQ (qlora_helpers.loftq) against PEFT's loftq_init and against its own math."""
import inspect

import pytest
import torch

from qlora_helpers import loftq as lq


@pytest.fixture(scope="module")
def w():
    g = torch.Generator().manual_seed(0)
    return torch.randn(96, 128, generator=g) * 0.02  # small for test speed; pretrained-like scale


def _peft_loftq_on_cpu():
    """PEFT's own ``loftq_init`` source with its hard-coded device ("cuda"/"xpu") set to "cpu"."""
    from peft.utils import loftq_utils
    src = inspect.getsource(loftq_utils.loftq_init)
    old = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    assert src.count(old) == 1, "PEFT's loftq_init changed: re-read peft/utils/loftq_utils.py"
    src = src.replace(old, 'compute_device = "cpu"').replace("@torch.no_grad()\n", "")
    ns = dict(vars(loftq_utils))
    exec(compile(src, loftq_utils.__file__, "exec"), ns)
    return ns["loftq_init"]


@pytest.mark.parametrize("num_iter", [1, 2, 5])
def test_equals_peft_loftq_init_math_on_cpu(w, num_iter):
    q_peft, a_peft, b_peft = _peft_loftq_on_cpu()(w, num_bits=4, reduced_rank=8, num_iter=num_iter)
    q, a, b = lq.loftq(w, 8, num_iter)  # scaling 1: PEFT's convention (Note: scaling)
    assert torch.equal(q, q_peft)  # same NF4 bytes at every iteration
    torch.testing.assert_close(b @ a, b_peft @ a_peft, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.abs(), a_peft.abs(), atol=1e-5, rtol=1e-4)  # SVD signs may flip


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="PEFT's loftq_init hard-codes CUDA (TROUBLESHOOTING.md); CPU-only torch here")
def test_equals_peft_loftq_init_on_gpu(w):
    from peft.utils.loftq_utils import loftq_init
    q_peft, a_peft, b_peft = loftq_init(w, num_bits=4, reduced_rank=8, num_iter=3)
    q, a, b = lq.loftq(w, 8, 3)
    assert torch.equal(q, q_peft.cpu())
    torch.testing.assert_close(b @ a, (b_peft @ a_peft).cpu(), atol=1e-5, rtol=1e-4)


def test_zero_iterations_is_plain_quantization(w):
    q, a, b = lq.loftq(w, 8, 0)
    assert torch.equal(q, lq.nf4_roundtrip(w))
    assert not a.any() and not b.any()


def test_error_decreases_with_iterations(w):
    errs = []
    for t in range(5):
        q, a, b = lq.loftq(w, 8, t)
        errs.append(lq.loftq_errors(w, q, a, b)["loftq"])
    assert errs[1] < errs[0] and errs[4] < errs[1], errs
    assert all(e2 <= e1 * (1 + 1e-3) for e1, e2 in zip(errs, errs[1:])), errs


def test_adapter_has_rank_r_and_scaling_is_folded_into_b(w):
    q1, a1, b1 = lq.loftq(w, 8, 2, scaling=1.0)
    q4, a4, b4 = lq.loftq(w, 8, 2, scaling=4.0)
    assert torch.linalg.matrix_rank(b1 @ a1).item() == 8
    assert torch.equal(q1, q4)
    torch.testing.assert_close(4.0 * b4 @ a4, b1 @ a1)


def test_svd_step_error_is_sum_of_discarded_singular_values(w):
    residual = w - lq.nf4_roundtrip(w)
    a, b, s = lq.low_rank_split(residual, 8)
    err2 = (residual - b @ a).double().pow(2).sum().item()
    assert err2 == pytest.approx(s[8:].double().pow(2).sum().item(), rel=1e-4)  # Eckart-Young


@pytest.mark.parametrize("kw,msg", [({"r": 0}, "rank r"), ({"r": 97}, "rank r"),
                                    ({"num_iter": -1}, "num_iter"), ({"scaling": 0.0}, "scaling")])
def test_bad_arguments_raise(w, kw, msg):
    with pytest.raises(ValueError, match=msg):
        lq.loftq(w, **{"r": 8, **kw})


def test_apply_loftq_on_the_4bit_model(offline_profile):
    from peft import LoraConfig, get_peft_model

    from qlora_helpers.core.runtime import load_model
    fp = load_model(offline_profile, quantized=False)
    model = get_peft_model(load_model(offline_profile),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"]))
    report = lq.apply_loftq(model, fp, num_iter=2)  # asserts the layer's Q internally
    assert len(report) == 2 * fp.config.num_hidden_layers
    assert all(e["loftq"] < e["plain"] for e in report.values())
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    import bitsandbytes.functional as bf
    w_eff = bf.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state) \
        + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    w = fp.model.layers[0].self_attn.q_proj.weight
    assert (w - w_eff).norm().item() == pytest.approx(report[next(iter(report))]["loftq"], rel=1e-4)


def test_on_the_cpu_the_layers_backend_is_the_kits_nf4_with_double_quant(offline_profile):
    """LoftQ quantizes with the layer's own backend (loftq.layer_roundtrip); on the CPU that is, bit for bit,
    the kit's NF4 + double quantization, so the lesson's LoftQ is the kit's NF4 here."""
    from qlora_helpers.core.runtime import load_model
    model = load_model(offline_profile)
    layer = model.model.layers[0].mlp.up_proj
    w = load_model(offline_profile, quantized=False).model.layers[0].mlp.up_proj.weight.detach()
    assert torch.equal(lq.layer_roundtrip(layer)(w), lq.nf4_dq_roundtrip(w))


def test_apply_loftq_fits_the_q_the_layers_backend_writes(offline_profile, monkeypatch):
    """On a GPU bitsandbytes' CUDA kernel gives a few codes other than the kit's round trip, and apply_loftq
    raised "does not hold LoftQ's Q". Stand in for that kernel: a quantize_4bit that flips one 4-bit code of
    every matrix. LoftQ must fit its SVD to the Q the layer really holds (it raised before the fix)."""
    import bitsandbytes.functional as bf
    from peft import LoraConfig, get_peft_model

    from qlora_helpers.core.runtime import load_model
    original = bf.quantize_4bit

    def other_kernel(*args, **kwargs):
        packed, state = original(*args, **kwargs)
        packed = packed.clone()
        packed.view(-1)[0] ^= 0x01          # one code one level over: another kernel's rounding
        return packed, state
    monkeypatch.setattr(bf, "quantize_4bit", other_kernel)
    fp = load_model(offline_profile, quantized=False)
    model = get_peft_model(load_model(offline_profile), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"]))
    report = lq.apply_loftq(model, fp, num_iter=2)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    held = bf.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state).float()
    w = fp.model.layers[0].self_attn.q_proj.weight.float()
    assert not torch.equal(lq.layer_roundtrip(layer.base_layer)(w), lq.nf4_dq_roundtrip(w))   # the stand-in differs
    w_eff = held + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert (w - w_eff).norm().item() == pytest.approx(report[next(iter(report))]["loftq"], rel=1e-5)
