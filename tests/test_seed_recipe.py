"""The source document's training code, measured: padding share and masked EOS labels (notebook 07)."""
from qlora_helpers import seed_recipe
from qlora_helpers.core.chat_data import IGNORE_INDEX
from qlora_helpers.core.runtime import get_profile, load_task_dataset, load_tokenizer
from qlora_helpers.merge import conversation_texts
from qlora_helpers.sft_data import tokenize_chat


def test_with_smollm2_every_eos_of_the_course_conversations_is_masked(real_profile):
    tok = load_tokenizer(real_profile)
    assert tok.pad_token_id == tok.eos_token_id            # SmolLM2 ships pad = eos (<|im_end|>)
    rows = list(load_task_dataset(real_profile)["train"].select(range(32)))
    report = seed_recipe.label_report(
        seed_recipe.seed_batch(seed_recipe.seed_tokenize(conversation_texts(tok, rows), tok), tok), tok)
    assert report["eos_in_text"] >= 2 * len(rows)          # each conversation ends two turns with <|im_end|>
    assert report["eos_labelled"] == 0                     # ... and not one of them is a label
    assert report["pad_share"] > 0.7                       # ~60-token conversations padded to 256
    # The kit's labels (notebook 04) end every answer with EOS as a label: the model learns to stop.
    kit = tokenize_chat(rows[0], tok)
    assert kit["labels"][-1] == tok.eos_token_id != IGNORE_INDEX


def test_with_its_own_pad_token_the_eos_stays_a_label():
    # The kit's tiny tokenizer has a pad token of its own: the document's line leaves it, and EOS is learned.
    profile = get_profile("offline", model="tiny")
    tok = load_tokenizer(profile)
    assert tok.pad_token_id != tok.eos_token_id
    rows = list(load_task_dataset(profile)["train"].select(range(8)))
    report = seed_recipe.label_report(
        seed_recipe.seed_batch(seed_recipe.seed_tokenize(conversation_texts(tok, rows), tok), tok), tok)
    assert report["eos_in_text"] > 0 and report["eos_labelled"] == report["eos_in_text"]
