"""What is really in memory: the bytes a loaded model, an optimizer and autograd's saved
activations hold, measured on the objects themselves (CPU or GPU).

Notebook ``03_double_quant_memory`` sets these beside :mod:`qlora_helpers.memory`'s estimate:
the prediction is checked against the measurement, to the byte where the two can agree
(weights, quantization constants, optimizer states) and within stated bounds where the estimate is
a model of the GPU (activations).
"""
from __future__ import annotations

import torch

from .core.qlora_model import prepare_qlora_model
from .core.training import OPTIMIZERS, build_optimizer
from .double_quant import measured_bytes


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
    constants (every Linear4bit's quant state, once: a PEFT-wrapped layer shows its base's weight too),
    buffers (e.g. rotary frequencies)."""
    constants, seen = 0, set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and id(weight) not in seen:  # PEFT's LoRA wrapper shows its base layer's weight too
            seen.add(id(weight))
            parts = measured_bytes(weight.data, state)
            constants += sum(parts.values()) - parts["packed"]
    return {"weights": _tensor_bytes(model.parameters()), "quant constants": constants,
            "buffers": _tensor_bytes(model.buffers())}


def optimizer_bytes(optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (shared tensors such as bitsandbytes' code
    maps counted once; Python ints such as bitsandbytes' step counter are not tensors: 0 bytes)."""
    return _tensor_bytes(v for state in optimizer.state.values() for v in state.values()
                         if isinstance(v, torch.Tensor))


def gpu_training_peak(model, recipe, compute_dtype: torch.dtype, seq_len: int = 512, batch_size: int = 1,
                      steps: int = 3, optimizer: str = "paged_adamw_8bit") -> int:
    """Peak bytes torch allocated on the GPU over ``steps`` QLoRA training steps of ``model``.

    ``model`` is a loaded 4-bit base (``runtime.load_model`` of a gpu profile). It gets the recipe's
    LoRA on every linear layer through :func:`qlora_helpers.core.qlora_model.prepare_qlora_model` (notebook
    04's own call: fp32 norms and embeddings, gradient checkpointing as the recipe says), then forward, backward and an
    optimizer step on random tokens of ``batch_size`` x ``seq_len``, under autocast to
    ``compute_dtype`` (the profile's: fp16 on a T4, bf16 on Ampere and newer).
    ``torch.cuda.max_memory_allocated`` sees every tensor but neither the CUDA context nor the
    allocator's reserved-but-free blocks: compare it with ``memory.estimate_memory(...,
    cuda_context_gib=0, fragmentation=0)``.

    Raises:
        RuntimeError: the model is not on a CUDA GPU (on the CPU, notebook 03 measures the same
            components one by one instead: :func:`loaded_model_bytes`, :func:`optimizer_bytes`).
        ValueError: an optimizer not in :data:`qlora_helpers.core.training.OPTIMIZERS`.
    """
    device = next(model.parameters()).device
    if compute_dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"compute_dtype={compute_dtype}: a GPU run computes in torch.float16 (T4) or "
                         f"torch.bfloat16 (Ampere and newer); pass profile.compute_dtype")
    if device.type != "cuda":
        raise RuntimeError(f"gpu_training_peak measures CUDA memory, but the model is on {device}. Load it "
                           f"in the gpu profile (QLORA_KIT_PROFILE=gpu on a CUDA GPU, e.g. Colab's T4).")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    model = prepare_qlora_model(model, recipe)
    opt = build_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad], lr=recipe.lr)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), device=device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):   # not train_loop: the steps must run under CUDA autocast, and only the peak is kept
        with torch.autocast("cuda", dtype=compute_dtype):
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()
