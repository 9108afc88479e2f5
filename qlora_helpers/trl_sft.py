"""The production shortcut: the same SFT through TRL's ``SFTTrainer``, proven equal to the kit's path.

What it teaches: TRL (``trl.SFTTrainer`` with ``trl.SFTConfig``) does in a few arguments what
notebook 04 builds by hand, and the kit's hand-built path is the oracle that shows what those
arguments do:

* **Loss on the assistant's turn only** (``assistant_only_loss=True``). TRL reads which tokens are
  the assistant's from ``{% generation %}`` ... ``{% endgeneration %}`` markers in the chat
  template (transformers' ``return_assistant_tokens_mask``). SmolLM2's template has none, and TRL
  1.16 patches only the templates it knows (``trl.chat_template_utils.get_training_chat_template``
  raises ``ValueError`` for SmolLM2's). :func:`training_chat_template` adds the markers around the
  assistant's content and its ``<|im_end|>`` and checks, with TRL's own checks, that the text it
  renders is unchanged and that the end-of-turn token is trained.
* **Packing.** ``packing=True`` groups whole conversations into rows of at most ``max_length``
  tokens (best-fit decreasing, ``packing_strategy="bfd"``), and trains them padding-free
  (``position_ids`` restart at 0 for every conversation, as in
  :func:`qlora_helpers.sft_data.packed_collator`); ``padding_free=True`` alone flattens each batch
  of rows into one row without regrouping. :func:`unpacked_rows` splits packed rows back at TRL's
  ``seq_lengths`` so that each conversation can be compared with the kit's.
* **One recipe.** :func:`sft_config` is ``SFTConfig`` filled from the same dict as the kit's
  ``TrainingArguments`` (:func:`qlora_helpers.sft.training_kwargs`), so both runs read every number
  from one :class:`qlora_helpers.core.recipe.Recipe`.

TRL keeps one token more than the kit per conversation: the newline the template writes after the
assistant's ``<|im_end|>``. It carries the label ``-100`` and comes after the last labelled token,
so in a causal model it changes no loss; :func:`compare_labels` checks exactly that.
"""
from __future__ import annotations

import re
from collections import Counter

from trl import SFTConfig
from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

from .core.chat_data import IGNORE_INDEX
from .sft import training_kwargs

# One ChatML turn as SmolLM2's and the tiny model's templates write it (the strings hold real
# newlines, as in the tokenizers' files).
_CHATML_TURN = re.compile(
    r"\{\{\s*'<\|im_start\|>'\s*\+\s*message\['role'\]\s*\+\s*'\n'\s*\+\s*message\['content'\]"
    r"\s*\+\s*'<\|im_end\|>'\s*\+\s*'\n'\s*\}\}")
_ASSISTANT_TURN = ("{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
                   "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
                   "{{ '\n' }}{% else %}TURN{% endif %}")
_PROBE = [{"role": "user", "content": "What is 2024-01-31 in DD/MM/YYYY notation?"},
          {"role": "assistant", "content": "31/01/2024"}]


def training_chat_template(tok) -> str:
    """``tok``'s chat template with ``{% generation %}`` markers around each assistant answer and
    its ``<|im_end|>``: what ``assistant_only_loss=True`` needs.

    A template that already has the markers is returned as it is. The result renders exactly the
    text the original renders (checked on a probe conversation, with and without the generation
    prompt), and TRL's own checks pass on it: ``has_generation_markers`` and
    ``is_chat_template_stop_token_trained`` (the end-of-turn token is inside the mask, so the
    model learns to stop).

    Raises:
        ValueError: the template is not the ChatML form this function knows how to mark; the
            message says what to add by hand.
    """
    original = tok.chat_template
    if not isinstance(original, str):
        raise ValueError(f"the tokenizer's chat template is {type(original).__name__}, not one template "
                         "string; pick the variant to train with and mark it by hand")
    if has_generation_markers(original):
        return original
    turns = _CHATML_TURN.findall(original)
    if len(turns) != 1:
        raise ValueError(
            f"the chat template has {len(turns)} ChatML turn expressions where 1 was expected, so it cannot be "
            "marked automatically; wrap the assistant's content and its end-of-turn token in "
            "{% generation %} ... {% endgeneration %} by hand (TRL's 'chat templates' page shows how)")
    template = _CHATML_TURN.sub(lambda m: _ASSISTANT_TURN.replace("TURN", m.group(0)), original)
    for gen in (False, True):
        msgs = _PROBE[:1] if gen else _PROBE
        want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        got = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, chat_template=template)
        if got != want:
            raise ValueError(f"the marked template renders {got!r} where the original renders {want!r}")
    if not has_generation_markers(template) or not is_chat_template_stop_token_trained(tok, chat_template=template):
        raise ValueError("TRL does not accept the marked template (no markers, or the end-of-turn token "
                         "outside them)")
    return template


def sft_config(profile, output_dir: str, recipe=None, **overrides):
    """``trl.SFTConfig`` from the recipe, through the same dict as the kit's ``TrainingArguments``
    (:func:`qlora_helpers.sft.training_kwargs`), with ``assistant_only_loss=True``; keyword
    ``overrides`` win (``packing``, ``padding_free``, ``max_length``, ...).

    Raises:
        ValueError: as :func:`qlora_helpers.sft.training_kwargs`, and as ``SFTConfig`` (for
            instance ``padding_free=True`` without packing needs ``max_length=None``).
    """
    return SFTConfig(**training_kwargs(profile, output_dir, recipe, **{"assistant_only_loss": True, **overrides}))


def unpacked_rows(dataset) -> list[dict[str, list[int]]]:
    """The conversations of a dataset prepared by ``SFTTrainer``, one dict (``input_ids``,
    ``labels``) each; packed rows are split at their ``seq_lengths``.

    >>> unpacked_rows([{"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, -100, -100, 5], "seq_lengths": [2, 3]}])
    [{'input_ids': [1, 2], 'labels': [-100, 2]}, {'input_ids': [3, 4, 5], 'labels': [-100, -100, 5]}]

    Raises:
        ValueError: a packed row whose ``seq_lengths`` do not add up to its length.
    """
    rows = []
    for ex in dataset:
        lengths = ex.get("seq_lengths") or [len(ex["input_ids"])]
        if sum(lengths) != len(ex["input_ids"]):
            raise ValueError(f"seq_lengths {lengths} add up to {sum(lengths)}, the row has {len(ex['input_ids'])} tokens")
        start = 0
        for n in lengths:
            rows.append({"input_ids": ex["input_ids"][start:start + n], "labels": ex["labels"][start:start + n]})
            start += n
    return rows


def compare_labels(trl_rows: list[dict], kit_rows: list[dict]) -> dict:
    """Match TRL's conversations to the kit's and compare their labels.

    Each TRL row is cut after its last labelled token; the part before must be one of the kit's
    rows, token for token, with the same labels, and the part after (the template's trailing
    newline) must carry no label. Rows are matched by their tokens, so TRL's packing order does
    not matter.

    Returns:
        ``rows_trl``, ``rows_kit``; ``matched`` (TRL rows found among the kit's with equal labels,
        each kit row used at most as often as it occurs); ``unlabelled_tails`` (TRL rows whose
        extra tokens all carry -100); ``tail_tokens`` (how often each extra token sequence
        occurs, as token ids).

    >>> kit = [{"input_ids": [7, 8, 2], "labels": [-100, 8, 2]}]
    >>> compare_labels([{"input_ids": [7, 8, 2, 9], "labels": [-100, 8, 2, -100]}], kit)["matched"]
    1
    >>> compare_labels([{"input_ids": [7, 8, 2, 9], "labels": [7, 8, 2, -100]}], kit)["matched"]
    0
    """
    pool = Counter((tuple(r["input_ids"]), tuple(r["labels"])) for r in kit_rows)
    matched = unlabelled = 0
    tails: Counter = Counter()
    for r in trl_rows:
        labelled = [i for i, t in enumerate(r["labels"]) if t != IGNORE_INDEX]
        cut = labelled[-1] + 1 if labelled else 0
        key = (tuple(r["input_ids"][:cut]), tuple(r["labels"][:cut]))
        if pool[key] > 0:
            pool[key] -= 1
            matched += 1
        tail = r["labels"][cut:]
        unlabelled += all(t == IGNORE_INDEX for t in tail)
        tails[tuple(r["input_ids"][cut:])] += 1
    return {"rows_trl": len(trl_rows), "rows_kit": len(kit_rows), "matched": matched,
            "unlabelled_tails": unlabelled, "tail_tokens": dict(tails)}


def loss_gaps(kit_history: list[dict], trl_history: list[dict]) -> list[tuple[int, float, float]]:
    """``(step, kit loss, TRL loss)`` at every step both runs logged.

    >>> loss_gaps([{"step": 2, "loss": 1.5}, {"step": 4, "loss": 0.9}], [{"step": 2, "loss": 1.4}])
    [(2, 1.5, 1.4)]

    Raises:
        ValueError: the runs logged no step in common.
    """
    trl = {h["step"]: h["loss"] for h in trl_history}
    common = [(h["step"], h["loss"], trl[h["step"]]) for h in kit_history if h["step"] in trl]
    if not common:
        raise ValueError(f"no common logged step: kit {[h['step'] for h in kit_history]}, "
                         f"TRL {sorted(trl)}; log both runs with the same logging_steps")
    return common
