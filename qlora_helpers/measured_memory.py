"""What is really in memory: the bytes a loaded model, an optimizer and autograd's saved
activations hold, measured on the objects themselves (CPU or GPU).

Notebook ``03_double_quant_memory`` sets these beside :mod:`qlora_helpers.memory`'s estimate:
the prediction is checked against the measurement, to the byte where the two can agree
(weights, quantization constants, optimizer states) and within stated bounds where the estimate is
a model of the GPU (activations).
"""
from __future__ import annotations

import torch

from .double_quant import measured_bytes
from .training import saved_tensor_bytes  # noqa: F401  (the activations autograd keeps; notebook 03)


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not hasattr(t, "data_ptr") or t.data_ptr() in seen:
            continue                                                   # shared tensors count once
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def loaded_model_bytes(model) -> dict[str, int]:
    """Bytes a loaded (4-bit) model holds: parameters (packed NF4 as uint8), quantization
    constants (every Linear4bit's quant state), buffers (e.g. rotary frequencies)."""
    constants = 0
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            parts = measured_bytes(module.weight.data, state)
            constants += sum(parts.values()) - parts["packed"]
    return {"weights": _tensor_bytes(model.parameters()), "quant constants": constants,
            "buffers": _tensor_bytes(model.buffers())}


def optimizer_bytes(optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (shared tensors such as bitsandbytes' code
    maps counted once; Python ints such as bitsandbytes' step counter are not tensors: 0 bytes)."""
    return _tensor_bytes(v for state in optimizer.state.values() for v in state.values()
                         if isinstance(v, torch.Tensor))
