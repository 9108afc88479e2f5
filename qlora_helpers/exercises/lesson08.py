"""Checker for notebook 08's exercise (when it breaks), on the protocol of :mod:`qlora_helpers.exercises`.

The exercise hands out a broken QLoRA setup from a T4 notebook (:func:`broken_trainable`) and asks for one that
trains. The oracle is a measurement: the learner's function builds a model on a fresh 4-bit base in fp16 (a T4's
numerics, :func:`qlora_helpers.core.runtime.emulate_gpu` on a CPU) with a rank, targets and batch drawn anew at
every check, on the kit's tiny model (speed is the point: the check runs in about a second); the model takes two
AdamW steps, and every adapter weight must be fp32, finite and moved, activation checkpointing still on, and
nothing but the adapter trainable.
"""
from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from ..core.chat_data import padded_collator
from ..core.qlora_model import prepare_qlora_model
from ..core.runtime import emulate_gpu, get_profile, load_model, load_task_dataset, load_tokenizer
from ..core.training import model_loss
from ..failures import check_adapter_dtype
from ..sft_checks import lora_parameters
from ..sft_data import tokenize_chat
from . import attempted, call_without, expect, fresh_seed

TARGET_CHOICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The kit's one call that builds a trainable QLoRA model: the exercise asks for the fix itself.
LIBRARY_FIX = {"qlora_helpers.core.qlora_model.prepare_qlora_model": prepare_qlora_model}


def broken_trainable(base, config):
    """The setup the exercise hands out, from a learner's T4 notebook ("fp16 everywhere saves memory")."""
    base.activation_checkpointing_enable({"use_reentrant": True})       # the 7B run needs it on a T4
    return get_peft_model(base, config, autocast_adapter_dtype=False)


def t4_profile(profile):
    """The tiny model with a T4's numerics: the profile itself on a real fp16 GPU, else emulated (fp16 weights
    and compute on the CPU; on a bf16 GPU too, so the check is the same everywhere)."""
    tiny = get_profile(profile.name, model="tiny")
    return tiny if tiny.compute_dtype == torch.float16 else emulate_gpu(tiny, "t4")


def two_steps(build_fn, profile, r: int, targets: tuple[str, ...], seed: int, rows: int = 4) -> dict:
    """Build ``build_fn(base, LoraConfig(r, targets))`` on a fresh fp16 4-bit tiny base, take two AdamW steps
    (lr 1e-3) on ``rows`` task rows drawn with ``seed``; what happened, as numbers."""
    t4 = t4_profile(profile)
    tok, train = load_tokenizer(t4), load_task_dataset(t4)["train"]
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(train), (rows,), generator=g).tolist()
    batch = padded_collator(tok, None)([tokenize_chat(train[i], tok) for i in picks])
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(targets), task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    model = build_fn(load_model(t4), config)
    if model is None:
        return {"model": None}
    lora = lora_parameters(model)
    before = {n: p.detach().clone() for n, p in lora.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    losses = []
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        loss = model_loss(model, batch)   # not train_loop: it stops at the NaN this exercise shows
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"model": model, "losses": losses, "config": config, "lora": lora, "before": before,
            "n_trainable": sum(p.numel() for p in params), "n_lora": sum(p.numel() for p in lora.values()),
            "non_finite": sum(int((~torch.isfinite(p)).sum()) for p in lora.values()),
            "unmoved": [n for n, p in lora.items() if torch.equal(p.detach(), before[n])]}


def show_symptoms(build_fn, profile) -> None:
    """Print what two AdamW steps do to a setup (seed 0, rank 8 on q_proj and v_proj): the losses and how many
    adapter weights are still finite."""
    got = two_steps(build_fn, profile, 8, ("q_proj", "v_proj"), seed=0)
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in got["lora"].values()})
    print(f"adapter dtype {', '.join(dtypes)}; losses of the two steps: "
          + ", ".join("nan" if x != x else f"{x:.2f}" for x in got["losses"])
          + f"; {got['non_finite']:,} of {got['n_lora']:,} adapter weights are NaN or inf after them")


def check_fixed_trainable(build_fn, profile) -> bool | None:
    """The exercise: ``build_fn(base, config) -> PeftModel`` fixes :func:`broken_trainable`. Checked on two
    configurations (rank, targets, rows) drawn anew at every check: the model carries ``config``'s adapter and
    nothing else trainable, the adapter is fp32, activation checkpointing is on, and after two AdamW steps every
    adapter weight is finite and has moved. :data:`LIBRARY_FIX` may not be called."""
    if not attempted(build_fn, "Exercise"):
        return None   # waiting: nothing to display below the hint
    g = torch.Generator().manual_seed(fresh_seed())
    for _ in range(2):
        r = (2, 4, 8, 16)[int(torch.randint(0, 4, (1,), generator=g))]
        pick = torch.randperm(len(TARGET_CHOICES), generator=g)[:int(torch.randint(1, 4, (1,), generator=g))]
        targets = tuple(TARGET_CHOICES[i] for i in sorted(pick.tolist()))
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g))
        got = call_without(two_steps, LIBRARY_FIX, "The exercise", build_fn, profile, r, targets, seed)
        if not attempted(got["model"], "Exercise"):
            return None   # waiting: nothing to display below the hint
        model, where = got["model"], f"r={r} on {', '.join(targets)}"
        adapter = getattr(model, "peft_config", {}).get("default")
        expect(adapter is not None and adapter.r == r and set(adapter.target_modules) == set(targets),
               f"{where}: return the PEFT model of the config you were given (get_peft_model(base, config))")
        expect(got["n_trainable"] == got["n_lora"] > 0,
               f"{where}: {got['n_trainable']:,} weights are trainable, the adapter has {got['n_lora']:,}: train "
               f"the adapter and nothing else")
        expect(got["non_finite"] == 0, f"{where}: {got['non_finite']:,} of {got['n_lora']:,} adapter weights are NaN "
                                       f"or inf after two AdamW steps (losses {got['losses']})")
        try:
            check_adapter_dtype(model)
        except TypeError as err:
            expect(False, f"{where}: {err}")
        expect(model.get_base_model().is_activation_checkpointing,
               f"{where}: keep activation checkpointing on (the T4 run needs its memory); fix what breaks instead")
        expect(not got["unmoved"], f"{where}: {len(got['unmoved'])} adapter tensors did not move in two steps "
                                   f"(e.g. {got['unmoved'][0] if got['unmoved'] else ''}): do they get a gradient?")
    print("Exercise: correct on two random configurations: fp32 adapters, finite and moving after two AdamW steps, "
          "checkpointing on. It was failure 2 (fp16 weights under plain AdamW).")
    return True
