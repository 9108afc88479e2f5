"""What every exercise checker in the kit shares: one protocol.

A checker returns True when the answer is right, prints a hint and returns None while the answer
is still a placeholder (None or ``...``, :func:`attempted`; None, so that the notebook shows the hint
and no stray ``False`` under it), and raises AssertionError, saying what is off, when the answer is
wrong (:func:`expect`).
"""
from __future__ import annotations


def attempted(answer, exercise: str) -> bool:
    """``attempted(None, "Exercise 1")`` prints a hint and returns False; any other answer -> True."""
    if answer is None or answer is Ellipsis:
        print(f"{exercise}: not attempted yet; replace the placeholder and run the cell again.")
        return False
    return True


def expect(condition, message: str) -> None:
    """An exercise check: raise ``AssertionError(message)`` if ``condition`` is false. Explicit,
    unlike an ``assert`` statement, so that ``python -O`` cannot turn a wrong answer into a right one.

    >>> expect(2 + 2 == 4, "arithmetic")
    >>> expect(2 + 2 == 5, "2 + 2 is 4")
    Traceback (most recent call last):
    AssertionError: 2 + 2 is 4
    """
    if not condition:
        raise AssertionError(message)
