"""qlora_helpers.merge: merges checked against PEFT's merge_and_unload, bitsandbytes' dequantize_4bit
and the kit's own NF4 + double quantization; the CPU repack trap (TROUBLESHOOTING.md, qlora_helpers.core.cpu_layout) simulated with
bitsandbytes' own repack function, so the defence is exercised on CPUs without AVX512-BF16 too."""
import json

import pytest
import torch

from qlora_helpers import adapters
from qlora_helpers import merge as M
from qlora_helpers.core import cpu_layout, evaluation
from qlora_helpers.exercises import lesson05 as ex05

R = 4  # small for test speed


@pytest.fixture(scope="module")
def texts(tok):
    from qlora_helpers.core.runtime import load_task_dataset
    return M.conversation_texts(tok, load_task_dataset()["test"].select(range(4)))


def lora_4bit(profile, seed: int = 0, r: int = R):
    """A PEFT model on the 4-bit base with a non-zero adapter (default init B = 0 proves nothing)."""
    from peft import get_peft_model

    from qlora_helpers.core.runtime import load_model
    from qlora_helpers.sft import lora_config
    torch.manual_seed(seed)
    model = get_peft_model(load_model(profile), lora_config(r=r, lora_alpha=2 * r))  # load_model: no CPU repack
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def lora_weights(plain) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in plain.named_parameters() if n.endswith("proj.weight")}


def test_kit_dequantization_equals_bitsandbytes(offline_profile):
    from bitsandbytes.functional import dequantize_4bit
    model = lora_4bit(offline_profile)
    for name, m in cpu_layout.linear4bit_modules(model).items():
        want = dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        assert torch.equal(M.kit_dequantize_weight(m), want), name
        assert torch.equal(M.dequantize_weight(m), want), name


def test_merge_to_fp_equals_dequantized_base_plus_delta(offline_profile, texts, tok):
    model = lora_4bit(offline_profile)
    plain = M.merge_to_fp(model)
    assert not cpu_layout.linear4bit_modules(plain) and type(plain).__name__ == "LlamaForCausalLM"
    base = model.get_base_model()
    for name, w in lora_weights(plain).items():
        layer = base.get_submodule(name.removesuffix(".weight"))
        delta = layer.get_delta_weight("default")
        assert delta.abs().max() > 1e-3, f"{name}: zero update, the test would prove nothing"
        # independent of bitsandbytes: the kit's NF4 + double-quant dequantization
        assert torch.allclose(w - delta, M.kit_dequantize_weight(layer.get_base_layer()), atol=1e-6), name
    ref, mask = evaluation.logits_and_mask(model, tok, texts)
    got, _ = evaluation.logits_and_mask(plain, tok, texts)
    assert M.logit_gap(ref, got, mask)["max_abs_logit_diff"] < 1e-3  # fp32 reassociation only


def test_merge_to_fp_equals_peft_merge_on_dequantized_base(offline_profile, tmp_path):
    """Oracle: PEFT's own merge_and_unload into a full-precision model holding dequant(Q(W))."""
    from qlora_helpers.core.runtime import load_model
    model = lora_4bit(offline_profile)
    adapters.save_adapter(model, tmp_path / "a")
    fp = load_model(offline_profile, quantized=False)
    base = model.get_base_model()
    with torch.no_grad():
        for name, m in base.named_modules():
            if cpu_layout.is_4bit(m):
                fp.get_submodule(name.removesuffix(".base_layer")).weight.copy_(M.dequantize_weight(m))
    want = lora_weights(M.merge_into_base(fp, tmp_path / "a"))
    got = lora_weights(M.merge_to_fp(model))
    assert want.keys() == got.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k


def test_repacked_weight_fools_dequantize_4bit_but_not_the_kit(offline_profile):
    """The CPU repack, reproduced with bitsandbytes' own repack: dequantize_4bit on weight.data
    is garbage; dequantize_weight converts a copy back and stays within the bf16 absmax rounding."""
    from bitsandbytes.functional import dequantize_4bit
    model = lora_4bit(offline_profile)
    fresh = {n: M.dequantize_weight(m) for n, m in cpu_layout.linear4bit_modules(model).items()}
    assert cpu_layout.simulate_cpu_repack(model) == len(fresh) == 28
    for name, m in cpu_layout.linear4bit_modules(model).items():
        assert cpu_layout.is_repacked(m)
        try:
            naive = dequantize_4bit(m.weight.data, m.weight.quant_state).float().reshape(fresh[name].shape)
            assert (naive - fresh[name]).abs().max() > 0.01, f"{name}: the trap did not reproduce"
        except (RuntimeError, ValueError, AssertionError) as err:  # a wrong layout may also raise
            if "trap did not reproduce" in str(err):
                raise
        got = M.dequantize_weight(m)
        assert cpu_layout.is_repacked(m), "dequantize_weight must not change the module"
        # Note (bf16 absmax): absmax rounded to bf16 (2^-9 relative) then re-quantized to 8 bits:
        # bounded by 2% of the layer's largest weight (measured: < 0.5%).
        tol = 0.02 * fresh[name].abs().max()
        assert (got - fresh[name]).abs().max() <= tol, name
        assert torch.equal(M.kit_dequantize_weight(m), got), name


def test_merge_after_repack_matches_fresh_merge(offline_profile):
    model = lora_4bit(offline_profile)
    fresh = lora_weights(M.merge_to_fp(model))
    cpu_layout.simulate_cpu_repack(model)
    after = lora_weights(M.merge_to_fp(model))
    for k in fresh:
        assert (after[k] - fresh[k]).abs().max() <= 0.02 * fresh[k].abs().max(), k
    # what PEFT's 4-bit merge would read without the defence
    from peft.utils.integrations import dequantize_bnb_weight
    m = cpu_layout.linear4bit_modules(model)["base_model.model.model.layers.0.mlp.up_proj.base_layer"]
    naive = dequantize_bnb_weight(m.weight).float().reshape(m.out_features, m.in_features)
    assert (naive - M.dequantize_weight(m)).abs().max() > 0.01


def test_merge_into_4bit_after_repack_matches_fresh(offline_profile):
    a, b = lora_4bit(offline_profile), lora_4bit(offline_profile)
    cpu_layout.simulate_cpu_repack(b)
    ma, mb = M.merge_into_4bit(a), M.merge_into_4bit(b)
    qa, qb = cpu_layout.linear4bit_modules(ma), cpu_layout.linear4bit_modules(mb)
    assert qa.keys() == qb.keys() and not any(cpu_layout.is_repacked(m) for m in qb.values())
    for k in qa:
        wa, wb = M.dequantize_weight(qa[k]), M.dequantize_weight(qb[k])
        # re-quantizing a slightly different W + ΔW flips a few NF4 codes (measured: <= 0.16% of
        # weights, mean |diff| <= 0.2% of mean |w|); a wrong layout would change most of them
        assert ((wa - wb).abs() > 1e-3).float().mean() < 0.01, k
        assert (wa - wb).abs().mean() < 0.01 * wa.abs().mean(), k


def test_evaluate_then_merge_is_exact_with_repack_switched_off(offline_profile, tok, texts, monkeypatch):
    """An eval forward triggers the repack only where allowed; keep_standard_layout forbids it,
    so a merge after an evaluation is bit-identical to a merge on a fresh model on any CPU."""
    import bitsandbytes.nn.modules as bnb_modules
    calls = []
    monkeypatch.setattr(bnb_modules, "_convert_weight_packed_for_cpu",
                        lambda w, s, *a, **k: (calls.append(1), (w, s))[1])  # spy, layout untouched
    model = lora_4bit(offline_profile)
    fresh = lora_weights(M.merge_to_fp(model))
    cpu_layout.pretend_avx512bf16(model)  # as on a CPU with AVX512-BF16
    evaluation.logits_and_mask(model, tok, texts)
    assert calls, "an eval no-grad forward should trigger the repack on such a CPU"
    calls.clear()
    cpu_layout.keep_standard_layout(model)
    evaluation.logits_and_mask(model, tok, texts)
    assert not calls
    after = lora_weights(M.merge_to_fp(model))
    assert all(torch.equal(after[k], fresh[k]) for k in fresh)


def test_save_and_reload_without_peft(offline_profile, tok, texts, tmp_path):
    from transformers import AutoModelForCausalLM
    plain = M.merge_to_fp(lora_4bit(offline_profile))
    path = M.save_merged(plain, tok, tmp_path / "merged")
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    again = AutoModelForCausalLM.from_pretrained(path)
    a, mask = evaluation.logits_and_mask(plain, tok, texts)
    b, _ = evaluation.logits_and_mask(again, tok, texts)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="plain merged model"):
        M.save_merged(lora_4bit(offline_profile), tok, tmp_path / "nope")


def test_adapter_of_another_shape_is_refused(offline_profile, tmp_path):
    from transformers import AutoModelForCausalLM

    from qlora_helpers.core.runtime import load_model
    adapters.save_adapter(lora_4bit(offline_profile), tmp_path / "a")
    fp = load_model(offline_profile, quantized=False)
    cfg = fp.config.__class__.from_dict({**fp.config.to_dict(), "intermediate_size": 256})
    other = AutoModelForCausalLM.from_config(cfg)  # another base: narrower MLP
    with pytest.raises(adapters.AdapterMismatchError, match=r"mlp\.down_proj\.lora_A has shape \(4, 384\).*must be \(4, 256\)"):
        M.merge_into_base(other, tmp_path / "a")
    info = json.loads((tmp_path / "a" / adapters.BASE_INFO_FILE).read_text())
    (tmp_path / "a" / adapters.BASE_INFO_FILE).write_text(json.dumps({**info, "model_type": "qwen2"}))
    with pytest.raises(adapters.AdapterMismatchError, match="model_type 'qwen2'"):
        adapters.load_adapter(fp, tmp_path / "a")
    with pytest.raises(adapters.AdapterMismatchError, match="no adapter_config.json"):
        adapters.check_adapter_matches(fp, tmp_path)


def test_train_adapter_trains_only_lora(offline_profile, tok):
    # adapters.train_adapter is what notebook 05 trains when 04's adapter is missing: the shared loop
    # (training.train_loop) on the 4-bit base must lower the loss and leave the base bytes alone.
    from peft import get_peft_model

    from qlora_helpers.core.recipe import KIT_LOOP
    from qlora_helpers.core.runtime import load_model, load_task_dataset
    from qlora_helpers.sft import lora_config
    from qlora_helpers.sft_checks import base_tensor_hashes
    torch.manual_seed(0)
    model = get_peft_model(load_model(offline_profile), lora_config(r=R, lora_alpha=2 * R))
    before = base_tensor_hashes(model)
    losses = adapters.train_adapter(model, tok, load_task_dataset()["train"].select(range(64)),
                             KIT_LOOP.replace(steps=12, lr=5e-3))
    assert len(losses) == 12 and sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses  # measured ~4.9 -> ~2
    assert base_tensor_hashes(model) == before and not model.training


def test_adapter_bytes_checker_waits_passes_and_fails(capsys):
    from transformers import LlamaConfig
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)  # small for test speed
    assert ex05.check_adapter_bytes(None, cfg, r=4) is None and "not attempted" in capsys.readouterr().out
    # by hand: per layer q (64+64) + k, v (64+32 each) + o (64+64) + gate, up (64+128 each) + down (128+64)
    want = 4 * 2 * 4 * (128 + 96 + 96 + 128 + 192 + 192 + 192)
    assert ex05.check_adapter_bytes(want, cfg, r=4) is True
    with pytest.raises(AssertionError, match="count r"):
        ex05.check_adapter_bytes(want + 4, cfg, r=4)


def test_exercise_checker_for_the_merged_layer(offline_profile, capsys):
    """Notebook 05's exercise 1 checker: a right answer passes on every layer, a placeholder is
    'not attempted', and the classic mistake (forgetting the alpha / r scaling) fails."""
    from bitsandbytes.functional import dequantize_4bit
    model = lora_4bit(offline_profile)

    def right(layer):
        base = layer.get_base_layer()
        w = dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        return w + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight

    def no_scaling(layer):
        base = layer.get_base_layer()
        w = dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        return w + layer.lora_B["default"].weight @ layer.lora_A["default"].weight

    assert ex05.check_merged_layer(right, model) is True
    assert ex05.check_merged_layer(lambda layer: None, model) is None
    assert "not attempted" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="wrong merged weight"):
        ex05.check_merged_layer(no_scaling, model)
    # the library's own merge is refused (the attack: qlora_helpers.merge.merged_weight is importable)
    for cheat in (M.merged_weight, lambda layer: M.dequantize_weight(layer.get_base_layer()) + layer.get_delta_weight("default")):
        with pytest.raises(AssertionError, match="asks you to write this yourself"):
            ex05.check_merged_layer(cheat, model)


def test_chunked_logit_gap_equals_the_whole_batch_computation():
    """The chunked gap against torch's own kl_div over all real positions at once."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(9, 7, 50, generator=g)
    other = ref + 0.3 * torch.randn(9, 7, 50, generator=g)
    mask = torch.rand(9, 7, generator=g) > 0.3
    a, b = ref[mask], other[mask]
    want_kl = F.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean").item()
    got = M.logit_gap(ref, other, mask, rows=2)
    assert abs(got["kl"] - want_kl) < 1e-6 * max(1.0, want_kl)
    assert got["max_abs_logit_diff"] == (a - b).abs().max().item()
    with pytest.raises(ValueError, match="same texts"):
        M.logit_gap(ref, other[:, :5], mask)


def test_a_changed_recipe_trains_anew_instead_of_reloading_the_old_adapter(offline_profile, tmp_path, monkeypatch, capsys):
    """The stale-cache hazard: task_adapter cached under "date-r16-all-linear-<steps>", so a recipe with another
    rank, alpha or lr silently reloaded the old adapter. Each adapter now records the recipe that trained it
    (kit_recipe.json) and is reused only for that recipe."""
    from qlora_helpers.core.recipe import KIT_LOOP, recipe_for
    monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path))
    small = KIT_LOOP.replace(steps=2, batch_size=2)                       # small for test speed
    _, first = adapters.task_adapter(offline_profile, small)
    _, again = adapters.task_adapter(offline_profile, small)
    _, other_lr = adapters.task_adapter(offline_profile, small.replace(lr=small.lr / 2))
    assert first["trained"] and not again["trained"] and other_lr["trained"] and other_lr["path"] != first["path"]
    # under one fixed name (notebook 04's): another recipe's adapter is not reloaded, and says so
    adapters.task_adapter(offline_profile, small, name="fixed")
    _, other_r = adapters.task_adapter(offline_profile, small.replace(r=8), name="fixed")
    assert other_r["trained"] and "trained by another recipe" in capsys.readouterr().out
    assert adapters.recipe_fingerprint(other_r["path"]) == small.replace(r=8).fingerprint()
    # notebook 05 takes notebook 04's adapter when 04's current recipe trained it
    model, _ = adapters.task_adapter(offline_profile, small, name="x")
    adapters.save_adapter(model, adapters.adapter_dir(adapters.NB04_ADAPTER), recipe_for(offline_profile))
    assert adapters.nb04_adapter(offline_profile)[1]["trained"] is False


def test_merge_to_fp_refuses_a_broken_adapter_and_names_the_layer(offline_profile):
    model = lora_4bit(offline_profile)
    name, layer = next((n, m) for n, m in model.named_modules() if hasattr(m, "lora_B") and "default" in m.lora_B)
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=f"merge refused: {name.removeprefix('base_model.model.')}"):
        M.merge_to_fp(model)
