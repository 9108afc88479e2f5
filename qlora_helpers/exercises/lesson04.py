"""Checkers for notebook 04's exercises (QLoRA SFT), on the protocol of
:mod:`qlora_helpers.exercises`."""
from __future__ import annotations

import torch
from datasets import Dataset
from transformers import Trainer

from ..core.chat_data import IGNORE_INDEX
from ..core.qlora_model import prepare_qlora_model
from ..core.recipe import QLORA_PAPER, recipe_for
from ..core.runtime import load_model
from ..sft import training_arguments
from ..sft_checks import TrainingHealthCallback
from . import attempted, expect


def check_label_share(answer, train_ds) -> bool | None:
    """Exercise 1: the share of training tokens that carry a label (are not ``IGNORE_INDEX``)."""
    if not attempted(answer, "Exercise 1"):
        return None   # waiting: nothing to display below the hint
    n_tok = sum(len(x) for x in train_ds["labels"])
    n_lab = sum(sum(t != IGNORE_INDEX for t in x) for x in train_ds["labels"])
    expect(abs(float(answer) - n_lab / n_tok) < 1e-3, f"got {float(answer):.4f}; count the labels that are not "
                                                      f"{IGNORE_INDEX} and divide by all tokens of train_ds")
    print(f"Exercise 1: correct, {n_lab / n_tok:.1%} of the tokens are answers; the rest are prompt and template.")
    return True


def check_paper_trainable(answer, profile) -> bool | None:
    """Exercise 2: trainable parameters with the QLoRA paper's adapter (r=64, alpha 16, all linear),
    counted by PEFT on the kit's model."""
    if not attempted(answer, "Exercise 2"):
        return None   # waiting: nothing to display below the hint
    model = prepare_qlora_model(load_model(profile), QLORA_PAPER["7b"].lora_config())
    want = model.get_nb_trainable_parameters()[0]
    expect(int(answer) == want, f"got {int(answer):,}, PEFT counts {want:,}: r * (d_in + d_out) for each of the "
                                f"7 linear layers of each decoder layer, times the layers")
    print(f"Exercise 2: correct, {want:,} trainable parameters at r=64.")
    return True


def all_masked_alarm(profile, train_ds, collator, output_dir) -> str:
    """Exercise 3: two rows whose labels are all ``IGNORE_INDEX``, two ``Trainer`` steps with
    ``TrainingHealthCallback``; returns the alarm that stopped training ("no alarm" if none did)."""
    rows = [{"input_ids": r["input_ids"], "labels": [IGNORE_INDEX] * len(r["labels"])} for r in train_ds.select(range(2))]
    torch.manual_seed(0)
    model = prepare_qlora_model(load_model(profile), recipe_for(profile))
    args = training_arguments(profile, str(output_dir), max_steps=2, logging_steps=1, disable_tqdm=True)
    try:
        Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=collator,
                callbacks=[TrainingHealthCallback(model)]).train()
    except Exception as err:  # TrainingAlarm, or a nan loss from an empty mean
        return f"{type(err).__name__}: {err}"
    return "no alarm"
