"""qlora_helpers.failures and notebook 08's checker (exercises.lesson08). Each check is tested against the production
code whose failure it stands for: transformers' own loss and packed-sequence rule, torch's AdamW, PEFT's injection
and its merge into a bitsandbytes 4-bit layer, TrainingArguments' NaN filter. On the kit's tiny model (small for
test speed)."""
import warnings

import pytest
import torch
from peft import get_peft_model

from qlora_helpers import failures
from qlora_helpers.core.chat_data import IGNORE_INDEX, conversation_ids
from qlora_helpers.core.recipe import KIT_LOOP
from qlora_helpers.core.runtime import load_model
from qlora_helpers.sft_data import packed_logits, tokenize_chat

ROWS = [{"messages": [{"role": "user", "content": f"Rewrite the date 2024-03-{d:02d} as DD/MM/YYYY."},
                      {"role": "assistant", "content": f"{d:02d}/03/2024"}]} for d in (17, 5, 28)]


@pytest.fixture(scope="module")
def fp_model(offline_profile):
    return load_model(offline_profile, quantized=False).eval()


def _answer_after(row, prefix):
    return {"messages": [dict(m, content=prefix + m["content"]) if m["role"] == "assistant" else m
                         for m in row["messages"]]}


# --- 1. template search --------------------------------------------------------------------------------------
def test_template_search_by_hand():
    assert failures.template_search_labels([7, 1, 2, 8, 1, 2, 9], [1, 2]) == [IGNORE_INDEX] * 6 + [9]  # last match
    assert failures.template_search_labels([1, 2], [1, 2]) == [IGNORE_INDEX] * 2
    assert failures.template_start([], [1]) is None and failures.template_start([3, 1], [1]) == 1


def test_a_template_merged_in_context_leaves_no_label_and_transformers_loss_is_nan(fp_model, tok):
    """The tiny tokenizer merges the template's last newline with an answer's leading one: the search finds
    nothing, every label is -100, and transformers' own loss (the oracle) is nan; the kit's prefix check refuses
    the row by name, and check_every_row_labelled names it."""
    template = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    clean = tok.apply_chat_template(ROWS[0]["messages"], return_dict=False)
    assert failures.template_start(clean, template) is not None
    row = _answer_after(ROWS[0], "\n")
    ids = tok.apply_chat_template(row["messages"], return_dict=False)
    labels = failures.template_search_labels(ids, template)
    assert failures.template_start(ids, template) is None and set(labels) == {IGNORE_INDEX}
    with torch.no_grad():
        loss = fp_model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]), use_cache=False).loss
    assert torch.isnan(loss)
    with pytest.raises(ValueError, match=r"1 of 2 rows have no label .*rows \[1\]"):
        failures.check_every_row_labelled([failures.template_search_labels(clean, template), labels])
    failures.check_every_row_labelled(torch.tensor([failures.template_search_labels(clean, template)]))
    with pytest.raises(ValueError, match="renders the prompt differently"):
        conversation_ids(row, tok)


# --- 2. fp16 adapters under AdamW ----------------------------------------------------------------------------
def test_torch_adamw_writes_nan_in_fp16_and_the_dtype_check_refuses_fp16_adapters(offline_profile):
    """The reason, with torch's AdamW as the oracle: a zero gradient gives 0/0 and a small one m/0 in fp16 (eps and
    the second moment round to 0); fp32 stays finite. PEFT makes fp16 adapters only when told to."""
    grads = [0.0, 1e-4, 1e-3, 0.1]
    for dtype in (torch.float16, torch.float32):
        p = torch.nn.Parameter(torch.zeros(4, dtype=dtype))
        p.grad = torch.tensor(grads, dtype=dtype)
        torch.optim.AdamW([p], lr=1e-3).step()
        if dtype == torch.float16:
            assert torch.isnan(p[0]) and torch.isinf(p[1]) and torch.isinf(p[2]) and torch.isfinite(p[3])
        else:
            assert torch.isfinite(p).all()
    base16 = lambda: load_model(offline_profile, quantized=False, dtype=torch.float16)
    with pytest.raises(TypeError, match="are not torch.float32"):
        failures.check_adapter_dtype(get_peft_model(base16(), KIT_LOOP.lora_config(), autocast_adapter_dtype=False))
    failures.check_adapter_dtype(get_peft_model(base16(), KIT_LOOP.lora_config()))


# --- 4. the base PEFT changed in place -----------------------------------------------------------------------
def test_check_plain_base_sees_peft_injection(offline_profile):
    base = load_model(offline_profile)
    failures.check_plain_base(base)
    model = get_peft_model(base, KIT_LOOP.lora_config())
    n = len([m for m in model.modules() if hasattr(m, "lora_A")])
    with pytest.raises(ValueError, match=f"holds {n} LoRA layers"):
        failures.check_plain_base(base)
    assert failures.lora_layer_names(base) == failures.lora_layer_names(model.get_base_model())


# --- 5. packing with a cache ---------------------------------------------------------------------------------
def test_is_packed_is_transformers_rule():
    from transformers.masking_utils import find_packed_sequence_indices
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        lengths = torch.randint(1, 6, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
        pos = torch.cat([torch.arange(n) for n in lengths])[None]           # (1, sum(lengths))
        assert failures.is_packed(pos) == (find_packed_sequence_indices(pos) is not None), lengths


def test_response_loss_is_transformers_loss(fp_model, tok):
    ex = tokenize_chat(ROWS[0], tok)
    with torch.no_grad():
        out = fp_model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]]), use_cache=False)
    assert abs(failures.response_loss(out.logits[0], ex["labels"]) - out.loss.item()) < 1e-5


def test_packed_losses_equal_alone_only_without_a_cache_and_the_check_refuses_a_cache(fp_model, tok):
    """Pins transformers 5.23: the block mask from position_ids only when no cache is built."""
    exs = [tokenize_chat(r, tok) for r in ROWS]
    ids = [e["input_ids"] for e in exs]
    with torch.no_grad():
        alone = [failures.response_loss(fp_model(input_ids=torch.tensor([x]), use_cache=False).logits[0], e["labels"])
                 for x, e in zip(ids, exs)]
    for use_cache in (False, True):
        packed = [failures.response_loss(lg, e["labels"]) for lg, e in zip(packed_logits(fp_model, ids, use_cache), exs)]
        worst = max(abs(a - b) for a, b in zip(packed, alone))
        assert (worst < 1e-4) == (not use_cache), (use_cache, worst)      # float order only, without a cache
    batch = {"input_ids": torch.ones(1, 5), "position_ids": torch.tensor([[0, 1, 2, 0, 1]])}
    for use_cache in (None, True):
        with pytest.raises(ValueError, match="Pass use_cache=False"):
            failures.check_packed_call(batch, use_cache)
    failures.check_packed_call(batch, False)
    failures.check_packed_call({**batch, "attention_mask": torch.ones(1, 5)}, None)            # a mask says it all
    failures.check_packed_call({"input_ids": torch.ones(1, 3), "position_ids": torch.tensor([[0, 1, 2]])}, None)


# --- 6. merging into 4-bit ------------------------------------------------------------------------------------
def test_requantize_nf4_is_peft_merge_into_a_4bit_layer(offline_profile):
    from qlora_helpers.merge import dequantize_weight
    torch.manual_seed(0)
    model = get_peft_model(load_model(offline_profile), KIT_LOOP.lora_config())
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.05)                     # a non-zero update, fixed seed
    before, delta = dequantize_weight(layer.get_base_layer()), layer.get_delta_weight("default").float()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer.merge()
    assert any("4-bit linear may get different generations" in str(w.message) for w in caught)
    after = dequantize_weight(layer.get_base_layer())
    assert torch.equal(after, failures.requantize_nf4(before + delta))
    lost = failures.update_survival(before, after, delta)
    assert 0 < lost["relative_error"] and lost["cosine"] < 1
    whole = failures.update_survival(before, before + delta, delta)
    assert whole["relative_error"] < 1e-6 and abs(whole["kept"] - 1) < 1e-6 and abs(whole["cosine"] - 1) < 1e-6


def test_update_survival_by_hand():
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    half = failures.update_survival(torch.zeros(2, 2), 0.5 * d, d)
    assert half == pytest.approx({"changed": 0.5, "kept": 0.5, "cosine": 1.0, "relative_error": 0.5})
    sideways = failures.update_survival(torch.zeros(2, 2), torch.tensor([[0.0, 1.0], [1.0, 0.0]]), d)
    assert sideways == pytest.approx({"changed": 0.5, "kept": 0.0, "cosine": 0.0, "relative_error": 2 ** 0.5})


# --- 7. Trainer's NaN filter ------------------------------------------------------------------------------------
def test_the_nan_filter_check_reads_the_arguments(offline_profile, tmp_path):
    from transformers import TrainingArguments

    from qlora_helpers.sft import training_arguments
    with pytest.raises(ValueError, match="logging_nan_inf_filter=True"):
        failures.check_nan_filter_off(TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True))
    failures.check_nan_filter_off(training_arguments(offline_profile, str(tmp_path)))


# --- the exercise's checker: a placeholder waits, wrong fixes fail with what is off, the fix passes --------------
def test_lesson08_checker_refuses_placeholders_wrong_fixes_and_the_library(offline_profile, capsys):
    from qlora_helpers.core.qlora_model import prepare_qlora_model
    from qlora_helpers.exercises import lesson08

    assert lesson08.check_fixed_trainable(None, offline_profile) is None
    assert lesson08.check_fixed_trainable(lambda base, config: None, offline_profile) is None   # the student stub
    assert "not attempted yet" in capsys.readouterr().out

    def fixed(base, config):
        base.activation_checkpointing_enable({"use_reentrant": False})
        return get_peft_model(base, config)
    assert lesson08.check_fixed_trainable(fixed, offline_profile) is True

    with pytest.raises(AssertionError, match="NaN or inf after two AdamW steps"):
        lesson08.check_fixed_trainable(lesson08.broken_trainable, offline_profile)
    with pytest.raises(AssertionError, match="keep activation checkpointing on"):
        lesson08.check_fixed_trainable(lambda base, config: get_peft_model(base, config), offline_profile)

    def bf16_adapter(base, config):   # finite (bf16 has fp32's range) but not fp32
        base.activation_checkpointing_enable({"use_reentrant": False})
        model = get_peft_model(base, config)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.bfloat16()
        return model
    with pytest.raises(AssertionError, match="not torch.float32"):
        lesson08.check_fixed_trainable(bf16_adapter, offline_profile)

    def other_config(base, config):
        base.activation_checkpointing_enable({"use_reentrant": False})
        return get_peft_model(base, KIT_LOOP.replace(r=3).lora_config())
    with pytest.raises(AssertionError, match="config you were given"):
        lesson08.check_fixed_trainable(other_config, offline_profile)
    with pytest.raises(AssertionError, match="called qlora_helpers.core.qlora_model.prepare_qlora_model"):
        lesson08.check_fixed_trainable(lambda base, config: prepare_qlora_model(base, config), offline_profile)
