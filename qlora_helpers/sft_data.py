"""SFT data: chat-formatted examples, loss on the response only, and packing without leaks.

What it teaches:

* **Chat template.** A training example is the conversation rendered by the tokenizer's own
  ``apply_chat_template``, so training sees exactly the format that inference
  (:func:`qlora_helpers.core.evaluation.prompt_text`) will feed the model.
* **EOS.** The assistant turn ends with ``<|im_end|>``, the tokenizer's EOS token. It is part of
  the labels: a model that never saw it as a target never learns to stop.
* **Loss on responses only.** Prompt tokens get the label ``-100`` (PyTorch's
  ``CrossEntropyLoss(ignore_index=-100)``), as in the QLoRA paper's training on the target only
  (arXiv 2305.14314, section 5: "train on the target"). Checked against TRL's
  ``assistant_only_loss`` / ``completion_only_loss`` masks.
* **Packing without cross-contamination.** ``transformers.DataCollatorWithFlattening`` concatenates
  a batch into one row and restarts ``position_ids`` at 0 for every example (padding-free
  packing). With ``use_cache=False`` and no ``attention_mask``, transformers 5 derives a block-
  diagonal mask from the restarts, so no example attends to another (``TROUBLESHOOTING.md``, "Packing is exact only without a cache");
  :func:`packed_logits` and ``tests/test_sft.py`` prove it against the model run on each example alone.
"""
from __future__ import annotations

import torch
from transformers import DataCollatorWithFlattening

# The chat format itself (template, cut at EOS, padding) is shared with notebook 01 (qlora_helpers.core.chat_data).
from .core.chat_data import IGNORE_INDEX, conversation_ids, padded_collator
from .core.runtime import quiet_datasets


def tokenize_chat(example: dict, tok, max_length: int = 128) -> dict[str, list[int]]:
    """Token ids and labels of one chat row; prompt tokens labelled ``-100``.

    The ids are :func:`qlora_helpers.core.chat_data.conversation_ids` (the chat template, up to and
    including the assistant's EOS); the lesson is the labels: ``-100`` on every prompt token.

    Args:
        example: a row with ``messages`` (user turn(s), then the assistant turn).
        tok: a tokenizer with a chat template and an EOS token.
        max_length: longest sequence allowed (longer is an error, never silently cut).
    Returns:
        ``{"input_ids": [...], "labels": [...]}`` of equal length.
    """
    ids, n_prompt = conversation_ids(example, tok, max_length)
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]}


def tokenize_dataset(ds, tok, max_length: int = 128):
    """:func:`tokenize_chat` over a ``datasets.Dataset``, keeping only ``input_ids`` and ``labels``.

    Without a progress bar: ``datasets`` shows one only when the result is not in its cache yet, so
    a notebook's output would depend on what ran on the machine before (nbval compares it).
    """
    with quiet_datasets():
        return ds.map(lambda ex: tokenize_chat(ex, tok, max_length), remove_columns=ds.column_names)


def show_labels(example: dict[str, list[int]], tok) -> str:
    """The trained-on text: label tokens decoded, each run of ``-100`` shown as one ``[-100 x n]``.

    Labels ``[-100, -100, 7]`` show as ``'[-100 x 2]'`` followed by ``tok.decode([7])``
    (``tests/test_sft.py`` checks it with the kit's tokenizer).
    """
    out, run = [], 0
    for t in example["labels"] + [None]:
        if t == IGNORE_INDEX:
            run += 1
            continue
        if run:
            out.append(f"[-100 x {run}]")
            run = 0
        if t is not None:
            out.append(tok.decode([t]))
    return "".join(out)


def batch_order(n: int, steps: int, seed: int, batch_size: int = 16) -> list[list[int]]:
    """The row indices of ``steps`` batches of ``batch_size`` from ``n`` rows, drawn without replacement
    in an order fixed by ``seed`` (reshuffled each epoch): the one batch order every kit run uses.

    >>> batch_order(5, steps=3, seed=0, batch_size=2) == batch_order(5, steps=3, seed=0, batch_size=2)
    True
    >>> sorted(sum(batch_order(6, steps=3, seed=1, batch_size=2), []))  # one epoch: each row once
    [0, 1, 2, 3, 4, 5]

    Raises:
        ValueError: ``steps`` or ``batch_size`` < 1, or fewer rows than one batch.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    if n < batch_size:
        raise ValueError(f"the dataset has {n} rows, fewer than batch_size={batch_size}")
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(n, generator=g).tolist()
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def shuffled_batches(train, tok, steps: int, seed: int, batch_size: int = 16) -> list[dict]:
    """``steps`` batches of a tokenized dataset in :func:`batch_order`, padded to their longest row:
    every run given the same seed sees the same batches in the same order, whatever it trains.

    Raises:
        ValueError: ``steps`` or ``batch_size`` < 1, or fewer rows than one batch.
    """
    collate = padded_collator(tok, None)
    return [collate([train[j] for j in rows]) for rows in batch_order(len(train), steps, seed, batch_size)]


def packed_collator():
    """Padding-free packing: one row per batch, ``position_ids`` restarting at 0 per example."""
    return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)


def pad_share(batch: dict[str, torch.Tensor], pad_token_id: int) -> float:
    """Share of the positions in ``batch`` that are padding (0.0 for a packed batch).

    A padded batch says which positions are real in its ``attention_mask``; a packed batch
    (``position_ids``, no mask) has no padding. Only a batch with neither is judged by its token
    ids, and that is ambiguous when the pad token is the EOS token (SmolLM2: both ``<|im_end|>``),
    because every row's own EOS would count as padding.

    >>> import torch
    >>> pad_share({"input_ids": torch.tensor([[5, 2, 6, 2]]), "position_ids": torch.tensor([[0, 1, 0, 1]])}, 2)
    0.0
    """
    if "attention_mask" in batch:
        return 1.0 - batch["attention_mask"].float().mean().item()
    if "position_ids" in batch:
        return 0.0
    return (batch["input_ids"] == pad_token_id).float().mean().item()


@torch.no_grad()
def packed_logits(model, examples: list[list[int]], use_cache: bool = False) -> list[torch.Tensor]:
    """Logits of each example, computed with all of them packed into one row.

    Args:
        examples: token id lists.
        use_cache: transformers 5 only builds the per-example mask from ``position_ids`` when no
            cache is passed; ``True`` shows what goes wrong (``TROUBLESHOOTING.md``, "Packing is exact only without a cache").
    Returns:
        One ``(len(example), vocab)`` tensor per example.
    """
    batch = packed_collator()([{"input_ids": ids} for ids in examples])
    out = model(input_ids=batch["input_ids"].to(model.device),
                position_ids=batch["position_ids"].to(model.device), use_cache=use_cache)
    return list(out.logits[0].split([len(ids) for ids in examples]))  # (len_i, vocab) each


@torch.no_grad()
def packing_error(model, examples: list[list[int]], use_cache: bool = False) -> float:
    """Largest absolute logit difference between each example packed and the same example alone."""
    packed = packed_logits(model, examples, use_cache=use_cache)
    alone = [model(input_ids=torch.tensor([ids], device=model.device), use_cache=False).logits[0]
             for ids in examples]
    return max((p - a).abs().max().item() for p, a in zip(packed, alone))
