"""Checkers for notebook 06's exercises (ablations), on the protocol of
:mod:`qlora_helpers.exercises`."""
from __future__ import annotations

import random

from .. import seed_stats
from ..ablation_plan import TARGETS
from ..lora import llama_lora_param_count
from . import attempted, call_without, expect, fresh_seed

# What exercise 3 asks the learner to write; calling one of these instead fails the check.
LIBRARY_VERDICT = {"qlora_helpers.seed_stats.separated": seed_stats.separated,
                   "qlora_helpers.seed_stats.summarize": seed_stats.summarize,
                   "qlora_helpers.seed_stats.verdict": seed_stats.verdict}


def check_param_count(config, answer) -> bool | None:
    """Exercise 1: trainable LoRA parameters at r = 32 on the four attention projections."""
    if not attempted(answer, "Exercise 1"):
        return None   # waiting: nothing to display below the hint
    want = llama_lora_param_count(config, 32, TARGETS["attention"])
    expect(int(answer) == want, f"got {answer}; per layer and projection r * (in + out), summed over "
                                 f"q, k, v, o (k and v are narrower: grouped-query attention), times layers")
    print(f"Exercise 1: correct, {want:,} parameters.")
    return True


def check_rslora_scale(answer) -> bool | None:
    """Exercise 2: the r at which rsLoRA's alpha/sqrt(r) is 4x LoRA's alpha/r (any alpha)."""
    if not attempted(answer, "Exercise 2"):
        return None   # waiting: nothing to display below the hint
    expect(int(answer) == 16, f"got {answer}: at r = {answer} rsLoRA's scale is {float(answer) ** 0.5:g}x LoRA's, not 4x")
    print("Exercise 2: correct, r = 16: the gap grows as sqrt(r).")
    return True


def _random_rows(rng: random.Random) -> tuple[list[dict], str, str, str]:
    """Grid rows of two variants (2 to 5 seeds each, now and then 1) whose means sit at random distances
    from twice their spread: some pairs clearly apart, some within the noise, some at the edge."""
    key = rng.choice(["eval_loss", "exact_match"])
    a, b = rng.sample(["r4", "r8", "r16", "r64", "qv", "dora", "lorafa"], 2)
    spread = rng.uniform(0.005, 0.05)
    gap = spread * rng.choice([0.5, 1.5, 2.5, 4.0, rng.uniform(0, 5)])
    rows = [{"name": a, "seed": s, key: rng.gauss(0.5, spread)} for s in range(rng.choice([1, 2, 3, 3, 5]))]
    rows += [{"name": b, "seed": s, key: rng.gauss(0.5 + gap, spread)} for s in range(rng.choice([2, 3, 3, 5]))]
    rng.shuffle(rows)
    return rows, a, b, key


def check_separated(separated_fn) -> bool | None:
    """Exercise 3: ``separated_fn(rows, a, b, key) -> True | False | None``, the kit's rule for "a real
    difference": the means of ``key`` over the seeds of ``a`` and of ``b`` differ by more than twice the
    larger sample standard deviation; None when either has fewer than 2 seeds. Checked against
    :func:`qlora_helpers.seed_stats.separated` on 30 random grids drawn anew at every check; written by
    hand (:data:`LIBRARY_VERDICT` may not be called)."""
    if not attempted(separated_fn, "Exercise 3"):
        return None   # waiting: nothing to display below the hint
    rng = random.Random(fresh_seed())
    for i in range(30):
        rows, a, b, key = _random_rows(rng)
        while i == 0 and min(sum(r["name"] == v for r in rows) for v in (a, b)) < 2:
            rows, a, b, key = _random_rows(rng)      # the first grid has seeds enough: None there is a placeholder
        want = seed_stats.separated(rows, a, b, key)
        got = call_without(separated_fn, LIBRARY_VERDICT, "Exercise 3", [dict(r) for r in rows], a, b, key)
        if i == 0 and not attempted(got, "Exercise 3"):
            return None   # waiting: nothing to display below the hint (the stub body returns None)
        n = {v: sum(r["name"] == v for r in rows) for v in (a, b)}
        expect(not (got is None and want is not None),
               f"returned None with {n[a]} and {n[b]} seeds: None is only for fewer than 2 seeds of either")
        expect(got is want or got == want, f"{a} vs {b} on {key}, {n[a]} and {n[b]} seeds: got {got!r}. Mean, sample "
                                           f"std (n - 1), twice the larger std; None below 2 seeds")
    print("Exercise 3: correct on 30 random grids: you can now judge any row of the committed grid yourself.")
    return True
