"""When it breaks: the mechanisms behind eight common QLoRA failures, and the smallest checks the kit lacked.

What it teaches (notebook ``08_when_it_breaks``): each failure has a mechanism that fits in a few lines, and a
check that catches it before it costs a run. Where the kit already had a check (the loss alarm of
:mod:`qlora_helpers.core.training`, the prefix check of :mod:`qlora_helpers.core.chat_data`, the gradient check of
:class:`qlora_helpers.sft_checks.TrainingHealthCallback`, the planner of :mod:`qlora_helpers.memory`), the notebook
uses it; this module holds the mechanisms it shows and the checks that were missing:

* :func:`template_search_labels`: response-only labels found by searching for a response template's token ids,
  as TRL's ``DataCollatorForCompletionOnlyLM`` did (removed in TRL 0.20; TRL 1.x labels from the structure
  instead: ``completion_only_loss`` and ``assistant_only_loss``); :func:`check_every_row_labelled`
  names the rows that such a search left without a single label.
* :func:`check_adapter_dtype`: trainable weights must be fp32 under plain AdamW (its ``eps=1e-8`` is 0 in fp16;
  Loshchilov and Hutter, arXiv 1711.05101; Kingma and Ba, arXiv 1412.6980). PEFT keeps adapters fp32 on a 16-bit
  base (``autocast_adapter_dtype=True``, ``peft.tuners.tuners_utils.cast_adapter_dtype``).
* :func:`check_plain_base`: ``get_peft_model`` injects LoRA into the base model's own modules, so a "base" kept
  for comparison is the tuned model.
* :func:`is_packed` and :func:`check_packed_call`: transformers builds the per-example mask of a packed row only
  when no cache is passed (``transformers/masking_utils.py``, ``_preprocess_mask_arguments``).
* :func:`requantize_nf4` and :func:`update_survival`: what merging into 4-bit weights keeps of an update
  (QLoRA, Dettmers et al., arXiv 2305.14314; PEFT's ``peft.tuners.lora.bnb.Linear4bit.merge``).
* :func:`check_nan_filter_off`: transformers' ``logging_nan_inf_filter`` (default True) logs a stand-in number
  in place of a NaN or inf step loss.

Production code it is checked against (``tests/test_failures.py``): transformers 5.23's loss and
``find_packed_sequence_indices``, torch's AdamW, peft 0.21.2's merge into a bitsandbytes 0.50.2 ``Linear4bit``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from bitsandbytes.functional import dequantize_4bit, quantize_4bit
from peft.tuners.lora import LoraLayer

from .core.chat_data import IGNORE_INDEX
from .nf4 import DEFAULT_BLOCKSIZE


# ---------------------------------------------------------------------------------------------
# 1. Response-only labels by template search (older TRL), and the rows it leaves without labels
# ---------------------------------------------------------------------------------------------
def template_start(ids: Sequence[int], template: Sequence[int]) -> int | None:
    """Where the last occurrence of ``template`` starts in ``ids`` (older TRL kept the last match), or None.

    >>> template_start([5, 1, 2, 3, 1, 2], [1, 2]), template_start([5, 1, 2, 3], [2, 1])
    (4, None)
    """
    n = len(template)
    starts = [i for i in range(len(ids) - n + 1) if list(ids[i:i + n]) == list(template)]
    return starts[-1] if starts else None


def template_search_labels(ids: Sequence[int], template: Sequence[int], ignore_index: int = IGNORE_INDEX) -> list[int]:
    """One row's labels as TRL's ``DataCollatorForCompletionOnlyLM`` made them: ``ignore_index`` up to and
    including the response template's tokens, the token ids after it; and, when the template's ids do not
    occur in the row, ``ignore_index`` everywhere (TRL warned "Could not find response key ... This instance
    will be ignored in loss calculation" and went on).

    >>> template_search_labels([7, 1, 2, 8, 9], [1, 2])
    [-100, -100, -100, 8, 9]
    >>> template_search_labels([7, 1, 3, 8, 9], [1, 2])
    [-100, -100, -100, -100, -100]
    """
    start = template_start(ids, template)
    if start is None:
        return [ignore_index] * len(ids)
    end = start + len(template)
    return [ignore_index] * end + list(ids[end:])


def check_every_row_labelled(labels) -> None:
    """Raise ``ValueError`` naming the rows of a batch (``(batch, seq)``, a tensor or lists) whose every label
    is ``-100``: a row the loss ignores, and, when every row is such a row, a loss of NaN (a mean over no token).

    >>> check_every_row_labelled([[-100, 5], [-100, 7]])
    >>> check_every_row_labelled([[-100, 5], [-100, -100]])
    Traceback (most recent call last):
    ValueError: 1 of 2 rows have no label (every label is -100): rows [1]. The response template was not found in them, or a too-short max_length cut their answer; label from the prompt's length (qlora_helpers.sft_data.tokenize_chat) or TRL's completion_only_loss / assistant_only_loss.
    """
    rows = [list(map(int, r)) for r in (labels.tolist() if isinstance(labels, torch.Tensor) else labels)]
    empty = [i for i, r in enumerate(rows) if all(t == IGNORE_INDEX for t in r)]
    if empty:
        raise ValueError(
            f"{len(empty)} of {len(rows)} rows have no label (every label is {IGNORE_INDEX}): rows {empty[:8]}"
            f"{' ...' if len(empty) > 8 else ''}. The response template was not found in them, or a too-short "
            f"max_length cut their answer; label from the prompt's length (qlora_helpers.sft_data.tokenize_chat) "
            f"or TRL's completion_only_loss / assistant_only_loss.")


# ---------------------------------------------------------------------------------------------
# 2. Adapters in fp16 under plain AdamW
# ---------------------------------------------------------------------------------------------
def check_adapter_dtype(model, dtype: torch.dtype = torch.float32) -> None:
    """Raise ``TypeError`` if a trainable parameter of ``model`` is not ``dtype`` (fp32).

    Plain AdamW keeps its moments in the parameter's dtype and divides by ``sqrt(v) + eps``: in fp16,
    ``eps = 1e-8`` rounds to 0 and ``(1 - beta2) * g**2`` underflows to 0 for ``|g|`` below about 8e-3, so a
    weight whose gradient is 0 (every ``lora_A`` at the first step, ``lora_B`` being zero) gets 0 / 0 = NaN and
    one whose gradient is small gets m / 0 = inf.

    >>> check_adapter_dtype(torch.nn.Linear(2, 2))
    >>> check_adapter_dtype(torch.nn.Linear(2, 2).half())
    Traceback (most recent call last):
    TypeError: 2 trainable tensors are not torch.float32 (weight: torch.float16, bias: torch.float16): AdamW's eps (1e-8) is 0 in float16 and its second moment underflows, so the first step writes NaN/inf. Keep adapters in fp32: get_peft_model's default autocast_adapter_dtype=True, or cast them (p.data = p.data.float()).
    """
    bad = [(n, p.dtype) for n, p in model.named_parameters() if p.requires_grad and p.dtype != dtype]
    if bad:
        shown = ", ".join(f"{n}: {d}" for n, d in bad[:3])
        raise TypeError(
            f"{len(bad)} trainable tensors are not {dtype} ({shown}{', ...' if len(bad) > 3 else ''}): AdamW's eps "
            f"(1e-8) is 0 in float16 and its second moment underflows, so the first step writes NaN/inf. Keep "
            f"adapters in fp32: get_peft_model's default autocast_adapter_dtype=True, or cast them (p.data = p.data.float()).")


# ---------------------------------------------------------------------------------------------
# 4. A "base" that PEFT changed in place
# ---------------------------------------------------------------------------------------------
def lora_layer_names(model) -> list[str]:
    """Names of the modules of ``model`` that are PEFT LoRA layers (empty for a plain transformers model)."""
    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def check_plain_base(model) -> None:
    """Raise ``ValueError`` if ``model``, kept as "the base" for a comparison, holds LoRA layers: after
    ``get_peft_model(base, config)`` the base's own modules are the LoRA layers (PEFT injects in place), so
    comparing the tuned model with it compares the tuned model with itself.

    >>> check_plain_base(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    """
    names = lora_layer_names(model)
    if names:
        raise ValueError(
            f"this 'base' model holds {len(names)} LoRA layers (e.g. {names[0]}): get_peft_model injected the "
            f"adapter into it, so it is the tuned model. Compare with `with peft_model.disable_adapter():` "
            f"or load the base again.")


# ---------------------------------------------------------------------------------------------
# 5. Packed rows evaluated with a cache
# ---------------------------------------------------------------------------------------------
def is_packed(position_ids: torch.Tensor) -> bool:
    """True if a row of ``position_ids`` (``(batch, seq)``) restarts, i.e. holds several examples: the rule of
    transformers' ``find_packed_sequence_indices`` (a step other than +1 starts a new example).

    >>> is_packed(torch.tensor([[0, 1, 2, 0, 1]])), is_packed(torch.tensor([[0, 1, 2, 3]]))
    (True, False)
    """
    return bool((position_ids.diff(dim=-1) != 1).any())


def check_packed_call(batch: dict, use_cache) -> None:
    """Raise ``ValueError`` if ``batch`` is packed (``position_ids`` restart, no ``attention_mask``) and the
    forward would build a cache (``use_cache`` not ``False``: ``None`` means the config's, True for a loaded
    model): transformers derives the per-example mask only when ``past_key_values is None``, so with a cache
    every example attends to the ones packed before it.

    >>> b = {"input_ids": torch.ones(1, 4), "position_ids": torch.tensor([[0, 1, 0, 1]])}
    >>> check_packed_call(b, use_cache=False)
    >>> check_packed_call(b, use_cache=None)
    Traceback (most recent call last):
    ValueError: a packed batch (position_ids restart, no attention_mask) with use_cache=None: transformers builds the per-example mask only without a cache, so the examples would attend to each other. Pass use_cache=False.
    """
    if "attention_mask" in batch or "position_ids" not in batch or not is_packed(batch["position_ids"]):
        return
    if use_cache is not False:
        raise ValueError(
            f"a packed batch (position_ids restart, no attention_mask) with use_cache={use_cache}: transformers "
            f"builds the per-example mask only without a cache, so the examples would attend to each other. "
            f"Pass use_cache=False.")


def response_loss(logits: torch.Tensor, labels: Sequence[int]) -> float:
    """Mean next-token cross-entropy of one example over its labelled positions, as transformers computes a
    causal LM's loss (the logit at position t predicts label t + 1; ``-100`` ignored).

    Args:
        logits: ``(seq, vocab)``. labels: ``seq`` ints.

    >>> round(response_loss(torch.zeros(3, 4), [-100, 2, 1]), 4)  # uniform over 4 tokens: ln 4
    1.3863
    """
    target = torch.as_tensor(list(labels)[1:], device=logits.device)       # (seq - 1,)
    return F.cross_entropy(logits[:-1].float(), target, ignore_index=IGNORE_INDEX).item()


# ---------------------------------------------------------------------------------------------
# 6. Merging into 4-bit weights: what is left of the update
# ---------------------------------------------------------------------------------------------
def requantize_nf4(weight: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE) -> torch.Tensor:
    """``dequant(Q(weight))`` with NF4 and double quantization, through bitsandbytes: what PEFT's merge into a
    4-bit layer stores, ``Q(dequant(Q(W)) + ΔW)``, read back in fp32. ``weight``: ``(out, in)``, fp32."""
    packed, state = quantize_4bit(weight.float().contiguous(), blocksize=blocksize, quant_type="nf4",
                                  compress_statistics=True)
    return dequantize_4bit(packed, state).float()                          # (out, in)


def update_survival(before: torch.Tensor, after: torch.Tensor, delta: torch.Tensor) -> dict[str, float]:
    """What a merge kept of the update ``delta``: the effective update is ``after - before``.

    Returns:
        ``changed``: share of the weights that changed at all; ``kept``: the share of ``delta`` the effective
        update holds along ``delta``'s own direction (``<effective, delta> / <delta, delta>``: 1 all of it, 0 none);
        ``cosine``: cosine of the effective update with ``delta``; ``relative_error``:
        ``||effective - delta|| / ||delta||`` (0: the update kept exactly; 1: as far off as not merging at all).

    >>> d = torch.tensor([[0.5, 0.0], [0.0, 0.5]])
    >>> {k: round(v, 6) for k, v in update_survival(torch.zeros(2, 2), d, d).items()}
    {'changed': 0.5, 'kept': 1.0, 'cosine': 1.0, 'relative_error': 0.0}
    >>> {k: round(v, 6) for k, v in update_survival(torch.zeros(2, 2), torch.zeros(2, 2), d).items()}
    {'changed': 0.0, 'kept': 0.0, 'cosine': 0.0, 'relative_error': 1.0}
    """
    effective, delta = (after - before).double().flatten(), delta.double().flatten()
    return {"changed": (effective != 0).double().mean().item(),
            "kept": (effective @ delta / (delta @ delta)).item(),
            "cosine": F.cosine_similarity(effective, delta, dim=0).item(),
            "relative_error": ((effective - delta).norm() / delta.norm()).item()}


# ---------------------------------------------------------------------------------------------
# 7. Trainer's NaN filter
# ---------------------------------------------------------------------------------------------
def check_nan_filter_off(args) -> None:
    """Raise ``ValueError`` if ``TrainingArguments`` log a stand-in number in place of a NaN or inf step loss
    (``logging_nan_inf_filter=True``, transformers' default): a loss alarm that reads the logs never sees it.
    The kit's :func:`qlora_helpers.sft.training_kwargs` sets it to False.

    >>> from types import SimpleNamespace
    >>> check_nan_filter_off(SimpleNamespace(logging_nan_inf_filter=False))
    """
    if getattr(args, "logging_nan_inf_filter", True):
        raise ValueError("TrainingArguments(logging_nan_inf_filter=True) logs a stand-in number in place of a NaN or "
                         "inf step loss, so no log shows it; pass logging_nan_inf_filter=False "
                         "(qlora_helpers.sft.training_arguments does)")
