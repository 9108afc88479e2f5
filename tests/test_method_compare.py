"""Notebook 07's comparison and step costs: the design that makes full fine-tuning, LoRA and QLoRA comparable,
and the two counts of memory held for backward, each against an independent measurement."""
import pytest
import torch

from qlora_helpers import method_compare as M
from qlora_helpers import seed_recipe, step_cost
from qlora_helpers.core.recipe import KIT_LOOP
from qlora_helpers.sft_data import batch_order, shuffled_batches

SMALL = KIT_LOOP.replace(r=4, lora_alpha=8)


@pytest.fixture(scope="module")
def data(offline_profile):
    return M.load_method_data(offline_profile, n_test=8, n_val=8)


def test_lora_and_qlora_start_from_the_same_adapter_and_differ_only_in_the_base(offline_profile):
    lora = M.build_method_model(offline_profile, "lora", SMALL, seed=3)
    qlora = M.build_method_model(offline_profile, "qlora", SMALL, seed=3)
    a = {n: p for n, p in lora.named_parameters() if "lora_A" in n}
    b = {n: p for n, p in qlora.named_parameters() if "lora_A" in n}
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[n], b[n]) for n in a)                  # the same random draws, layer by layer
    other = M.build_method_model(offline_profile, "lora", SMALL, seed=4)
    assert not torch.equal(next(iter(a.values())), dict(other.named_parameters())[next(iter(a))])
    full = M.build_method_model(offline_profile, "full", SMALL, seed=3)
    assert all(p.requires_grad for p in full.parameters())
    with pytest.raises(ValueError, match="'fft' is not one of"):
        M.build_method_model(offline_profile, "fft")


def test_memory_by_component_agrees_with_the_planner_where_both_count_bytes(offline_profile, data):
    row = M.train_method(offline_profile, "qlora", 0, data, recipe=SMALL, steps=2, evaluate=False)
    got, planned = row["memory"], row["planned"]
    # Trainable weights, gradients and AdamW's state (two fp32 moments per weight and a step counter per
    # tensor): the same tensors, counted to the byte.
    assert got["trainable weights"] == planned["trainable weights"] == got["gradients"]
    assert got["optimizer state"] == planned["optimizer state"] == 2 * got["trainable weights"] + 4 * 2 * 28
    # The frozen 4-bit base: packed NF4, the double-quantized constants, fp32 norms and embeddings: the
    # planner's count plus the model's buffers (rotary frequencies), once per layer (not twice through PEFT).
    assert 0 <= got["frozen weights"] - planned["frozen weights"] <= 4096
    assert set(row["eval_losses"]) == {0, 2} and row["eval_losses"][2] < row["eval_losses"][0]
    # The sweeps choose on other rows than the reported ones: a validation loss of its own, on other batches.
    assert row["val_loss"] != row["eval_loss"] and row["val_loss"] < row["eval_losses"][0]


def test_the_sweeps_choose_on_validation_rows_never_on_the_reported_ones(offline_profile, data):
    """The validation rows follow the reported ones in the test split, disjoint; a sweep row without a
    validation loss (made when the sweeps chose on the reported rows) is refused by name, and so is asking for
    more rows than the split has."""
    ids = lambda batches: {tuple(x.tolist()) for b in batches for x in b["input_ids"]}
    assert not ids(data.eval_batches) & ids(data.val_batches) and len(ids(data.val_batches)) == 8
    sweep = [{"lr": lr, "eval_loss": e, "val_loss": v} for lr, e, v in [(1e-4, 0.1, 0.3), (1e-3, 0.2, 0.2)]]
    assert M.best_lr(sweep) == 1e-3                               # the validation loss decides, not eval_loss
    with pytest.raises(ValueError, match=r"lr \[0.0001\] have no val_loss.*--resume"):
        M.best_lr([{k: v for k, v in sweep[0].items() if k != "val_loss"}, sweep[1]])
    with pytest.raises(ValueError, match="n_test=150 reported rows and n_val=100 validation rows need 250"):
        M.load_method_data(offline_profile, n_test=150)


def test_held_for_backward_two_counts_agree_and_checkpointing_holds_less(offline_profile, data):
    batch = shuffled_batches(data.train, data.tok, 1, 0, 8)[0]
    costs = step_cost.checkpointing(
        lambda on: M.build_method_model(offline_profile, "qlora", SMALL.replace(gradient_checkpointing=on)), batch)
    off, on = costs["off"], costs["on"]
    # The allocator (glibc's malloc) sees what autograd saves: the counter misses no activation and counts
    # no weight (before the fix it counted every view of a parameter, e.g. F.linear's weight.t()).
    assert abs(off["saved"] - off["allocator"]) < 0.05 * off["allocator"], off
    assert on["allocator"] < 0.5 * off["allocator"], (on, off)       # checkpointing keeps layer inputs only


def test_op_share_sees_bitsandbytes_only_in_qlora(offline_profile, data):
    batch = shuffled_batches(data.train, data.tok, 1, 0, 4)[0]
    q = step_cost.op_share(M.build_method_model(offline_profile, "qlora", SMALL), batch, warmup=1)
    lo = step_cost.op_share(M.build_method_model(offline_profile, "lora", SMALL), batch, warmup=1)
    assert {"bitsandbytes::dequantize_4bit", "bitsandbytes::gemm_4bit"} <= set(q["ops"]), q["ops"]
    assert 0 < q["share"] < 1 and lo["ms"] == lo["share"] == 0


def test_the_seed_recipe_sees_the_kit_runs_rows_in_the_same_order(real_profile):
    from qlora_helpers.core.runtime import load_tokenizer
    tok = load_tokenizer(real_profile)
    texts = [f"row {i}" for i in range(40)]
    batches = seed_recipe.seed_batches(texts, tok, steps=3, seed=5, batch_size=4)
    order = batch_order(len(texts), 3, 5, 4)
    first = tok.decode(batches[1]["input_ids"][2][batches[1]["attention_mask"][2].bool()])
    assert first == texts[order[1][2]]
    assert all(b["input_ids"].shape == (4, seed_recipe.SEED_MAX_LENGTH) for b in batches)


def test_paired_differences_need_two_paired_seeds():
    rows = [{"method": "a", "seed": 0, "eval_loss": 1.0}, {"method": "b", "seed": 0, "eval_loss": 1.1},
            {"method": "b", "seed": 1, "eval_loss": 1.2}]
    with pytest.raises(ValueError, match="needs >= 2 seeds"):
        M.paired_differences(rows, "a", "b")
    rows += [{"method": "a", "seed": 1, "eval_loss": 1.3}]
    assert M.paired_differences(rows, "a", "b")["sign"] == "mixed"


def test_the_seed_recipe_run_reports_padding_eos_and_lengths(offline_profile, data):
    # On the tiny model, whose tokenizer has a pad token of its own: the document's pipeline pads to 256 but
    # keeps every EOS a label (SmolLM2's pad = EOS masks them all: tests/test_seed_recipe.py).
    r = M.train_seed_recipe(offline_profile, data, recipe=SMALL.replace(steps=2))
    assert r["pad_share"] > 0.5 and r["eos_in_text"] > 0 and r["eos_labelled"] == r["eos_in_text"]
    assert len(r["losses"]) == 2 and 0 <= r["stopped"] <= 1 and 1 <= r["gen_tokens"] <= M.GEN_TOKENS
