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
def generate_ids(model, tok, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 50) -> list[list[int]]:
    """The greedy new tokens for each of ``prompts``, up to and including the EOS token where the model
    wrote one (else ``max_new_tokens`` of them): what :func:`generate_answers` decodes, and what a length
    is counted on (notebook 07).

    ``batch_size`` is the largest batch; the prompts are split into batches of equal size (100 prompts:
    2 x 50; 64: 2 x 32), since every decoding step reads all the weights (and dequantizes every 4-bit
    layer) whatever the batch: a short last batch costs as many steps as a full one. Measured on 100
    test dates with notebook 04's adapter (AMD EPYC, 2 threads): 25.7 s in batches of 32, 21.6 s of 50,
    23.8 s of 100; the same answers.
    """
    if batch_size < 1:
        raise ValueError(f"generate_ids(batch_size={batch_size}): use a positive batch size, e.g. 50")
    n_batches = -(-len(prompts) // batch_size)                    # ceil
    size = -(-len(prompts) // n_batches) if prompts else batch_size
    side, tok.padding_side = tok.padding_side, "left"
    was_training = model.training
    model.eval()
    new_ids = []
    try:
        for i in range(0, len(prompts), size):
            texts = [prompt_text(tok, p) for p in prompts[i:i + size]]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(model.device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            for row in out[:, enc["input_ids"].shape[1]:].tolist():  # (batch, <= max_new_tokens)
                cut = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
                new_ids.append(row[:cut])
    finally:
        tok.padding_side = side
        model.train(was_training)
    return new_ids


def generate_answers(model, tok, prompts: list[str], max_new_tokens: int = 16,
                     batch_size: int = 50) -> list[str]:
    """Greedy answers to ``prompts``, one string each (:func:`generate_ids`, decoded without special tokens)."""
    return [s.strip() for s in tok.batch_decode(generate_ids(model, tok, prompts, max_new_tokens, batch_size),
                                                skip_special_tokens=True)]


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


def logit_tolerance(dtype: torch.dtype, logit_scale: float, growth: float = 128.0) -> float:
    """How far two runs of the same model may put a logit apart when one computes in ``dtype``:
    ``growth * eps(dtype) * max(|logit|, 1)``, with ``logit_scale`` the largest |logit| compared.

    Why this form: every layer rounds its output to ``dtype`` (relative error up to eps / 2), the
    residual stream adds those errors up over the layers, and a logit is a sum of such terms, so
    the error scales with the dtype's eps and the logits' size. ``growth`` = 128 was set from
    measurements on SmolLM2-135M (30 layers, largest |logit| 41.9, 8 test conversations, CPU):
    the same adapter merged into the dequantized base against unmerged, fp32: 2.6e-4 (53 eps x
    scale; bound 6.4e-4); 4-bit with fp16 compute and fp16 weights (a T4's numerics) against fp32
    compute: 1.38 (34 eps x scale; bound 5.2). A bound written for fp32 (1e-3) cannot hold on a
    T4, and one written for fp16 would let a real fp32 bug through: hence one rule, from the dtype.

    >>> round(logit_tolerance(torch.float32, 10.0), 6), round(logit_tolerance(torch.float16, 10.0), 2)
    (0.000153, 1.25)
    """
    if not dtype.is_floating_point:
        raise ValueError(f"logit_tolerance needs a floating dtype (the compute dtype), got {dtype}")
    return growth * torch.finfo(dtype).eps * max(abs(logit_scale), 1.0)
