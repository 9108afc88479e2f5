"""The course's task: rewrite an ISO date (2024-03-17) as day/month/year (17/03/2024).

What it teaches: a fine-tuning task worth measuring has an answer that is right or wrong. Every
output character is a copy of an input character at a fixed relative offset, so a small transformer
can learn it, and exact match is unambiguous (:func:`qlora_helpers.core.evaluation.exact_match`). Every
profile uses it: the tiny model and the real model (SmolLM2-135M-Instruct) train on the same rows,
which ship as fixed bytes with the kit (``data/train.jsonl``, ``data/test.jsonl`` of the offline
assets, :mod:`qlora_helpers.core.offline`); this module is how they were made, and the tests remake them.
"""
from __future__ import annotations

import random

PROMPTS = [
    "Rewrite the date {iso} as DD/MM/YYYY.",
    "Convert {iso} to day/month/year format.",
    "What is {iso} in DD/MM/YYYY notation?",
    "Please write the date {iso} the European way (DD/MM/YYYY).",
]


def make_task_example(rng: random.Random) -> dict:
    """One chat example.

    >>> ex = make_task_example(random.Random(0))
    >>> ex["answer"], ex["messages"][1]["content"] == ex["answer"]
    ('02/07/1998', True)
    """
    year, month, day = rng.randint(1900, 2099), rng.randint(1, 12), rng.randint(1, 28)
    iso = f"{year:04d}-{month:02d}-{day:02d}"
    answer = f"{day:02d}/{month:02d}/{year:04d}"
    prompt = rng.choice(PROMPTS).format(iso=iso)
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": answer}],
            "prompt": prompt, "answer": answer}


def make_task_splits(n_train: int = 2000, n_test: int = 200, seed: int = 0) -> dict[str, list[dict]]:
    """Disjoint train/test splits (no test date appears in train)."""
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < n_train + n_test:
        ex = make_task_example(rng)
        if ex["answer"] not in seen:
            seen.add(ex["answer"])
            rows.append(ex)
    return {"train": rows[:n_train], "test": rows[n_train:]}
