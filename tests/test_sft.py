"""qlora_helpers.sft / sft_data: the oracles are transformers' own model run on each example alone,
token counts by hand, and a few real Trainer steps on the offline model."""
import dataclasses
import gc
import math
import warnings
import weakref

import pytest
import torch
from transformers import TrainerCallback

from qlora_helpers.core.chat_data import IGNORE_INDEX, padded_collator
from qlora_helpers.core.qlora_model import prepare_qlora_model
from qlora_helpers.core.training import TrainingAlarm, check_loss
from qlora_helpers.sft import lora_config, precision_flags, training_arguments
from qlora_helpers.sft_checks import TrainingHealthCallback, lora_parameters
from qlora_helpers.sft_data import (
    packed_collator,
    packing_error,
    pad_share,
    show_labels,
    tokenize_chat,
    tokenize_dataset,
)

ROW = {"messages": [{"role": "user", "content": "Rewrite the date 2024-03-17 as DD/MM/YYYY."},
                    {"role": "assistant", "content": "17/03/2024"}]}


@pytest.fixture(scope="module")
def fp_model(offline_profile):
    from qlora_helpers.core.runtime import load_model
    return load_model(offline_profile, quantized=False).eval()


def test_labels_mask_the_prompt_and_keep_eos(tok):
    ex = tokenize_chat(ROW, tok)
    prompt = tok.apply_chat_template(ROW["messages"][:1], add_generation_prompt=True, return_dict=False)
    answer = tok("17/03/2024", add_special_tokens=False)["input_ids"]
    # by hand: the sequence is prompt + answer + <|im_end|>, and only the last two parts are labels
    assert ex["input_ids"] == prompt + answer + [tok.eos_token_id]
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt) + answer + [tok.eos_token_id]
    assert show_labels(ex, tok) == f"[-100 x {len(prompt)}]17/03/2024<|im_end|>"


def test_bad_rows_and_short_max_length_are_named(tok):
    with pytest.raises(ValueError, match="messages"):
        tokenize_chat({"prompt": "x"}, tok)
    with pytest.raises(ValueError, match="max_length=8"):
        tokenize_chat(ROW, tok, max_length=8)


def test_pad_share_by_hand(tok):
    feats = [tokenize_chat(ROW, tok), tokenize_chat({"messages": [
        {"role": "user", "content": "Convert 1999-12-01 to day/month/year format."},
        {"role": "assistant", "content": "01/12/1999"}]}, tok)]
    n_real = sum(len(f["input_ids"]) for f in feats)
    padded = padded_collator(tok, max_length=64)([dict(f) for f in feats])
    assert padded["input_ids"].shape == (2, 64)
    assert pad_share(padded, tok.pad_token_id) == pytest.approx(1 - n_real / 128)
    packed = packed_collator()([dict(f) for f in feats])
    assert packed["input_ids"].shape == (1, n_real) and pad_share(packed, tok.pad_token_id) == 0.0
    n0 = len(feats[0]["input_ids"])
    assert packed["position_ids"][0, n0].item() == 0                 # positions restart per example
    assert packed["labels"][0, n0].item() == IGNORE_INDEX            # no loss across the boundary


def test_packed_logits_equal_alone_only_without_cache(fp_model, tok, offline_profile):
    from qlora_helpers.core.runtime import load_task_dataset
    rows = load_task_dataset(offline_profile)["test"].select(range(3))
    examples = [tokenize_chat(r, tok)["input_ids"] for r in rows]
    assert packing_error(fp_model, examples, use_cache=False) < 1e-4     # fp32 reduction-order noise
    # TROUBLESHOOTING.md, "Packing is exact only without a cache": with the cache on, transformers 5 ignores the position_ids restarts.
    assert packing_error(fp_model, examples, use_cache=True) > 0.1


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), 0.0])
def test_alarm_on_nan_or_zero_loss(loss):
    with pytest.raises(TrainingAlarm, match=rf"loss is {loss} at step 7.*(bf16|fp32)"):
        check_loss(loss, step=7)
    check_loss(1.25, step=7)  # a normal loss passes


@pytest.mark.parametrize("gpu", ["t4", "bf16"])
def test_precision_flags_follow_the_profile(offline_profile, gpu):
    """Trainer's autocast flag names the profile's compute dtype: fp16 on a T4 (the bf16 flag there would ask
    for bf16 that a T4 only emulates), bf16 from compute capability 8; none on the CPU. The GPU's dtype comes
    from runtime's rule (emulate_gpu), not from this test."""
    from qlora_helpers.core.runtime import emulate_gpu
    assert precision_flags(offline_profile) == {"bf16": False, "fp16": False}
    gpu_profile = dataclasses.replace(emulate_gpu(offline_profile, gpu), device="cuda")
    flags = precision_flags(gpu_profile)
    assert [name for name, on in flags.items() if on] == [{torch.float16: "fp16", torch.bfloat16: "bf16"}[gpu_profile.compute_dtype]]


def test_few_trainer_steps_train_lora_only(offline_profile, tok, tmp_path):
    import bitsandbytes as bnb
    from datasets import Dataset
    from transformers import Trainer

    from qlora_helpers.core.runtime import load_model
    torch.manual_seed(0)
    model = prepare_qlora_model(load_model(offline_profile), lora_config())
    wrapped = {n.split(".lora_A")[0] for n in lora_parameters(model) if "lora_A" in n}
    four_bit = {n.removesuffix(".base_layer") for n, m in model.named_modules()
                if isinstance(m, bnb.nn.Linear4bit)}
    assert wrapped == four_bit and len(four_bit) == 28                # LoRA on every 4-bit linear
    train = tokenize_dataset(Dataset.from_list([ROW] * 32), tok)
    cb = TrainingHealthCallback(model)
    args = training_arguments(offline_profile, str(tmp_path), learning_rate=3e-3, max_steps=4,
                              per_device_train_batch_size=8, logging_steps=1, warmup_steps=0,
                              disable_tqdm=True)
    assert args.optim == offline_profile.optimizer and args.max_grad_norm == 0.3
    Trainer(model=model, args=args, train_dataset=train, data_collator=packed_collator(),
            callbacks=[cb]).train()
    rep = cb.report(model)
    assert rep["all_lora_had_nonzero_grad"] and rep["all_lora_moved"] and rep["base_unchanged"]
    assert len(cb.history) == 4 and all(math.isfinite(h["grad_norm"]) for h in cb.history)
    with pytest.raises(TrainingAlarm, match="nan"):                   # the alarm fires from on_log
        cb.on_log(args, _State(5), None, logs={"loss": float("nan")})


class _State:
    def __init__(self, step):
        self.global_step = step


# ---- the plain loop shared by adapters.train_adapter and the ablations ------------------------------
def test_warmup_then_constant():
    from qlora_helpers.core.training import warmup_lr
    assert [warmup_lr(s, 1.0, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_shuffled_batches_cover_an_epoch_and_name_bad_sizes(tok):
    from qlora_helpers.sft_data import shuffled_batches
    rows = tokenize_dataset(_date_rows(24), tok)  # 24 rows, batches of 8: 3 steps = one epoch
    batches = shuffled_batches(rows, tok, 3, seed=0, batch_size=8)
    seen = sorted(tuple(ids[m.bool()].tolist()) for b in batches for ids, m in zip(b["input_ids"], b["attention_mask"]))
    assert seen == sorted(tuple(r["input_ids"]) for r in rows)  # each row once, none twice
    longer = shuffled_batches(rows, tok, 5, seed=0, batch_size=8)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, longer))  # a prefix
    with pytest.raises(ValueError, match="fewer than batch_size=32"):
        shuffled_batches(rows, tok, 1, seed=0, batch_size=32)
    with pytest.raises(ValueError, match="steps=0"):
        shuffled_batches(rows, tok, 0, seed=0)


def _date_rows(n):
    import datasets
    return datasets.Dataset.from_list([{"messages": [
        {"role": "user", "content": f"Rewrite the date 2001-02-{d:02d} as DD/MM/YYYY."},
        {"role": "assistant", "content": f"{d:02d}/02/2001"}]} for d in range(1, n + 1)])


def test_saved_tensor_bytes_by_hand():
    from qlora_helpers.core.training import saved_tensor_bytes
    w = torch.nn.Parameter(torch.randn(64, 32))
    x = torch.randn(10, 64)
    with saved_tensor_bytes() as saved:
        y = (x @ w).relu()  # saves x (for w's grad; w is a parameter, not counted) and relu's output
    assert saved.total == x.nbytes + y.nbytes == 4 * (10 * 64 + 10 * 32)
    with saved_tensor_bytes() as none:
        (x @ w.detach()).relu()  # nothing requires grad: nothing is saved
    assert none.total == 0
    frozen = torch.nn.Parameter(torch.randn(32, 64), requires_grad=False)
    xg = torch.randn(10, 64, requires_grad=True)
    with saved_tensor_bytes() as linear:
        torch.nn.functional.linear(xg, frozen)  # saves frozen.t() (a view of the weight) for x's grad
    assert linear.total == 0  # a frozen base weight is not an activation (it was counted before the fix)


def test_saved_tensor_bytes_frees_the_graph_and_keeps_the_gradients():
    """What the context saved is freed with the output, and backward inside it computes the same gradients.
    Before the fix a saved output held itself through its grad_fn (a cycle Python's gc cannot see): the graph,
    its activations and the model behind them lived for the whole process (~2 GB a run in notebook 07's job)."""
    from qlora_helpers.core.training import saved_tensor_bytes
    torch.manual_seed(0)
    lin, x = torch.nn.Linear(8, 8), torch.randn(4, 8)
    with saved_tensor_bytes() as saved:
        y = torch.sigmoid(lin(x))                # sigmoid saves its own output
    alive = weakref.ref(y)
    del y
    gc.collect()
    assert saved.total > 0 and alive() is None
    with saved_tensor_bytes():
        torch.sigmoid(lin(x)).sum().backward()
    hooked = lin.weight.grad.clone()
    lin.weight.grad = None
    torch.sigmoid(lin(x)).sum().backward()
    assert torch.equal(hooked, lin.weight.grad)


def test_train_loop_schedules_clips_and_counts(offline_profile, tok):
    from qlora_helpers.core.runtime import load_model
    from qlora_helpers.core.training import train_loop
    from qlora_helpers.sft_data import shuffled_batches
    torch.manual_seed(0)
    model = prepare_qlora_model(load_model(offline_profile), lora_config(8, 16, 0.0), gradient_checkpointing=False)
    batches = shuffled_batches(tokenize_dataset(_date_rows(16), tok), tok, 4, seed=0, batch_size=4)
    seen = []

    class RecordingSGD(torch.optim.SGD):  # the learning rate each step really used
        def step(self, *args, **kwargs):
            seen.append(self.param_groups[0]["lr"])
            return super().step(*args, **kwargs)

    opt = RecordingSGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    log = train_loop(model, opt, batches, lr=0.5, warmup=2, count_activations=True)
    assert len(log["losses"]) == 4 and log["losses"][-1] < log["losses"][0]
    assert seen == [0.25, 0.5, 0.5, 0.5]  # linear warm-up over 2 steps, then constant
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad and p.grad is not None])
    assert grads.norm() <= 0.3 + 1e-5  # the last step's gradients, clipped to the paper's 0.3
    assert log["activation_bytes"] > 0
    again = train_loop(model, opt, batches[:1], lr=0.5)
    assert again["activation_bytes"] == 0  # counted only when asked (the hook is slow)


def test_tokens_per_second_counts_real_tokens_and_leaves_weights(offline_profile, tok):
    """Throughput is timed over real training steps (the one loop) at learning rate 0: the weights
    must not move, the pad share must be the hand count, and the rate times the time the real tokens."""
    from qlora_helpers.core.runtime import load_model
    from qlora_helpers.throughput import tokens_per_second
    torch.manual_seed(0)
    model = prepare_qlora_model(load_model(offline_profile), lora_config(8, 16, 0.0), gradient_checkpointing=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ds = tokenize_dataset(_date_rows(12), tok)
    collate = padded_collator(tok, 64)
    batches = [collate([dict(ds[i]) for i in range(j, j + 4)]) for j in (0, 4, 8)]
    real = sum(int(b["attention_mask"].sum()) for b in batches[1:])
    import time
    t0 = time.perf_counter()
    out = tokens_per_second(model, batches)
    wall = time.perf_counter() - t0
    assert out["pad_share"] == pytest.approx(1 - real / (2 * 4 * 64))
    assert 0 < out["seconds"] <= wall                       # timed inside the call, not made up
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="at least 2 batches"):
        tokens_per_second(model, batches[:1])


def test_tokenizing_shows_no_progress_bar(tok, capsys):
    """A fresh map (not in datasets' cache) must not print a progress bar: nbval compares the output."""
    from datasets.utils.logging import is_progress_bar_enabled
    before = is_progress_bar_enabled()
    tokenize_dataset(_date_rows(3), tok)
    captured = capsys.readouterr()
    assert "Map" not in captured.err + captured.out
    assert is_progress_bar_enabled() == before      # the setting is restored


class _PoisonAfterFirstStep(TrainerCallback):
    """Writes NaN into one LoRA weight after step 1: every later loss is NaN."""

    def __init__(self, model):
        self.weight = next(p for n, p in model.named_parameters() if "lora_B" in n)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            with torch.no_grad():
                self.weight.fill_(float("nan"))


@pytest.mark.parametrize("nan_filter", ["the kit's", True])
def test_a_nan_loss_reaches_the_alarm_through_trainer(offline_profile, tok, tmp_path, nan_filter):
    """A real NaN loss inside Trainer: the kit's arguments (their own logging_nan_inf_filter, False:
    not passed here, so the test fails if training_arguments stops setting it) let it reach
    TrainingHealthCallback, which stops the run at step 2 naming the NaN. With transformers' default
    filter (True) the NaN step is left out of the logged mean: logged every step, it shows as a loss
    of 0.0 (the zero alarm fires, blaming the wrong cause); logged less often, the NaN would vanish
    in the mean of the finite steps."""
    from datasets import Dataset
    from transformers import Trainer

    from qlora_helpers.core.runtime import load_model
    torch.manual_seed(0)
    model = prepare_qlora_model(load_model(offline_profile), lora_config(), gradient_checkpointing=False)
    train = tokenize_dataset(Dataset.from_list([ROW] * 16), tok)
    health = TrainingHealthCallback(model)
    args = training_arguments(offline_profile, str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                              logging_steps=1, disable_tqdm=True,
                              **({} if nan_filter == "the kit's" else {"logging_nan_inf_filter": nan_filter}))
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=packed_collator(),
                      callbacks=[_PoisonAfterFirstStep(model), health])
    with pytest.raises(TrainingAlarm, match="loss is 0.0" if nan_filter is True else "loss is nan"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert any(torch.isnan(p).any() for p in lora_parameters(model).values())   # the weights really are NaN


def test_a_recipe_prepares_the_model_as_its_trainer_arguments_say(offline_profile, tmp_path):
    """prepare_qlora_model(model, recipe) takes the recipe's LoRA and its checkpointing setting,
    the one training_arguments reads, so model and trainer cannot disagree."""
    from qlora_helpers.core.recipe import KIT_SFT
    from qlora_helpers.core.runtime import load_model
    for recipe in (KIT_SFT, KIT_SFT.replace(gradient_checkpointing=True, r=8)):
        model = prepare_qlora_model(load_model(offline_profile), recipe)
        assert model.peft_config["default"].r == recipe.r
        assert model.base_model.model.is_gradient_checkpointing == recipe.gradient_checkpointing
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)   # the kit passes transformers 5's names, not the deprecated ones
            args = training_arguments(offline_profile, str(tmp_path), recipe)
        assert args.activation_checkpointing == args.gradient_checkpointing == recipe.gradient_checkpointing
    model = prepare_qlora_model(load_model(offline_profile), KIT_SFT, gradient_checkpointing=True)
    assert model.base_model.model.is_gradient_checkpointing


def test_run_sft_is_the_lesson_in_one_call(offline_profile, tmp_path):
    """The capstone's code path (notebook 04 §11 runs it on a 7B model on a GPU), on the tiny model."""
    from qlora_helpers.core.recipe import recipe_for
    from qlora_helpers.sft import run_sft
    recipe = recipe_for(offline_profile).replace(steps=60)
    got = run_sft(offline_profile, str(tmp_path), recipe, n_test=10, log=lambda *a: None)
    assert got["steps"] == 60 and got["peak_bytes"] is None                 # no GPU, no GPU peak
    assert got["losses"][-1] < 0.5 * got["losses"][0], got["losses"]        # it trained
    # what it measured is what the kit's own functions give for the same run: the longest training row,
    # and the planner's estimate for that row length, rank and batch (the planner is the oracle)
    from qlora_helpers.core.runtime import load_task_dataset, load_tokenizer
    from qlora_helpers.memory import estimate_memory
    from qlora_helpers.sft_data import tokenize_dataset
    rows = tokenize_dataset(load_task_dataset(offline_profile)["train"], load_tokenizer(offline_profile))
    assert got["seq_len"] == max(len(x) for x in rows["input_ids"])
    plan = estimate_memory(offline_profile.model_files(), "qlora", r=recipe.r, batch_size=recipe.batch_size,
                           seq_len=got["seq_len"], gradient_checkpointing=recipe.gradient_checkpointing,
                           optimizer="adamw_torch", cuda_context_gib=0, fragmentation=0)   # tensors only, as the peak counts
    assert got["planned_bytes"] == plan.total
    assert got["em_before"] == 0.0                           # the base cannot do the task (notebook 00)
