"""The training code of the kit's source document, as published, measured on the course's data (notebook 07).

The document (a Korean blog post on LoRA vs QLoRA, January 2026) tokenizes a text column with
``truncation=True, max_length=256, padding="max_length"``, sets ``tokenizer.pad_token = tokenizer.eos_token``
when the tokenizer has no pad token, and batches with ``DataCollatorForLanguageModeling(mlm=False)``. Two
consequences, measured here rather than argued:

- every row is padded to 256 tokens, so most of what each step computes is padding;
- the collator turns every position whose id equals the pad id into ``-100``, and when the pad token *is*
  the EOS token (SmolLM2's tokenizer ships that way; the document's line makes it so for tokenizers without
  one), every EOS is masked too: no EOS is ever a label, so the tuned model is not taught to stop.

>>> from transformers import PreTrainedTokenizerFast
>>> from tokenizers import Tokenizer, models, pre_tokenizers
>>> raw = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<eos>": 2}, unk_token="a"))
>>> raw.pre_tokenizer = pre_tokenizers.Whitespace()
>>> tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", pad_token="<eos>")
>>> report = label_report(seed_batch(seed_tokenize(["a b <eos>"], tok, max_length=8), tok), tok)
>>> report["eos_in_text"], report["eos_labelled"], report["pad_share"]
(1, 0, 0.625)
"""
from __future__ import annotations

import torch
from transformers import DataCollatorForLanguageModeling

from .core.chat_data import IGNORE_INDEX
from .sft_data import batch_order

SEED_MAX_LENGTH = 256   # the document's max_length


def seed_tokenize(texts: list[str], tok, max_length: int = SEED_MAX_LENGTH) -> list[dict]:
    """The document's tokenization: truncate and pad every text to ``max_length`` (its pad-token line first)."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token   # the document's line
    enc = tok(texts, truncation=True, max_length=max_length, padding="max_length")
    return [{k: enc[k][i] for k in ("input_ids", "attention_mask")} for i in range(len(texts))]


def seed_batch(features: list[dict], tok) -> dict[str, torch.Tensor]:
    """The document's collator: ``DataCollatorForLanguageModeling(tokenizer, mlm=False)``."""
    return DataCollatorForLanguageModeling(tokenizer=tok, mlm=False)(features)


def seed_batches(texts: list[str], tok, steps: int, seed: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """``steps`` batches of ``texts`` as the document makes them (:func:`seed_tokenize`, :func:`seed_batch`), its
    rows in the kit's :func:`~qlora_helpers.sft_data.batch_order` for ``seed``: the same rows, in the same order,
    as a kit run of that seed sees."""
    order = batch_order(len(texts), steps, seed, batch_size)
    features = seed_tokenize([texts[i] for rows in order for i in rows], tok)
    return [seed_batch(features[k * batch_size:(k + 1) * batch_size], tok) for k in range(steps)]


def label_report(batch: dict[str, torch.Tensor], tok) -> dict:
    """What a batch trains on: the share of positions that are padding, how many EOS tokens the texts hold
    (in the attended positions) and how many of those are labels.

    Returns:
        ``{"pad_share", "eos_in_text", "eos_labelled", "labelled"}``; ``labelled`` counts every label that
        is not ``-100``.
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"].bool(), batch["labels"]
    eos = (ids == tok.eos_token_id) & mask
    return {"pad_share": round(1.0 - mask.float().mean().item(), 4),
            "eos_in_text": int(eos.sum()),
            "eos_labelled": int((eos & (labels != IGNORE_INDEX)).sum()),
            "labelled": int((labels != IGNORE_INDEX).sum())}
