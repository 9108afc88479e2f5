"""Checkers for notebook 04's exercises (QLoRA SFT), on the protocol of
:mod:`qlora_helpers.exercises`."""
from __future__ import annotations

import torch
from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from ..core.chat_data import IGNORE_INDEX, conversation_ids, padded_collator
from ..core.qlora_model import prepare_qlora_model
from ..core.recipe import QLORA_PAPER
from ..core.runtime import load_model
from ..sft_data import tokenize_chat
from . import attempted, call_without, expect, fresh_seed

# What exercise 3 asks the learner to write; calling one of these instead fails the check.
LIBRARY_COLLATE = {"qlora_helpers.core.chat_data.padded_collator": padded_collator,
                   "qlora_helpers.sft_data.tokenize_chat": tokenize_chat,
                   "transformers' DataCollatorForSeq2Seq": DataCollatorForSeq2Seq.__call__,
                   "transformers' DataCollatorForLanguageModeling": DataCollatorForLanguageModeling.__call__,
                   "the tokenizer's pad": PreTrainedTokenizerBase.pad}


def check_label_share(answer, train_ds, batch_size: int = 8) -> bool | None:
    """Exercise 1 (predict, then measure): of all the positions the model computes in the recipe's batches
    (``batch_size`` consecutive rows of ``train_ds``, each batch padded to its longest row), the share that
    carry a label (are not ``IGNORE_INDEX``). Notebook 04 prints the share of *tokens*; this one also counts
    the padding, so it says how much of a padded step trains the answers."""
    if not attempted(answer, "Exercise 1"):
        return None   # waiting: nothing to display below the hint
    labels = train_ds["labels"]
    n_lab = sum(sum(t != IGNORE_INDEX for t in x) for x in labels)
    n_tok = sum(len(x) for x in labels)
    positions = sum(len(labels[i:i + batch_size]) * max(len(x) for x in labels[i:i + batch_size])
                    for i in range(0, len(labels), batch_size))
    share = n_lab / positions
    if abs(float(answer) - share) >= 1e-3 and abs(float(answer) - n_lab / n_tok) < 1e-3:
        expect(False, f"got {float(answer):.4f}: that is the share of the tokens; a padded batch also computes its "
                      f"padding, so divide by every position of every batch of {batch_size}")
    expect(abs(float(answer) - share) < 1e-3, f"got {float(answer):.4f}; count the labels that are not "
                                              f"{IGNORE_INDEX} and divide by (rows x longest row), summed over the "
                                              f"batches of {batch_size} consecutive rows")
    print(f"Exercise 1: correct, {share:.1%} of the positions computed train an answer "
          f"({n_lab / n_tok:.1%} of the tokens; the rest of the difference is padding).")
    return True


def broken_collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Exercise 3's broken cell: the source document's batches (``DataCollatorForLanguageModeling`` with
    ``pad_token = eos_token``), written out. Rows are ``{"input_ids": [...], "n_prompt": int}``."""
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.tensor([r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in rows])  # (batch, width)
    labels = input_ids.clone()
    labels[input_ids == pad_id] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": (input_ids != pad_id).long(), "labels": labels}


def exercise_rows(tok, train_rows, n: int, g: torch.Generator) -> list[dict]:
    """``n`` random conversations of ``train_rows`` (chat rows with ``messages``) as exercise 3's input:
    ``{"input_ids": ids up to and including the EOS, "n_prompt": prompt length}``."""
    picks = torch.randint(0, len(train_rows), (n,), generator=g).tolist()
    return [dict(zip(("input_ids", "n_prompt"), conversation_ids(train_rows[i], tok))) for i in picks]


def check_fixed_collate(collate_fn, tok, train_rows) -> bool | None:
    """Exercise 3: ``collate_fn(rows, pad_id)`` fixes :func:`broken_collate`: right padding to the longest row,
    ``attention_mask`` 1 on every real token (the EOS too), labels ``-100`` on the prompt and the padding and
    the token id everywhere else (the EOS too). Checked against the kit's collator
    (``DataCollatorForSeq2Seq`` over :func:`qlora_helpers.sft_data.tokenize_chat`) on random batches of
    ``train_rows`` drawn anew at every check; written by hand (:data:`LIBRARY_COLLATE` may not be called)."""
    if not attempted(collate_fn, "Exercise 3"):
        return None   # waiting: nothing to display below the hint
    g = torch.Generator().manual_seed(fresh_seed())
    kit = padded_collator(tok, None)
    for _ in range(3):
        rows = exercise_rows(tok, train_rows, int(torch.randint(2, 9, (1,), generator=g)), g)
        want = kit([{"input_ids": r["input_ids"], "labels": [IGNORE_INDEX] * r["n_prompt"] + r["input_ids"][r["n_prompt"]:]}
                    for r in rows])
        got = call_without(collate_fn, LIBRARY_COLLATE, "Exercise 3", [dict(r) for r in rows], tok.pad_token_id)
        if not attempted(got, "Exercise 3"):
            return None   # waiting: nothing to display below the hint
        for key in ("input_ids", "attention_mask", "labels"):
            expect(key in got, f"return a dict with input_ids, attention_mask and labels; {key!r} is missing")
            t = torch.as_tensor(got[key])
            expect(tuple(t.shape) == tuple(want[key].shape), f"{key}: want shape {tuple(want[key].shape)} (batch, longest row), "
                                                             f"got {tuple(t.shape)}")
            bad = (t != want[key]).nonzero()
            expect(len(bad) == 0, f"{key} differs at {len(bad)} positions, first at row {int(bad[0][0])}, position "
                                  f"{int(bad[0][1])} of {[len(r['input_ids']) for r in rows]} real tokens"
                                  if len(bad) else "")
    print("Exercise 3: correct on 3 random batches: the EOS is attended to and learned, prompt and padding are not.")
    return True


def check_paper_trainable(answer, profile) -> bool | None:
    """Exercise 2: trainable parameters with the QLoRA paper's adapter (r=64, alpha 16, all linear),
    counted by PEFT on the kit's model."""
    if not attempted(answer, "Exercise 2"):
        return None   # waiting: nothing to display below the hint
    model = prepare_qlora_model(load_model(profile), QLORA_PAPER["7b"].lora_config())
    want = model.get_nb_trainable_parameters()[0]
    expect(int(answer) == want, f"got {int(answer):,}, PEFT counts {'more' if want > int(answer) else 'fewer'}: "
                                f"r * (d_in + d_out) for each of the 7 linear layers of each decoder layer, times the layers")
    print(f"Exercise 2: correct, {want:,} trainable parameters at r=64.")
    return True

