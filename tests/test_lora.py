"""qlora_helpers.lora against PEFT 0.21 (the oracle), plus identities and hand-worked examples."""
import math
import warnings

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from transformers import AutoModelForCausalLM, LlamaConfig

from qlora_helpers import lora
from qlora_helpers.exercises import lesson01 as ex01
from qlora_helpers.lora import (
    LoRALinear,
    copy_lora_to_peft,
    count_trainable,
    find_targets,
    inject_lora,
    lora_layers,
    merge_lora,
    randomize_lora,
    unmerge_lora,
)

FP32_EPS = torch.finfo(torch.float32).eps  # 2^-23: one ulp at 1.0


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PEFT 0.21 reads is_gradient_checkpointing
        yield


@pytest.fixture(scope="module")
def load_fp(offline_profile):
    """A fresh full-precision (fp32) copy of the offline tiny Llama per call."""
    from qlora_helpers.core.runtime import load_model
    return lambda: load_model(offline_profile, quantized=False)


def _peft_layer(base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                use_rslora: bool = False) -> PeftLoraLinear:
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora)
    return PeftLoraLinear(base, "default", config=cfg, r=r, lora_alpha=alpha)


# ---- 1. the low-rank picture (hand-worked) ------------------------------------------------------
def test_best_rank_r_hand_example():
    d = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    want = torch.diag(torch.tensor([3.0, 0.0, 0.0]))
    assert torch.allclose(lora.best_rank_r(d, 1), want, atol=1e-6)
    # the dropped singular values 2 and 1 carry 5 of the 14 units of energy
    assert lora.relative_error_by_rank(d, [1, 3]) == pytest.approx([math.sqrt(5 / 14), 0.0])


@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
def test_relative_error_equals_explicit_truncation(shape):
    torch.manual_seed(0)
    d = torch.randn(*shape)
    for r in (1, 3, 6):
        explicit = (d - lora.best_rank_r(d, r)).norm() / d.norm()
        assert lora.relative_error_by_rank(d, [r])[0] == pytest.approx(explicit.item(), abs=1e-5)


def test_param_count_hand_example():
    assert lora.linear_param_counts(4096, 4096, 16) == (16_777_216, 131_072)
    assert lora.linear_param_counts(4096, 11008, 16) == (45_088_768, 241_664)


# ---- scaling ------------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [1, 8, 64])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_scaling_matches_peft(r, use_rslora):
    ours = LoRALinear(nn.Linear(16, 8), r=r, alpha=16, use_rslora=use_rslora).scaling
    theirs = _peft_layer(nn.Linear(16, 8), r, 16, use_rslora=use_rslora).scaling["default"]
    assert ours == theirs == (16 / math.sqrt(r) if use_rslora else 16 / r)


def test_rslora_one_step_update_scaling():
    """One SGD step from B = 0 moves the output by scaling^2 * ||Ax||^2 ~ r * scaling^2:
    log-log slope -1 with alpha/r, 0 with alpha/sqrt(r) (arXiv 2312.03732)."""
    ranks = [1, 4, 16, 64]
    for use_rslora, want in ((False, -1.0), (True, 0.0)):
        norms = [sum(lora.one_step_update_norm(r, use_rslora, seed=s) for s in range(6))
                 for r in ranks]
        x, y = torch.tensor(ranks).log(), torch.tensor(norms).log()
        slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
        assert abs(slope.item() - want) < 0.15, (use_rslora, slope.item())


def test_under_adam_the_verdict_turns():
    """One AdamW step (torch's, built by the kit's one builder) moves B by about lr per entry whatever the
    gradient's size, so the update grows like scaling * r: flat with alpha/r, slope 1/2 with alpha/sqrt(r),
    the opposite of one SGD step. Notebook 01 shows both; notebook 06's rsLoRA result is the Adam case."""
    ranks = [1, 4, 16, 64]
    for use_rslora, want in ((False, 0.0), (True, 0.5)):
        norms = [sum(lora.one_step_update_norm(r, use_rslora, seed=s, optimizer="adamw_torch") for s in range(6))
                 for r in ranks]
        x, y = torch.tensor(ranks).log(), torch.tensor(norms).log()
        slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
        assert abs(slope.item() - want) < 0.15, (use_rslora, slope.item())


# ---- 2. the layer against peft.tuners.lora.layer.Linear ----------------------------------------
@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_equals_peft_layer(use_rslora, bias, dtype):
    torch.manual_seed(0)
    base = nn.Linear(48, 40, bias=bias).to(dtype)  # small for test speed
    base_ours, base_peft = (nn.Linear(48, 40, bias=bias).to(dtype) for _ in range(2))
    base_ours.load_state_dict(base.state_dict()), base_peft.load_state_dict(base.state_dict())
    torch.manual_seed(1)
    ours = LoRALinear(base_ours, r=4, alpha=8, use_rslora=use_rslora).to(dtype)
    torch.manual_seed(1)
    peft = _peft_layer(base_peft, 4, 8, use_rslora=use_rslora).to(dtype)
    # same seed, same init: PEFT's kaiming_uniform_(a=sqrt(5)) A, and B = 0
    assert torch.equal(ours.lora_A.weight, peft.lora_A["default"].weight)
    assert torch.equal(ours.lora_B.weight, peft.lora_B["default"].weight)
    x = torch.randn(3, 5, 48, dtype=dtype)
    assert torch.equal(ours(x), base(x)), "a fresh adapter must change nothing"
    with torch.no_grad():
        B = torch.randn(40, 4, dtype=dtype)  # non-zero B, or the comparisons prove nothing
        ours.lora_B.weight.copy_(B), peft.lora_B["default"].weight.copy_(B)
    assert not torch.allclose(ours(x), base(x))
    assert torch.equal(ours(x), peft(x))
    assert torch.equal(ours.get_delta_weight(), peft.get_delta_weight("default"))
    ours.merge(), peft.merge()
    assert torch.equal(ours.base_layer.weight, peft.base_layer.weight)
    assert torch.equal(ours(x), peft(x))
    ours.unmerge(), peft.unmerge()
    assert torch.equal(ours.base_layer.weight, peft.base_layer.weight)


def test_dropout_only_on_lora_path_like_peft():
    torch.manual_seed(0)
    base = nn.Linear(32, 16)
    ours = LoRALinear(base, 4, 8, dropout=0.5)
    peft = _peft_layer(nn.Linear(32, 16), 4, 8, dropout=0.5)
    peft.base_layer.load_state_dict(base.state_dict())
    with torch.no_grad():
        for w in (ours.lora_A.weight, ours.lora_B.weight):
            w.normal_()
        peft.lora_A["default"].weight.copy_(ours.lora_A.weight)
        peft.lora_B["default"].weight.copy_(ours.lora_B.weight)
    x = torch.randn(8, 32)
    ours.train(), peft.train()
    torch.manual_seed(3)
    y_ours = ours(x)
    torch.manual_seed(3)
    assert torch.equal(y_ours, peft(x)), "same seed, same dropout mask, same output"
    ours.eval()
    assert not torch.equal(y_ours, ours(x)), "dropout is active in train mode"


def test_merge_unmerge_within_fp32_bound():
    """fl(fl(W + D) - D) differs from W by at most u|W + D| + u|W| (u = eps/2, two roundings),
    so |restored - W| <= eps * (|W| + |D|) elementwise."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 96), r=8, alpha=16)
    nn.init.normal_(layer.lora_B.weight, std=0.5)  # |ΔW| comparable to |W|: the bound is tight-ish
    W, D = layer.base_layer.weight.detach().clone(), layer.get_delta_weight().detach()
    x = torch.randn(4, 64)
    y_adapter = layer(x).detach()
    layer.merge()
    assert layer.merged and torch.allclose(layer(x), y_adapter, atol=1e-5)
    layer.unmerge()
    err = (layer.base_layer.weight - W).abs()
    assert torch.all(err <= FP32_EPS * (W.abs() + D.abs()))
    assert err.max() > 0, "the round trip is not bit-exact here (else the bound is untested)"


def test_merge_twice_warns_and_quantized_merge_refused():
    layer = LoRALinear(nn.Linear(8, 8), r=2)
    layer.merge()
    with pytest.warns(UserWarning, match="Already merged"):
        layer.merge()
    q = LoRALinear(nn.Linear(8, 8), r=2)
    q.base_layer.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(ValueError, match="uint8"):
        q.merge()


# ---- 3. injection: counts, targets, errors ------------------------------------------------------
LLAMA_SHAPED = {  # real hidden/intermediate/heads, 2 layers and a small vocab: small for test speed
    "llama2-7b-shaped": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                             num_attention_heads=32, num_key_value_heads=32, vocab_size=256),
    "llama3-8b-shaped": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                             num_attention_heads=32, num_key_value_heads=8, vocab_size=256),
}


@pytest.mark.parametrize("name", list(LLAMA_SHAPED))
@pytest.mark.parametrize("r,targets", [(16, "all-linear"), (8, ["q_proj", "v_proj"])])
def test_param_count_formula_equals_peft_on_meta(name, r, targets):
    cfg = LlamaConfig(**LLAMA_SHAPED[name])
    with torch.device("meta"):  # shapes only
        peft_model = get_peft_model(AutoModelForCausalLM.from_config(cfg),
                                    LoraConfig(r=r, target_modules=targets))
        ours = inject_lora(AutoModelForCausalLM.from_config(cfg), targets, r=r)
    formula = lora.llama_lora_param_count(cfg, r, targets)
    assert formula == peft_model.get_nb_trainable_parameters()[0] == count_trainable(ours)


TARGETS = ["all-linear", ["q_proj", "v_proj"], r".*\.mlp\.(up|down)_proj"]


@pytest.mark.parametrize("targets", TARGETS, ids=["all-linear", "list", "regex"])
def test_model_equals_peft(load_fp, targets):
    torch.manual_seed(0)
    ours = inject_lora(load_fp(), targets, r=8, alpha=16)
    torch.manual_seed(0)
    peft_model = get_peft_model(load_fp(), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    assert sorted(lora_layers(ours)) == sorted(peft_model.targeted_module_names)
    assert count_trainable(ours) == peft_model.get_nb_trainable_parameters()[0]
    inner = peft_model.base_model.model
    assert all(torch.equal(l.lora_A.weight, inner.get_submodule(n).lora_A["default"].weight)
               for n, l in lora_layers(ours).items()), "same seed, same module order: same A"

    copy_lora_to_peft(randomize_lora(ours, seed=1), peft_model)
    ids = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = load_fp()(ids).logits
        ours_logits, peft_logits = ours(ids).logits, peft_model(ids).logits
    assert (ours_logits - base_logits).abs().max() > 1e-2, "the adapter must change the logits"
    assert torch.equal(ours_logits, peft_logits)

    merge_lora(ours), peft_model.merge_adapter()
    for n, l in lora_layers(ours).items():
        assert torch.equal(l.base_layer.weight, inner.get_submodule(n).base_layer.weight), n
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, peft_model(ids).logits)


def test_fresh_adapter_is_noop_and_only_lora_trains(load_fp):
    model, ids = inject_lora(load_fp(), "all-linear", r=4), torch.arange(20).view(1, 20)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, load_fp()(ids).logits)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_all_linear_skips_output_head_like_peft(load_fp):
    names = find_targets(load_fp(), "all-linear")
    assert "lm_head" not in names and len(names) == 4 * 7  # 4 layers x 7 projections
    peft_model = get_peft_model(load_fp(), LoraConfig(target_modules="all-linear"))
    assert sorted(names) == sorted(peft_model.targeted_module_names)


@pytest.mark.parametrize("r", [0, -1, 2.5])
def test_bad_rank_raises_like_peft(load_fp, r):
    with pytest.raises(ValueError, match=f"r={r}"):
        inject_lora(load_fp(), ["q_proj"], r=r)
    if isinstance(r, int):
        with pytest.raises(ValueError):
            get_peft_model(load_fp(), LoraConfig(r=r, target_modules=["q_proj"]))


def test_non_linear_target_raises_like_peft(load_fp):
    with pytest.raises(ValueError, match=r"'mlp'.*LlamaMLP.*not an nn.Linear"):
        inject_lora(load_fp(), ["mlp"])
    with pytest.raises(ValueError, match="not supported"):
        get_peft_model(load_fp(), LoraConfig(target_modules=["mlp"]))


def test_unmatched_target_raises_like_peft(load_fp):
    with pytest.raises(ValueError, match=r"'qproj' matches no module.*'q_proj'"):
        inject_lora(load_fp(), ["qproj"])
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(load_fp(), LoraConfig(target_modules=["qproj"]))


def test_partly_unmatched_list_is_stricter_than_peft(load_fp):
    """Pins a PEFT 0.21 behaviour: one typo in a list of targets is silently ignored there."""
    with pytest.raises(ValueError, match="'qproj'"):
        inject_lora(load_fp(), ["q_proj", "qproj"])
    peft_model = get_peft_model(load_fp(), LoraConfig(target_modules=["q_proj", "qproj"]))
    assert len(peft_model.targeted_module_names) == 4


def test_double_injection_refused(load_fp):
    model = inject_lora(load_fp(), ["q_proj"])
    with pytest.raises(ValueError, match="already has LoRALinear"):
        inject_lora(model, "all-linear")


# ---- 4. training --------------------------------------------------------------------------------
def test_training_moves_only_lora_and_lowers_loss(load_fp, offline_profile, tok):
    from qlora_helpers.core.runtime import load_task_dataset
    ds = load_task_dataset(offline_profile)
    batches = [lora.chat_batch(tok, ds["train"].select(range(i, i + 8))) for i in range(0, 64, 8)]
    held_out = lora.chat_batch(tok, ds["test"].select(range(16)))  # small for test speed
    torch.manual_seed(0)
    model = inject_lora(load_fp(), "all-linear", r=8, alpha=16, dropout=0.05)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        before = lora.lm_loss(model, held_out).item()
    lora.train_steps(model, batches, lr=5e-3)
    with torch.no_grad():
        after = lora.lm_loss(model, held_out).item()
    assert after < 0.8 * before, (before, after)  # measured 5.8 -> ~3 in 8 steps
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    W = {n: l.base_layer.weight.detach().clone() for n, l in lora_layers(model).items()}
    D = {n: l.get_delta_weight().detach() for n, l in lora_layers(model).items()}
    merge_lora(model), unmerge_lora(model)
    for n, l in lora_layers(model).items():
        assert torch.all((l.base_layer.weight - W[n]).abs() <= FP32_EPS * (W[n].abs() + D[n].abs()))


def test_chat_batch_masks_padding(tok):
    rows = [{"messages": [{"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "01/02/2003"}]},
            {"messages": [{"role": "user", "content": "A much longer question here"},
                          {"role": "assistant", "content": "x"}]}]
    b = lora.chat_batch(tok, rows)
    assert torch.equal(b["labels"] == -100, b["attention_mask"] == 0)
    assert b["attention_mask"][0].sum() < b["attention_mask"][1].sum()


# ---- 5. exercise checkers can pass, wait and fail ----------------------------------------------
def test_exercise_checkers():
    assert ex01.check_exercise_1(40 * 2 * 8 * (5120 + 5120)) is True
    assert ex01.check_exercise_1(None) is None
    with pytest.raises(AssertionError):
        ex01.check_exercise_1(40 * 8 * (5120 + 5120))

    def good_delta(A, B, alpha, r, use_rslora):
        return (B @ A) * (alpha / math.sqrt(r) if use_rslora else alpha / r)

    assert ex01.check_exercise_2(good_delta) is True
    assert ex01.check_exercise_2(lambda *a: None) is None
    with pytest.raises(AssertionError):
        ex01.check_exercise_2(lambda A, B, alpha, r, rs: (B @ A) * alpha / r)  # ignores rsLoRA

    def good_plain(layer):
        plain = nn.Linear(layer.base_layer.in_features, layer.base_layer.out_features)
        with torch.no_grad():
            plain.weight.copy_(layer.base_layer.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight)
            plain.bias.copy_(layer.base_layer.bias)
        return plain

    assert ex01.check_exercise_3(good_plain) is True
    assert ex01.check_exercise_3(lambda layer: None) is None
    with pytest.raises(AssertionError):
        ex01.check_exercise_3(lambda layer: layer.base_layer)  # forgets ΔW

    assert ex01.check_exercise_4(16) is True
    assert ex01.check_exercise_4(None) is None
    with pytest.raises(AssertionError):
        ex01.check_exercise_4(32)


def test_a_merge_refuses_a_broken_adapter_and_names_the_layer():
    """PEFT's safe_merge: a NaN in an adapter (a training that blew up) must not be written into the base.
    merge_lora names the layer, and the base is left as it was."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    before = [m.weight.detach().clone() for m in model]
    lora.inject_lora(model, r=2)
    with torch.no_grad():
        lora.lora_layers(model)["1"].lora_B.weight[0, 0] = float("nan")   # row 0 of ΔW: its 8 values
    with pytest.raises(ValueError, match="^1: merge refused: W \\+ ΔW has 8 non-finite value"):
        lora.merge_lora(model)
    assert torch.equal(lora.lora_layers(model)["1"].base_layer.weight, before[1])


def test_injecting_into_nothing_is_refused():
    """A setting that would leave nothing to train says so (here: "all-linear" on a model whose only linear
    layer is its output head, which "all-linear" skips)."""
    class HeadOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lm_head = nn.Embedding(10, 4), nn.Linear(4, 10)

        def get_output_embeddings(self):
            return self.lm_head
    with pytest.raises(ValueError, match="leaves no layer to wrap in this HeadOnly"):
        lora.inject_lora(HeadOnly())


def test_one_step_refuses_an_optimizer_it_does_not_know():
    with pytest.raises(ValueError, match="'sgd' or one of adamw_torch"):
        lora.one_step_update_norm(4, False, optimizer="adam")
