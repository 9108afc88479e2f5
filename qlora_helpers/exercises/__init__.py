"""What every exercise checker in the kit shares: one protocol.

A checker returns True when the answer is right, prints a hint and returns None while the answer
is still a placeholder (None or ``...``, :func:`attempted`; None, so that the notebook shows the hint
and no stray ``False`` under it), and raises AssertionError, saying what is off, when the answer is
wrong (:func:`expect`).
"""
from __future__ import annotations

import inspect
import os
import sys


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


def fresh_seed() -> int:
    """A seed drawn from the OS for one check: the inputs change at every run, so no printed value can be
    the answer, and the global RNG is never touched (a checker must not change what the notebook's next
    cells draw)."""
    return int.from_bytes(os.urandom(4), "little")


def _code_of(fn):
    """The code object a call of ``fn`` runs (through decorators and bound methods), or None (a builtin)."""
    return getattr(inspect.unwrap(getattr(fn, "__func__", fn)), "__code__", None)


def call_without(fn, forbidden: dict, exercise: str, *args, **kwargs):
    """``fn(*args, **kwargs)``, failing if it ran any function of ``forbidden`` (its name in the message ->
    the function): the library version of what the exercise asks the learner to write. Calls are seen by
    the code they run (``sys.setprofile``), so an alias or an earlier ``from ... import`` is caught too.
    The checker computes its own reference before or after this call, outside it.

    >>> import math
    >>> call_without(lambda x: x * x, {"math.sqrt": math.sqrt}, "Exercise 9", 3)
    9
    >>> from qlora_helpers.lora import lora_scaling
    >>> call_without(lambda a, r: lora_scaling(a, r), {"qlora_helpers.lora.lora_scaling": lora_scaling}, "Exercise 9", 16, 4)
    Traceback (most recent call last):
    AssertionError: Exercise 9 asks you to write this yourself; your code called qlora_helpers.lora.lora_scaling, the library's own version. Write it from the formula in the text.
    """
    codes = {_code_of(f): name for name, f in forbidden.items() if _code_of(f) is not None}
    called = []

    def watch(frame, event, arg):
        if event == "call" and frame.f_code in codes:
            called.append(codes[frame.f_code])
    previous = sys.getprofile()
    sys.setprofile(watch)
    try:
        result = fn(*args, **kwargs)
    finally:
        sys.setprofile(previous)
    expect(not called, f"{exercise} asks you to write this yourself; your code called {called[0] if called else ''}, "
                       f"the library's own version. Write it from the formula in the text.")
    return result
