"""What every exercise checker in the kit shares.

A checker returns True when the answer is right, prints a hint and returns False while the answer
is still a placeholder (None or ``...``), and raises AssertionError, saying what is off, when the
answer is wrong.
"""
from __future__ import annotations


def attempted(answer, exercise: str) -> bool:
    """``attempted(None, "Exercise 1")`` prints a hint and returns False; any other answer -> True."""
    if answer is None or answer is Ellipsis:
        print(f"{exercise}: not attempted yet; replace the placeholder and run the cell again.")
        return False
    return True
