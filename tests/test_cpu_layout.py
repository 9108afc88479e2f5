"""qlora_helpers.core.cpu_layout: bitsandbytes' AVX512-BF16 repack, forced on any CPU, cannot reach a
model the kit loads. The repack is forced by making bitsandbytes believe the CPU has AVX512-BF16
(``has_avx512bf16``, read by ``Linear4bit.__init__``) and spying on the repack function, so the
tests mean the same on an AVX2 laptop, an AVX-512 server and an ARM Mac."""
import bitsandbytes.functional as bnbF
import bitsandbytes.nn.modules as bnb_modules
import pytest
import torch

from qlora_helpers.core import cpu_layout
from qlora_helpers.core.evaluation import generate_answers
from qlora_helpers.core.runtime import load_model


@pytest.fixture
def forced_repack(monkeypatch):
    """Every Linear4bit created from now on behaves as on an AVX512-BF16 CPU; the list collects
    the names of layers whose forward asked for the repack (the spy leaves the layout alone, so
    the forward still works on a CPU without the feature)."""
    calls = []
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    monkeypatch.setattr(bnb_modules, "_convert_weight_packed_for_cpu",
                        lambda w, s, *a, **k: (calls.append(tuple(w.shape)), (w, s))[1])
    return calls


def _eval_and_generate(model, tok):
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    return generate_answers(model, tok, ["Rewrite the date 2024-03-17 as DD/MM/YYYY."], max_new_tokens=4)


def test_forcing_works_without_the_defence(offline_profile, tok, forced_repack):
    """The check can fail: a 4-bit model loaded *without* the kit's path asks for the repack at
    its first evaluation once the CPU claims AVX512-BF16."""
    from transformers import AutoModelForCausalLM
    raw = AutoModelForCausalLM.from_pretrained(offline_profile.model_source,
                                               quantization_config=offline_profile.bnb_config())
    assert all(m.support_avx512bf16_for_cpu for m in cpu_layout.linear4bit_modules(raw).values())
    _eval_and_generate(raw, tok)
    # every 4-bit layer (4 decoder layers x 7 linears) at every forward (the spy never repacks)
    assert len(forced_repack) >= 28 and len(forced_repack) % 28 == 0
    with pytest.raises(RuntimeError, match="may be repacked by its next eval forward"):
        cpu_layout.check_standard_layout(raw)


def test_load_model_defends_every_4bit_model(offline_profile, tok, forced_repack):
    model = load_model(offline_profile)
    layers = cpu_layout.linear4bit_modules(model)
    assert len(layers) == 28 and not any(m.support_avx512bf16_for_cpu for m in layers.values())
    before = {n: m.weight.data.clone() for n, m in layers.items()}
    _eval_and_generate(model, tok)
    assert forced_repack == []
    cpu_layout.check_standard_layout(model)
    assert all(torch.equal(m.weight.data, before[n]) for n, m in layers.items())


def test_ablation_runs_get_the_defended_base(offline_profile, forced_repack):
    """Notebook 06 evaluates the fresh base before training: on an AVX512-BF16 CPU that used to
    repack it and the adapters trained on garbage (exact match 0.000)."""
    from qlora_helpers import ablation_plan
    from qlora_helpers import ablations as ab
    data = ab.load_task(offline_profile, n_test=4)
    model, _ = ab.build_model(offline_profile, ablation_plan.make_variant("r16"), data, seed=0)
    ab.heldout_loss(model, data.eval_batches[:1])
    assert forced_repack == []
    cpu_layout.check_standard_layout(model)


def test_defend_restores_a_model_that_was_already_repacked(offline_profile):
    """Whatever ran before: a model repacked by bitsandbytes' own function comes back in the
    standard layout, dequantizing as before within the bf16 absmax rounding of the repack."""
    model = load_model(offline_profile)
    layers = cpu_layout.linear4bit_modules(model)
    fresh = {n: bnbF.dequantize_4bit(m.weight.data, m.weight.quant_state).float() for n, m in layers.items()}
    assert cpu_layout.simulate_cpu_repack(model) == 28
    with pytest.raises(RuntimeError, match="is repacked"):
        cpu_layout.check_standard_layout(model)
    cpu_layout.defend(model)
    cpu_layout.check_standard_layout(model)
    for n, m in layers.items():
        got = bnbF.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        # Note (bf16 absmax): absmax rounded to bf16 (2^-9 relative) then re-quantized to 8 bits;
        # bounded by 2% of the layer's largest weight (measured: < 0.5%). A wrong layout: > 100%.
        assert (got - fresh[n]).abs().max() <= 0.02 * fresh[n].abs().max(), n


@pytest.mark.skipif(not bnbF.has_avx512bf16(), reason="this CPU has no AVX512-BF16: no real repack")
def test_real_repack_on_this_cpu_and_the_defence(offline_profile, tok):
    """On a CPU that has the feature, the trap without the defence and the defence, for real."""
    from transformers import AutoModelForCausalLM
    raw = AutoModelForCausalLM.from_pretrained(offline_profile.model_source,
                                               quantization_config=offline_profile.bnb_config())
    lin = raw.model.layers[0].mlp.up_proj
    want = bnbF.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float()
    _eval_and_generate(raw, tok)
    assert cpu_layout.is_repacked(lin)
    naive = bnbF.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float().reshape(want.shape)
    assert (naive - want).abs().max() > 0.5 * want.abs().max()  # measured 0.295 vs max |w| 0.194
    defended = load_model(offline_profile)
    _eval_and_generate(defended, tok)
    assert not any(cpu_layout.is_repacked(m) for m in cpu_layout.linear4bit_modules(defended).values())


def test_the_repack_lesson_refuses_a_model_off_the_cpu(offline_profile):
    """On a GPU, notebook 05's repack lesson used to hand CUDA weights to a CPU-only layout conversion. The
    function now names the device and the fix before touching anything (a layer moved to PyTorch's meta device
    stands in for cuda:0)."""
    model = load_model(offline_profile)
    layer = next(iter(cpu_layout.linear4bit_modules(model).values()))
    on_meta = torch.nn.Parameter(torch.empty(layer.weight.shape, dtype=torch.uint8, device="meta"), requires_grad=False)
    on_meta.quant_state = layer.weight.quant_state
    layer._parameters["weight"] = on_meta
    with pytest.raises(ValueError, match="layers are on meta.*CPU layout.*get_profile\\('offline'\\)"):
        cpu_layout.simulate_cpu_repack(model)
    assert not any(cpu_layout.is_repacked(m) for m in cpu_layout.linear4bit_modules(model).values())
