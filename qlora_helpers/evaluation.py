"""Exact match on the kit's task: did the model answer exactly the right string?

Generation is greedy (deterministic) and batched with left padding, as a served model would be.
The answer is the text the model writes after the chat template's assistant header, up to its
EOS token (``<|im_end|>`` in the offline tokenizer), stripped of surrounding whitespace.
"""
from __future__ import annotations

import torch


def prompt_text(tok, prompt: str) -> str:
    """The chat-formatted prompt, ending with the assistant header the model answers after."""
    return tok.apply_chat_template([{"role": "user", "content": prompt}],
                                   add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def generate_answers(model, tok, prompts: list[str], max_new_tokens: int = 16,
                     batch_size: int = 32) -> list[str]:
    """Greedy answers to ``prompts``, one string each."""
    side, tok.padding_side = tok.padding_side, "left"
    was_training = model.training
    model.eval()
    answers = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [prompt_text(tok, p) for p in prompts[i:i + batch_size]]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(model.device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]  # (batch, <= max_new_tokens)
            answers += [s.strip() for s in tok.batch_decode(new, skip_special_tokens=True)]
    finally:
        tok.padding_side = side
        model.train(was_training)
    return answers


def exact_match(model, tok, rows, max_new_tokens: int = 16) -> tuple[float, list[str]]:
    """Share of ``rows`` (dicts with ``prompt`` and ``answer``) answered exactly; and the answers."""
    rows = list(rows)
    if not rows:
        raise ValueError("exact_match needs at least one row with 'prompt' and 'answer'")
    answers = generate_answers(model, tok, [r["prompt"] for r in rows], max_new_tokens)
    hits = sum(a == r["answer"] for a, r in zip(answers, rows))
    return hits / len(rows), answers


@torch.no_grad()
def logits_and_mask(model, tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits (batch, seq, vocab) of right-padded ``texts`` (cache off) and their attention
    mask (batch, seq): what two models are compared on. Leaves the model in eval mode."""
    model.eval()
    side, tok.padding_side = tok.padding_side, "right"
    try:
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tok.padding_side = side
    out = model(**enc.to(model.device), use_cache=False).logits.float().cpu()
    return out, enc["attention_mask"].bool().cpu()
