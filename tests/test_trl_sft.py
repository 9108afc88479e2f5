"""TRL's SFTTrainer against the kit's hand-built data path (qlora_helpers.trl_sft).

The oracles: the kit's response-only labels (``sft_data.tokenize_chat``, from the prompt as a prefix
of the conversation, a mechanism independent of generation markers), TRL's own dataset preparation
and collator, and the model's loss on the kit's padded batch.
"""
import pytest
import torch

from qlora_helpers.core.chat_data import IGNORE_INDEX, padded_collator
from qlora_helpers.sft_data import tokenize_chat, tokenize_dataset
from qlora_helpers.trl_sft import compare_labels, loss_gaps, sft_config, training_chat_template, unpacked_rows


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def marked_tok(request, assets, real_profile):
    from qlora_helpers.core.runtime import get_profile, load_tokenizer
    profile = get_profile("offline", model=request.param)
    tok = load_tokenizer(profile)
    original = load_tokenizer(profile)
    tok.chat_template = training_chat_template(tok)
    return profile, tok, original


def test_marked_template_renders_the_same_text_and_masks_the_kit_labels(marked_tok):
    from qlora_helpers.core.runtime import load_task_dataset
    profile, tok, original = marked_tok
    rows = load_task_dataset(profile)["train"].select(range(40))
    for row in rows:
        msgs = row["messages"]
        assert tok.apply_chat_template(msgs, tokenize=False) == original.apply_chat_template(msgs, tokenize=False)
        out = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
        kit = tokenize_chat(row, original)
        n = len(kit["input_ids"])
        assert out["input_ids"][:n] == kit["input_ids"]
        assert out["assistant_masks"][:n] == [int(label != IGNORE_INDEX) for label in kit["labels"]]
        assert not any(out["assistant_masks"][n:])   # the newline after <|im_end|> is not the assistant's


def test_unknown_templates_are_refused_with_the_fix_and_marked_ones_kept(marked_tok):
    _, tok, original = marked_tok
    assert training_chat_template(tok) == tok.chat_template       # already marked: unchanged
    other = type(original).from_pretrained(original.name_or_path, local_files_only=True)
    other.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="generation %}"):
        training_chat_template(other)


def test_sft_config_reads_the_same_dict_as_the_kits_training_arguments(offline_profile, tmp_path):
    from qlora_helpers.core.recipe import KIT_SFT
    from qlora_helpers.sft import training_arguments, training_kwargs
    rec = KIT_SFT.replace(lr=3e-4, steps=12, warmup_steps=4, batch_size=4, max_grad_norm=0.5, seed=7)
    cfg = sft_config(offline_profile, str(tmp_path), rec, packing=True, max_length=256)
    ta = training_arguments(offline_profile, str(tmp_path), rec)
    for key in training_kwargs(offline_profile, str(tmp_path), rec):
        assert getattr(cfg, key) == getattr(ta, key), key
    assert cfg.assistant_only_loss and cfg.packing and cfg.max_length == 256


@pytest.mark.parametrize("assistant_only", [True, False])
def test_trl_packed_dataset_holds_the_kit_rows(offline_profile, tok, tmp_path, assistant_only):
    """TRL's own preparation (tokenize, build labels, best-fit packing) gives back every kit row with the
    kit's labels; without assistant_only_loss TRL trains on the prompt too and no row matches."""
    from trl import SFTTrainer

    from qlora_helpers.core.qlora_model import prepare_qlora_model
    from qlora_helpers.core.runtime import load_model, load_task_dataset, load_tokenizer, quiet_datasets
    from qlora_helpers.sft import lora_config
    rows = load_task_dataset(offline_profile)["train"].select(range(64))
    trl_tok = load_tokenizer(offline_profile)
    trl_tok.chat_template = training_chat_template(trl_tok)
    model = prepare_qlora_model(load_model(offline_profile), lora_config())
    args = sft_config(offline_profile, str(tmp_path), packing=True, max_length=256,
                      per_device_train_batch_size=1, assistant_only_loss=assistant_only)
    with quiet_datasets():
        packed = SFTTrainer(model=model, args=args, processing_class=trl_tok,
                            train_dataset=rows.select_columns(["messages"])).train_dataset
    assert len(packed) < len(rows)                                # rows really were packed together
    check = compare_labels(unpacked_rows(packed), list(tokenize_dataset(rows, tok)))
    assert check["rows_trl"] == check["rows_kit"] == 64
    assert check["matched"] == (64 if assistant_only else 0)


def test_trl_padding_free_batch_has_the_kit_loss(offline_profile, tok):
    """The same 4 rows: the kit's padded batch and TRL's padding-free collation give the same loss."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from qlora_helpers.core.runtime import load_model, load_task_dataset
    rows = list(tokenize_dataset(load_task_dataset(offline_profile)["train"].select(range(4)), tok))
    model = load_model(offline_profile)
    with torch.no_grad():
        kit = model(**padded_collator(tok, None)([dict(r) for r in rows])).loss
        flat = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(rows)
        trl = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"], labels=flat["labels"],
                    use_cache=False).loss
    assert flat["input_ids"].shape[0] == 1 and "attention_mask" not in flat
    assert abs(kit.item() - trl.item()) < 1e-4, (kit.item(), trl.item())


def test_loss_gaps_need_a_common_step():
    with pytest.raises(ValueError, match="logging_steps"):
        loss_gaps([{"step": 1, "loss": 1.0}], [{"step": 2, "loss": 1.0}])


def test_unpacked_rows_refuses_inconsistent_lengths():
    with pytest.raises(ValueError, match="seq_lengths"):
        unpacked_rows([{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "seq_lengths": [2, 2]}])
