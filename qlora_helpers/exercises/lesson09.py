"""Checker for notebook 09's exercise (plan a multi-GPU run), on the protocol of :mod:`qlora_helpers.exercises`.

The learner writes ``plan_gpus(model, gpu, batch_size, seq_len)``: how many GPUs of one kind a QLoRA run needs
(PEFT's FSDP-QLoRA recipe, :func:`fsdp_qlora_run`), preferring a run without CPU offload, as
``(num_gpus, cpu_offload)``, or :data:`DOES_NOT_FIT`. The oracle is the kit's planner
(:func:`qlora_helpers.memory.shard_estimate`, :func:`~qlora_helpers.memory.will_it_fit`), asked about one plan of each
kind (one GPU; several without offload; offload; nothing) and one that needs all :data:`MAX_GPUS`, drawn anew at
every check.
"""
from __future__ import annotations

import functools
import itertools
import random

from ..memory import GPUS, MemoryEstimate, estimate_memory, shard_estimate, will_it_fit
from . import attempted, call_without, expect, fresh_seed

MAX_GPUS = 8              # one node
DOES_NOT_FIT = "does not fit"
MODELS = ("llama-2-7b", "llama-3-8b", "qwen2.5-7b", "llama-2-13b", "llama-33b", "llama-65b", "llama-2-70b")
KINDS = ("one GPU", "several GPUs, no offload", "CPU offload", DOES_NOT_FIT)


def fsdp_qlora_run(model: str, batch_size: int, seq_len: int) -> MemoryEstimate:
    """The one-GPU plan of PEFT's FSDP-QLoRA recipe (notebook 09, section 1) for ``model``: r 8 on all linear
    layers, ``batch_size`` rows of ``seq_len`` tokens per GPU, gradient checkpointing, AdamW in 32 bit, every
    weight that is not quantized in one 16-bit storage dtype.

    >>> from qlora_helpers.memory import GB
    >>> round(fsdp_qlora_run("llama-2-70b", 2, 2048).total / GB, 1)
    50.1
    """
    return estimate_memory(model, "qlora", r=8, batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=True,
                           optimizer="adamw_torch", upcast_non_quantized=False)


def _plan(run, model: str, gpu: str, num_gpus: int, cpu_offload: bool):
    """Whether ``run`` (a one-GPU plan of ``model``) fits ``num_gpus`` cards of kind ``gpu`` under FSDP."""
    return will_it_fit(shard_estimate(run, model, "fsdp", num_gpus, cpu_offload), gpu)


def reference(model: str, gpu: str, batch_size: int, seq_len: int):
    """The answer: the fewest GPUs (up to :data:`MAX_GPUS`) without offload, else the fewest with it, else
    :data:`DOES_NOT_FIT`.

    >>> reference("llama-2-70b", "rtx-4090", 2, 2048), reference("llama-2-70b", "t4", 2, 2048)
    ((3, False), (1, True))
    """
    return _reference(model, gpu, batch_size, seq_len)


@functools.lru_cache(maxsize=None)   # a plain function around it, so that call_without sees a call to reference
def _reference(model: str, gpu: str, batch_size: int, seq_len: int):
    run = fsdp_qlora_run(model, batch_size, seq_len)
    for offload in (False, True):
        for n in range(1, MAX_GPUS + 1):
            if _plan(run, model, gpu, n, offload).fits:
                return n, offload
    return DOES_NOT_FIT


def _kind(answer) -> str:
    if answer == DOES_NOT_FIT:
        return DOES_NOT_FIT
    n, offload = answer
    return "CPU offload" if offload else ("one GPU" if n == 1 else "several GPUs, no offload")


def draw_cases(seed: int) -> list[tuple[str, str, int, int]]:
    """One (model, gpu, batch_size, seq_len) of each of :data:`KINDS`, and one whose answer is all
    :data:`MAX_GPUS` without offload (a loop that stops short fails it), drawn with ``seed`` from every model of
    :data:`MODELS`, card of :data:`~qlora_helpers.memory.GPUS`, batch of 1-4 and length of 512-4096 tokens."""
    grid = list(itertools.product(MODELS, sorted(GPUS), (1, 2, 3, 4), (512, 1024, 2048, 4096)))
    random.Random(seed).shuffle(grid)
    found, wanted = {}, [*KINDS, "all GPUs"]
    for case in grid:
        answer = reference(*case)
        found.setdefault("all GPUs" if answer == (MAX_GPUS, False) else _kind(answer), case)
        if len(found) == len(wanted):
            return [found[k] for k in wanted]
    raise RuntimeError(f"the grid holds plans of only these kinds: {sorted(found)}")


def _what_is_off(case, answer, want) -> str:
    model, gpu, batch_size, seq_len = case
    where = f"{model} on {gpu}, batch {batch_size} x {seq_len} tokens per GPU"
    if answer == DOES_NOT_FIT:
        return f"{where}: you say nothing fits, but some plan with at most {MAX_GPUS} GPUs does"
    n, offload = answer
    fit = _plan(fsdp_qlora_run(model, batch_size, seq_len), model, gpu, n, offload)
    said = f"{n} GPU{'s' if n > 1 else ''}{' with CPU offload' if offload else ''}"
    if not fit.fits:
        return f"{where}: on {said} the plan {fit}"
    if offload and not want[1]:
        return f"{where}: {said} fits, but a plan without offload fits too (offload is the last resort: slow)"
    return f"{where}: {said} fits, and so does a plan with fewer GPUs"


def check_plan_gpus(plan_gpus) -> bool | None:
    """The exercise: ``plan_gpus(model, gpu, batch_size, seq_len)`` against :func:`reference` on five plans, one
    of each kind and one that needs all :data:`MAX_GPUS`, drawn anew at every check (calling :func:`reference`
    itself fails)."""
    if not attempted(plan_gpus, "Exercise"):
        return None   # waiting: nothing to display below the hint
    cases = draw_cases(fresh_seed())
    lines = []
    for case in cases:
        answer = call_without(plan_gpus, {"qlora_helpers.exercises.lesson09.reference": reference}, "The exercise", *case)
        if not attempted(answer, "Exercise"):
            return None   # the student copy's stub returns None
        if answer != DOES_NOT_FIT:
            expect(isinstance(answer, tuple) and len(answer) == 2 and isinstance(answer[0], int)
                   and isinstance(answer[1], bool) and 1 <= answer[0] <= MAX_GPUS,
                   f"{case[0]} on {case[1]}: got {answer!r}; return (num_gpus, cpu_offload), an int from 1 to "
                   f"{MAX_GPUS} and a bool, or {DOES_NOT_FIT!r}")
        want = reference(*case)
        expect(answer == want, _what_is_off(case, answer, want))
        lines.append(f"  {case[0]} on {case[1]}, batch {case[2]} x {case[3]}: {answer}")
    print("Exercise: correct on five plans (one of each kind, and one that needs all "
          f"{MAX_GPUS} GPUs):\n" + "\n".join(lines))
    return True
