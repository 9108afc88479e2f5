"""Training throughput: real tokens per second, and the share of the compute that is padding.

What it teaches: a padded batch spends compute on pad tokens that carry no loss; packing several
examples into one row (with position ids that restart, :mod:`qlora_helpers.sft_data`) spends it on
real tokens. Measured, not assumed: :func:`tokens_per_second` times steps of the kit's one loop
(:func:`qlora_helpers.core.training.train_loop`), so the number includes the backward pass, clipping and
the optimizer step, as a real run does.
"""
from __future__ import annotations

from .core.training import build_optimizer, train_loop


def tokens_per_second(model, batches: list[dict], optimizer=None) -> dict[str, float]:
    """Training throughput: real (non-pad) tokens per second of :func:`~qlora_helpers.core.training.train_loop`
    steps (forward, backward, clipping, optimizer step) over ``batches``, and the pad share.

    Args:
        batches: collated batches (padded ones carry ``attention_mask``; packed ones
            ``position_ids``). The first batch is a warm-up step and is not timed.
        optimizer: the optimizer to step; default AdamW at learning rate 0, so the model's weights
            do not change while it is timed (AdamW's state does).
    Returns:
        ``{"tokens_per_s", "pad_share", "seconds"}``.
    """
    if len(batches) < 2:
        raise ValueError(f"tokens_per_second needs at least 2 batches (the first is a warm-up), got {len(batches)}")
    if optimizer is None:
        optimizer = build_optimizer("adamw_torch", [p for p in model.parameters() if p.requires_grad], lr=0.0)
    lr = optimizer.param_groups[0]["lr"]
    train_loop(model, optimizer, batches[:1], lr=lr, warmup=0)
    seconds = train_loop(model, optimizer, batches[1:], lr=lr, warmup=0)["seconds"]
    total = sum(b["input_ids"].numel() for b in batches[1:])
    real = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches[1:])
    model.zero_grad(set_to_none=True)
    return {"tokens_per_s": real / seconds, "pad_share": 1 - real / total, "seconds": seconds}
