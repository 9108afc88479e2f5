"""Key numbers a notebook proved, collected for the one-screen summary of ``make course``.

A notebook calls ``record("02", "NF4 levels == bitsandbytes table", True)`` right after the
assert that proved it. When ``$QLORA_KIT_SUMMARY`` names a file (the course runner sets it),
the claim is appended there as one JSON line; otherwise nothing is written. It returns None, so
that a call at the end of a cell leaves no bare value under it (the cell above it shows the number
with its words).
"""
from __future__ import annotations

import json
import os

SUMMARY_ENV = "QLORA_KIT_SUMMARY"


def record(notebook: str, claim: str, value):
    """Append ``{"notebook", "claim", "value"}`` to ``$QLORA_KIT_SUMMARY`` if it is set."""
    path = os.environ.get(SUMMARY_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"notebook": notebook, "claim": claim, "value": value}) + "\n")


def read(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
