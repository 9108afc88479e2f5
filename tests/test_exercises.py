"""The exercise checkers of every lesson share one protocol (qlora_helpers.exercises): a placeholder
waits, a right answer passes, a wrong one fails with what is off. Checkers of lessons 01-03 and 05
are tested beside their lesson's tests; these are the protocol and lessons 00, 04 and 06."""
import pytest

from qlora_helpers import exercises
from qlora_helpers.exercises import lesson00, lesson04, lesson06


def test_protocol_survives_python_O():
    """expect() is an explicit raise, not an assert statement: it must fire under -O as well."""
    import subprocess
    import sys
    code = "from qlora_helpers.exercises import expect\nexpect(False, 'wrong answer')"
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True)
    assert out.returncode != 0 and "AssertionError: wrong answer" in out.stderr


@pytest.mark.parametrize("placeholder", [None, ...])
def test_placeholders_wait(placeholder, capsys):
    assert exercises.attempted(placeholder, "Exercise 9") is False
    assert "Exercise 9: not attempted yet" in capsys.readouterr().out


def test_no_dq_bytes_checker(offline_profile, capsys):
    """Lesson 00's oracle is bitsandbytes' own list of state tensors (QuantState.as_dict); checked here
    against a count by hand from the layer shapes: codes n/2 bytes, one fp32 absmax per 64, 16-entry table."""
    import bitsandbytes as bnb

    from qlora_helpers.core.runtime import load_model
    plain = load_model(offline_profile, double_quant=False)
    layers = [m for m in plain.modules() if isinstance(m, bnb.nn.Linear4bit)]
    by_hand = sum(m.in_features * m.out_features // 2 + 4 * (m.in_features * m.out_features // 64) + 16 * 4
                  for m in layers)
    assert lesson00.linear4bit_bytes(plain) == by_hand
    assert lesson00.check_no_dq_bytes(None, offline_profile) is None
    assert lesson00.check_no_dq_bytes(by_hand, offline_profile) is True
    with pytest.raises(AssertionError, match="bitsandbytes stores"):
        lesson00.check_no_dq_bytes(lesson00.linear4bit_bytes(load_model(offline_profile)), offline_profile)  # with DQ


def test_lesson04_checkers(offline_profile, tok, tmp_path):
    from datasets import Dataset

    from qlora_helpers.core.chat_data import IGNORE_INDEX, padded_collator
    rows = Dataset.from_list([{"input_ids": [5, 6, 7, 8], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8]},
                              {"input_ids": [5, 6, 9, 9, 10, 11], "labels": [IGNORE_INDEX] * 4 + [10, 11]}])
    assert lesson04.check_label_share(4 / 10, rows) is True          # 4 labelled of 10 tokens, by hand
    with pytest.raises(AssertionError, match="divide by all tokens"):
        lesson04.check_label_share(4 / 6, rows)                      # labelled / unlabelled: the usual slip
    assert lesson04.check_label_share(None, rows) is None

    from transformers import AutoConfig

    from qlora_helpers.lora import llama_lora_param_count
    cfg = AutoConfig.from_pretrained(offline_profile.model_source)
    want = llama_lora_param_count(cfg, 64)  # the kit's count by formula; PEFT counts inside the checker
    assert lesson04.check_paper_trainable(want, offline_profile) is True
    with pytest.raises(AssertionError, match="PEFT counts"):
        lesson04.check_paper_trainable(llama_lora_param_count(cfg, 16), offline_profile)

    alarm = lesson04.all_masked_alarm(offline_profile, rows, padded_collator(tok, None), tmp_path)
    assert alarm != "no alarm" and "label" in alarm.lower(), alarm


def test_lesson06_checkers(offline_profile):
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(offline_profile.model_source)
    # by hand from the config: q and o are (h, h); k and v are (h, kv_heads * head_dim)
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    want = cfg.num_hidden_layers * 32 * (2 * (h + h) + 2 * (h + kv))
    assert lesson06.check_param_count(cfg, want) is True
    with pytest.raises(AssertionError, match="grouped-query"):
        lesson06.check_param_count(cfg, cfg.num_hidden_layers * 32 * 4 * (h + h))  # ignores GQA
    assert lesson06.check_rslora_scale(16) is True
    with pytest.raises(AssertionError):
        lesson06.check_rslora_scale(4)
