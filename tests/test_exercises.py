"""The exercise checkers of every lesson share one protocol (qlora_helpers.exercises): a placeholder
waits, a right answer passes, a wrong one fails with what is off. Checkers of lessons 01-03 and 05
are tested beside their lesson's tests; these are the protocol and lessons 00, 04, 06, 07 and 09."""
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
    against a count by hand from the layer shapes: codes n/2 bytes, one fp32 absmax per 64, 16-entry table.
    The exercise's three attacks: a placeholder waits, a printed count returned as a constant fails, and so
    does measuring instead of predicting (loading the model, quantizing)."""
    import bitsandbytes as bnb

    from qlora_helpers.core.runtime import load_model
    plain = load_model(offline_profile, double_quant=False)
    layers = [m for m in plain.modules() if isinstance(m, bnb.nn.Linear4bit)]
    by_hand = sum(m.in_features * m.out_features // 2 + 4 * (m.in_features * m.out_features // 64) + 16 * 4
                  for m in layers)
    assert lesson00.linear4bit_bytes(plain) == by_hand

    def predict(shapes):
        return sum(-(-o * i // 2) + 4 * -(-o * i // 64) + 64 for o, i in shapes)
    assert lesson00.check_no_dq_bytes(None, offline_profile) is None
    assert lesson00.check_no_dq_bytes(lambda shapes: None, offline_profile) is None
    assert lesson00.check_no_dq_bytes(predict, offline_profile) is True
    with pytest.raises(AssertionError, match="bitsandbytes stores"):
        lesson00.check_no_dq_bytes(lambda shapes: by_hand, offline_profile)                       # a constant
    with pytest.raises(AssertionError, match="partial"):
        lesson00.check_no_dq_bytes(lambda s: sum(o * i // 2 + 4 * (o * i // 64) + 64 for o, i in s), offline_profile)
    with pytest.raises(AssertionError, match="called qlora_helpers.core.runtime.load_model"):
        lesson00.check_no_dq_bytes(lambda s: lesson00.linear4bit_bytes(load_model(offline_profile, double_quant=False)),
                                   offline_profile)


def test_lesson04_checkers(offline_profile, tok, tmp_path):
    from datasets import Dataset

    from qlora_helpers.core.chat_data import IGNORE_INDEX, padded_collator
    rows = Dataset.from_list([{"input_ids": [5, 6, 7, 8], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8]},
                              {"input_ids": [5, 6, 9, 9, 10, 11], "labels": [IGNORE_INDEX] * 4 + [10, 11]}])
    # by hand: 4 labels; one batch of 2 rows padded to 6 -> 12 positions; batches of 1 -> 4 + 6 = 10 positions
    assert lesson04.check_label_share(4 / 12, rows, batch_size=2) is True
    assert lesson04.check_label_share(4 / 10, rows, batch_size=1) is True
    with pytest.raises(AssertionError, match="share of the tokens"):
        lesson04.check_label_share(4 / 10, rows, batch_size=2)         # the tokens' share, printed in section 2
    with pytest.raises(AssertionError, match="divide by"):
        lesson04.check_label_share(4 / 6, rows, batch_size=2)          # labelled / unlabelled: the usual slip
    assert lesson04.check_label_share(None, rows) is None

    from transformers import AutoConfig

    from qlora_helpers.lora import llama_lora_param_count
    cfg = AutoConfig.from_pretrained(offline_profile.model_source)
    want = llama_lora_param_count(cfg, 64)  # the kit's count by formula; PEFT counts inside the checker
    assert lesson04.check_paper_trainable(want, offline_profile) is True
    with pytest.raises(AssertionError, match="PEFT counts"):
        lesson04.check_paper_trainable(llama_lora_param_count(cfg, 16), offline_profile)

    # every label masked (notebook 08, failure 1): the kit's health check stops the run and names the labels
    from transformers import Trainer

    from qlora_helpers.core.qlora_model import prepare_qlora_model
    from qlora_helpers.core.recipe import recipe_for
    from qlora_helpers.core.runtime import load_model
    from qlora_helpers.sft import training_arguments
    from qlora_helpers.sft_checks import TrainingHealthCallback
    masked = Dataset.from_list([{"input_ids": r["input_ids"], "labels": [IGNORE_INDEX] * len(r["labels"])} for r in rows])
    model = prepare_qlora_model(load_model(offline_profile), recipe_for(offline_profile))
    args = training_arguments(offline_profile, str(tmp_path), max_steps=2, logging_steps=1, disable_tqdm=True)
    with pytest.raises(Exception, match="(?i)label"):
        Trainer(model=model, args=args, train_dataset=masked, data_collator=padded_collator(tok, None),
                callbacks=[TrainingHealthCallback(model)]).train()


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


# ----------------------------------------------------------------------------------------------
# The three attacks (issue: exercises that teach): a placeholder, a value the notebook already printed, and
# the library function the exercise re-implements. Each strong exercise must refuse all three.
# ----------------------------------------------------------------------------------------------
def printed_numbers(notebook: str, before: int) -> list[float]:
    """Every number the answer key prints in code cells before code cell ``before`` (what a learner running the
    student copy sees above the exercise): integers with thousands separators, decimals, exponents."""
    import json
    import re
    from pathlib import Path
    cells = [c for c in json.loads((Path(__file__).parent.parent / "notebooks" / notebook).read_text())["cells"]
             if c["cell_type"] == "code"][:before]
    text = " ".join("".join(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                    for c in cells for o in c.get("outputs", []))
    found = {float(m.replace(",", "")) for m in re.findall(r"-?\d[\d,]*\.?\d*(?:e[-+]?\d+)?", text)}
    assert len(found) > 20, f"{notebook}: only {len(found)} numbers printed before code cell {before}"
    return sorted(found)


def _first_exercise(notebook: str) -> int:
    from pathlib import Path

    from qlora_helpers.workshop import solution_cells
    return min(solution_cells(Path(__file__).parent.parent / "notebooks" / notebook))


def test_lesson01_exercises_refuse_placeholders_printed_values_and_the_library(capsys):
    import math

    import torch

    from qlora_helpers.exercises import lesson01
    from qlora_helpers.lora import LoRALinear, lora_scaling
    # 1. placeholders wait
    assert lesson01.check_exercise_1(None) is None and lesson01.check_exercise_4(None) is None
    assert lesson01.check_exercise_2(lambda *a: None) is None and lesson01.check_exercise_3(lambda layer: None) is None
    # 2. no number printed above the exercises answers one, nor a function returning it
    # (exercise 4's alpha, 16, is printed everywhere: it is the quick arithmetic one, not a strong exercise)
    seen = printed_numbers("01_lora_math.ipynb", _first_exercise("01_lora_math.ipynb"))
    for v in seen:
        with pytest.raises(AssertionError):
            lesson01.check_exercise_1(v)
    for v in seen[:: max(1, len(seen) // 40)]:
        with pytest.raises(AssertionError):
            lesson01.check_exercise_2(lambda A, B, alpha, r, rs, v=v: torch.full((B.shape[0], A.shape[1]), v))
    # 3. the library's own ΔW or merge is refused, however it is reached
    def via_library(A, B, alpha, r, rs):
        layer = LoRALinear(torch.nn.Linear(A.shape[1], B.shape[0], bias=False), r=r, alpha=alpha, use_rslora=rs)
        layer.lora_A.weight.data, layer.lora_B.weight.data = A, B
        return layer.get_delta_weight()
    for cheat in (via_library, lambda A, B, alpha, r, rs: lora_scaling(alpha, r, rs) * (B @ A)):
        with pytest.raises(AssertionError, match="asks you to write this yourself"):
            lesson01.check_exercise_2(cheat)

    def merged_by_library(layer):
        import copy
        twin = copy.deepcopy(layer)
        twin.merge()
        return twin.base_layer
    with pytest.raises(AssertionError, match="called LoRALinear.merge"):
        lesson01.check_exercise_3(merged_by_library)
    # and the solutions pass (the answer key runs them too, under nbval)
    assert lesson01.check_exercise_2(lambda A, B, a, r, rs: (a / (math.sqrt(r) if rs else r)) * (B @ A)) is True


def test_lesson02_pack_refuses_placeholders_printed_values_and_the_library():
    import torch

    from qlora_helpers import nf4
    from qlora_helpers.exercises import lesson02
    assert lesson02.check_pack(None) is None and lesson02.check_pack(lambda codes: None) is None
    seen = printed_numbers("02_nf4_quantiles.ipynb", _first_exercise("02_nf4_quantiles.ipynb"))
    for v in [x for x in seen if 0 <= x < 256 and x == int(x)]:          # any printed byte, as the whole answer
        with pytest.raises(AssertionError):
            lesson02.check_pack(lambda codes, v=int(v): torch.full(((codes.numel() + 1) // 2,), v, dtype=torch.uint8))
    import bitsandbytes.functional as bnbF
    cheats = [nf4.pack_nibbles, lambda codes: nf4.quantize_nf4(nf4.nf4_levels()[codes])[0],
              lambda codes: bnbF.quantize_4bit(nf4.nf4_levels()[codes], blocksize=64, quant_type="nf4")[0].reshape(-1)]
    for cheat in cheats:
        with pytest.raises(AssertionError, match="asks you to write this yourself"):
            lesson02.check_pack(cheat)


def test_lesson03_stored_bytes_refuses_placeholders_printed_values_and_the_library():
    from qlora_helpers import double_quant as dq
    from qlora_helpers.exercises import lesson03
    assert lesson03.check_stored_bytes(None) is None and lesson03.check_stored_bytes(lambda *a: None) is None
    seen = printed_numbers("03_double_quant_memory.ipynb", _first_exercise("03_double_quant_memory.ipynb"))
    for v in [x for x in seen if x >= 1]:            # any printed byte count, returned whatever the weight
        with pytest.raises(AssertionError):
            lesson03.check_stored_bytes(lambda n, b, d, v=v: int(v))
    for cheat in (lambda n, b, d: sum(dq.storage_bytes(n, b, d).values()),
                  lambda n, b, d: round(n * dq.bits_per_param(b, d) / 8) + 64):
        with pytest.raises(AssertionError, match="asks you to write this yourself"):
            lesson03.check_stored_bytes(cheat)


def test_lesson04_fixed_collate_refuses_placeholders_the_broken_cell_and_the_library(offline_profile, tok):
    """Exercise 3 (debugging) on the tiny model's chat rows: the broken cell itself fails (it labels the prompt;
    on SmolLM2, whose pad token is its EOS, it also masks every EOS label and attention to every EOS), so do the
    kit's collator and transformers' own, called instead of written."""
    import torch

    from qlora_helpers.core.chat_data import padded_collator
    from qlora_helpers.core.runtime import load_task_dataset
    train = load_task_dataset(offline_profile)["train"]
    assert lesson04.check_fixed_collate(None, tok, train) is None
    assert lesson04.check_fixed_collate(lambda rows, pad: None, tok, train) is None
    with pytest.raises(AssertionError, match="differs"):
        lesson04.check_fixed_collate(lesson04.broken_collate, tok, train)

    def fixed(rows, pad_id):
        width = max(len(r["input_ids"]) for r in rows)
        pad = [width - len(r["input_ids"]) for r in rows]
        return {"input_ids": torch.tensor([r["input_ids"] + [pad_id] * p for r, p in zip(rows, pad)]),
                "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * p for r, p in zip(rows, pad)]),
                "labels": torch.tensor([[-100] * r["n_prompt"] + r["input_ids"][r["n_prompt"]:] + [-100] * p
                                        for r, p in zip(rows, pad)])}
    assert lesson04.check_fixed_collate(fixed, tok, train) is True

    def via_kit(rows, pad_id):
        return padded_collator(tok, None)([{"input_ids": r["input_ids"],
                                            "labels": [-100] * r["n_prompt"] + r["input_ids"][r["n_prompt"]:]} for r in rows])
    for cheat in (via_kit, lambda rows, pad_id: tok.pad([{"input_ids": r["input_ids"]} for r in rows], return_tensors="pt")):
        with pytest.raises(AssertionError, match="asks you to write this yourself"):
            lesson04.check_fixed_collate(cheat, tok, train)


def test_lesson06_separated_refuses_placeholders_constants_and_the_library():
    import statistics

    from qlora_helpers import seed_stats
    assert lesson06.check_separated(None) is None and lesson06.check_separated(lambda *a: None) is None
    for constant in (True, False):                       # what copying one printed verdict amounts to
        with pytest.raises(AssertionError):
            lesson06.check_separated(lambda rows, a, b, key, c=constant: c)

    def by_hand(rows, a, b, key):
        va, vb = ([r[key] for r in rows if r["name"] == n] for n in (a, b))
        if min(len(va), len(vb)) < 2:
            return None
        return abs(statistics.fmean(va) - statistics.fmean(vb)) > 2 * max(statistics.stdev(va), statistics.stdev(vb))
    assert lesson06.check_separated(by_hand) is True
    for cheat in (seed_stats.separated, lambda rows, a, b, key: "difference larger" in seed_stats.verdict(rows, a, b, key)):
        with pytest.raises(AssertionError, match="asks you to write this yourself"):
            lesson06.check_separated(cheat)


def test_lesson07_predicted_bytes_refuse_placeholders_printed_values_and_the_planner(real_profile):
    """Notebook 07's exercise on the course model (SmolLM2): the prediction by hand passes against the
    measurement, forgetting AdamW's step counters fails, a printed byte count returned whatever the run fails,
    and asking the planner fails."""
    from qlora_helpers import memory
    from qlora_helpers.exercises import lesson07

    def by_hand(config, r, targets, counters=True):
        h, inter = config.hidden_size, config.intermediate_size
        kv = config.num_key_value_heads * (h // config.num_attention_heads)
        shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                  "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
        n = config.num_hidden_layers * sum(r * sum(shapes[t]) for t in targets)
        steps = 4 * 2 * config.num_hidden_layers * len(targets) if counters else 0
        return {"trainable weights": 4 * n, "gradients": 4 * n, "optimizer state": 8 * n + steps}
    assert lesson07.check_predicted_bytes(None, real_profile) is None
    assert lesson07.check_predicted_bytes(lambda *a: None, real_profile) is None
    assert lesson07.check_predicted_bytes(by_hand, real_profile) is True
    with pytest.raises(AssertionError, match="optimizer state"):
        lesson07.check_predicted_bytes(lambda c, r, t: by_hand(c, r, t, counters=False), real_profile)
    seen = printed_numbers("07_claims_measured.ipynb", _first_exercise("07_claims_measured.ipynb"))
    for v in sorted(x for x in seen if x > 1e5 and x % 4 == 0)[-3:]:   # the largest printed byte counts (each
        # check builds and measures a model: three keep it short; the rank and targets are random anyway)
        with pytest.raises(AssertionError):
            lesson07.check_predicted_bytes(lambda c, r, t, v=v: dict.fromkeys(lesson07.COMPONENTS, int(v)), real_profile)

    def via_planner(config, r, targets):
        est = memory.estimate_memory(config, "qlora", r=r, target_modules=list(targets)).components
        return {"trainable weights": est["lora params"], "gradients": est["gradients"], "optimizer state": est["optimizer states"]}
    with pytest.raises(AssertionError, match="asks you to write this yourself"):
        lesson07.check_predicted_bytes(via_planner, real_profile)


def test_lesson09_plan_gpus_refuses_placeholders_ddp_offload_first_and_the_reference(capsys):
    """The oracle is the kit's planner, asked in the exercise's order; five plans, one of each kind and one that
    needs all eight GPUs, drawn anew. Wrong answers a learner writes: replicating (DDP), offload tried first, offload never tried, the reference
    itself."""
    from qlora_helpers.exercises import lesson09
    from qlora_helpers.memory import shard_estimate, will_it_fit

    def search(strategies_in_order, last=lesson09.MAX_GPUS):
        def plan_gpus(model, gpu, batch_size, seq_len):
            run = lesson09.fsdp_qlora_run(model, batch_size, seq_len)
            for strategy, offload in strategies_in_order:
                for n in range(1, last + 1):
                    if will_it_fit(shard_estimate(run, model, strategy, n, offload), gpu).fits:
                        return n, offload
            return lesson09.DOES_NOT_FIT
        return plan_gpus

    assert lesson09.check_plan_gpus(None) is None
    assert lesson09.check_plan_gpus(lambda *case: None) is None                      # the student stub
    assert lesson09.check_plan_gpus(search([("fsdp", False), ("fsdp", True)])) is True
    assert "one of each kind, and one that needs all 8 GPUs" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="on 1 GPU the plan .*does NOT fit"):
        lesson09.check_plan_gpus(lambda *case: (1, False))
    with pytest.raises(AssertionError, match="you say nothing fits"):
        lesson09.check_plan_gpus(search([("ddp", False)]))                          # DDP never fits more
    with pytest.raises(AssertionError, match="a plan without offload fits too"):
        lesson09.check_plan_gpus(search([("fsdp", True), ("fsdp", False)]))
    with pytest.raises(AssertionError, match="you say nothing fits"):
        lesson09.check_plan_gpus(search([("fsdp", False)]))                          # offload never tried
    with pytest.raises(AssertionError, match="return \\(num_gpus, cpu_offload\\)"):
        lesson09.check_plan_gpus(lambda *case: [2, False])
    with pytest.raises(AssertionError, match="lesson09.reference"):
        lesson09.check_plan_gpus(lesson09.reference)
    cases = lesson09.draw_cases(0)
    assert [lesson09._kind(lesson09.reference(*c)) for c in cases[:4]] == list(lesson09.KINDS)
    assert lesson09.reference(*cases[4]) == (lesson09.MAX_GPUS, False)
    with pytest.raises(AssertionError, match="you say nothing fits|a plan without offload fits too"):
        lesson09.check_plan_gpus(search([("fsdp", False), ("fsdp", True)], lesson09.MAX_GPUS - 1))   # one short
