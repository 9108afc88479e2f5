"""What one training step costs: its time by operation (the 4-bit share) and the memory held for backward,
with and without gradient checkpointing (notebook 07).

What it teaches: "QLoRA is slower" and "gradient checkpointing trades compute for memory" are claims about
where a step's time and bytes go, so they are measured where they go:

* **time by operation.** ``torch.profiler`` records every operator of one forward and backward pass with its
  own (self) CPU time. bitsandbytes' operators (``bitsandbytes::gemm_4bit``, the fused 4-bit matmul of the
  forward pass; ``bitsandbytes::dequantize_4bit`` and ``dequantize_blockwise``, which rebuild a layer's weight,
  and its double-quantized scales, for the backward pass) are what 4-bit storage adds; their share of the step
  is what "QLoRA is slower" can mean on this machine (:func:`op_share`).
* **memory held for backward.** Two independent counts: the tensors autograd saves
  (:class:`~qlora_helpers.core.training.saved_tensor_bytes`) and the C allocator's bytes in use before and after
  the forward pass (glibc's ``mallinfo2``: every tensor torch allocates on a CPU comes from ``malloc``), so
  the first is checked by the second (:func:`held_for_backward`). Gradient checkpointing keeps only each
  layer's input and recomputes the layer in the backward pass: less held, more time (:func:`checkpointing`).

On a GPU the same questions have other answers (memory-bound kernels, a paged optimizer, a CUDA allocator):
notebook 07 says which numbers carry over and which do not.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import statistics
import time

from torch.profiler import ProfilerActivity, profile

from .core.training import model_loss, saved_tensor_bytes

BNB_PREFIX = "bitsandbytes::"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@functools.cache
def _libc():
    """The C library, looked up once (``find_library`` runs ``ldconfig``: not between two readings)."""
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def allocated_bytes() -> int:
    """Bytes the C allocator has handed out and not taken back: glibc's ``mallinfo2()``, ``uordblks`` (from its
    heaps) + ``hblkhd`` (large blocks it maps on their own, as most tensors are).

    Raises:
        RuntimeError: not glibc (macOS, Windows, musl): the message says what to read instead.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        raise RuntimeError("allocated_bytes reads glibc's mallinfo2 (Linux with glibc >= 2.33); this C library has "
                           "none. Notebook 07 prints the committed measurement instead.")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def held_for_backward(model, batch: dict) -> dict[str, int]:
    """Bytes held from the end of the forward pass until the backward pass, counted twice: ``saved`` (the tensors
    autograd saves, :class:`saved_tensor_bytes`) and ``allocator`` (``allocated_bytes`` after the forward minus
    before it: everything the forward pass left alive, the loss's graph included). A warm-up step runs first, so
    that nothing allocated once (a workspace, a lazily built buffer) is counted."""
    model.train()
    model_loss(model, batch).backward()
    model.zero_grad(set_to_none=True)
    before = allocated_bytes()
    with saved_tensor_bytes() as saved:
        loss = model_loss(model, batch)
    after = allocated_bytes()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return {"saved": saved.total, "allocator": after - before}


def step_seconds(model, batch: dict, optimizer=None, repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of one forward and backward pass (and ``optimizer.step()`` if given: a training step) over
    ``repeats`` timed passes, after ``warmup`` untimed ones (the first passes of a model pay for memory the
    allocator maps for the first time, and AdamW makes its state on its first step)."""
    model.train()
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        model_loss(model, batch).backward()
        if optimizer is not None:
            optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return statistics.median(times)


def op_share(model, batch: dict, prefix: str = BNB_PREFIX, top: int = 12, warmup: int = 2) -> dict:
    """One profiled forward and backward pass (after ``warmup`` passes): the self CPU time of every operator
    (self times add up to the pass without counting a nested operator twice), and the share of those whose name
    starts with ``prefix`` (bitsandbytes' by default).

    Returns:
        ``{"total_ms", "ms", "share", "ops": {name: ms}}``: ``ms`` and ``share`` for the ``prefix`` operators
        together; ``ops`` holds the ``top`` operators by self time and every ``prefix`` operator.
    """
    model.train()
    for _ in range(warmup):
        model_loss(model, batch).backward()
        model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model_loss(model, batch).backward()
    model.zero_grad(set_to_none=True)
    times = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    total = sum(times.values())
    mine = {k: v for k, v in times.items() if k.startswith(prefix)}
    ops = {k: times[k] for k in sorted(times, key=times.get, reverse=True)[:top]} | mine
    return {"total_ms": total, "ms": sum(mine.values()), "share": sum(mine.values()) / total, "ops": ops}


def checkpointing(build, batch: dict) -> dict[str, dict]:
    """The same model without and with gradient checkpointing: seconds per forward and backward pass, and the
    bytes held for backward (:func:`held_for_backward`). ``build(gradient_checkpointing)`` makes the model."""
    out = {}
    for on in (False, True):
        model = build(on)
        out["on" if on else "off"] = {"seconds": step_seconds(model, batch), **held_for_backward(model, batch)}
    return out
