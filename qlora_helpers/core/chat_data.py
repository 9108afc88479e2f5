"""Chat rows as token ids, through the tokenizer's own chat template (foundation for 01 and 04).

What it teaches: a training example is the conversation rendered by ``apply_chat_template``, so
training sees exactly the format that inference (:func:`qlora_helpers.core.evaluation.prompt_text`)
feeds the model. The sequence ends at the assistant's EOS token (``<|im_end|>``): the newline the
template writes after it is never generated, so it is never trained on either. Notebook 01 trains
on every token of it (:func:`qlora_helpers.lora.chat_batch`); notebook 04 masks the prompt
(:func:`qlora_helpers.sft_data.tokenize_chat`). Both cut and pad here, once.
"""
from __future__ import annotations

from transformers import DataCollatorForSeq2Seq

IGNORE_INDEX = -100  # torch.nn.CrossEntropyLoss's default ignore_index


def check_messages(example: dict) -> list[dict]:
    """The row's ``messages``, which must end with an assistant turn (else a ``ValueError``
    that shows the row and the expected shape)."""
    try:
        msgs = example["messages"]
    except (KeyError, TypeError):
        msgs = None
    if not msgs or msgs[-1].get("role") != "assistant":
        raise ValueError(f"each row needs 'messages' ending with an assistant turn, got {example!r:.200}; "
                         "build rows as [{'role': 'user', ...}, {'role': 'assistant', ...}]")
    return msgs


def conversation_ids(example: dict, tok, max_length: int = 128) -> tuple[list[int], int]:
    """Token ids of one chat row up to and including the assistant's EOS, and how many of them
    are the prompt (everything before the assistant's answer).

    Args:
        example: a row with ``messages`` (user turn(s), then the assistant turn).
        tok: a tokenizer with a chat template and an EOS token.
        max_length: longest sequence allowed; a longer one is an error, never silently cut,
            because cutting would drop the answer (or its EOS).
    Returns:
        ``(ids, n_prompt)``.
    """
    msgs = check_messages(example)
    prompt = tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, return_dict=False)
    full = tok.apply_chat_template(msgs, return_dict=False)
    if full[:len(prompt)] != prompt:
        raise ValueError("the chat template renders the prompt differently with and without the answer; "
                         "response-only labels need the prompt to be a prefix of the full conversation")
    end = len(full) - full[::-1].index(tok.eos_token_id)  # up to and including the last EOS
    full = full[:end]
    if len(full) > max_length:
        raise ValueError(f"example has {len(full)} tokens (prompt {len(prompt)}) but max_length={max_length}; "
                         f"raise max_length to at least {len(full)} or shorten the prompt")
    return full, len(prompt)


def padded_collator(tok, max_length: int | None = 128):
    """Right padding with labels padded with -100.

    ``max_length=128``: every row padded to 128, the common tutorial recipe
    (``padding="max_length"``). ``max_length=None``: padded to the longest row of the batch.
    """
    padding = "max_length" if max_length else "longest"
    return DataCollatorForSeq2Seq(tok, padding=padding, max_length=max_length,
                                  label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
