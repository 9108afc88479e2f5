"""bitsandbytes' CPU repack of 4-bit weights, and the one defence every 4-bit model gets.

What it teaches: on a CPU with AVX512-BF16 (``grep avx512_bf16 /proc/cpuinfo``), bitsandbytes
0.50 rewrites a ``Linear4bit`` weight into a kernel layout the first time the layer runs in eval
mode on an input that needs no gradient (``Linear4bit.forward`` calls
``bitsandbytes.functional._convert_weight_packed_for_cpu``): the codes are re-ordered in blocks
of 32 rows, the double-quantized absmax is expanded, transposed and rounded to bf16, and
``quant_state.packing_format_for_cpu`` becomes True. From then on, anything that reads
``weight.data`` as NF4 bytes (``dequantize_4bit``, PEFT's 4-bit merge, a byte comparison, even a
later *training* step's backward) works on a different layout: measured on such a CPU with
the kit's model, after one eval forward of four tokens ``dequantize_4bit`` on
``layers.0.mlp.up_proj`` was off by 0.295, more than the layer's largest weight (0.194)
(``TROUBLESHOOTING.md``, "The CPU repack"). On CPUs without the feature nothing happens, so the
same notebook gives different answers on different machines.

The defence, applied by :func:`qlora_helpers.core.runtime.load_model` to every 4-bit model it loads
(:func:`defend`): convert any repacked layer back with bitsandbytes' own inverse
(``_convert_weight_packed_for_cpu_inverse``, what ``Linear4bit._save_to_state_dict`` calls), then
set ``support_avx512bf16_for_cpu = False`` on every layer so that evaluating, generating or
saving can never repack it again. Cost: such CPUs run the generic 4-bit matmul (dequantize, then
an fp32 ``F.linear``) instead of the bf16 kernel; the kit computes in fp32 on the CPU anyway.

:func:`simulate_cpu_repack` calls bitsandbytes' repack by hand, and :func:`pretend_avx512bf16`
makes every layer believe the CPU has the feature, so the defence is tested on any CPU.

Production code it is checked against: bitsandbytes 0.50.2 ``nn.Linear4bit.forward``,
``functional._convert_weight_packed_for_cpu`` and its ``_inverse``.
"""
from __future__ import annotations

import copy

import bitsandbytes as bnb
import torch.nn as nn
from bitsandbytes.functional import _convert_weight_packed_for_cpu, _convert_weight_packed_for_cpu_inverse


def is_4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes ``Linear4bit`` (NF4 or FP4)."""
    return isinstance(module, bnb.nn.Linear4bit)


def linear4bit_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: bitsandbytes.nn.Linear4bit}`` for every 4-bit layer of ``model``."""
    return {n: m for n, m in model.named_modules() if is_4bit(m)}


def is_repacked(module: nn.Module) -> bool:
    """True if bitsandbytes has rewritten this ``Linear4bit``'s weight into its CPU kernel layout."""
    return bool(getattr(module.weight.quant_state, "packing_format_for_cpu", False))


def standard_layout(module: nn.Module):
    """``(packed uint8, QuantState)`` of a ``Linear4bit`` in bitsandbytes' standard layout,
    without touching the module: a repacked weight is converted back on a copy with
    bitsandbytes' ``_convert_weight_packed_for_cpu_inverse`` (as ``state_dict()`` does)."""
    w = module.weight
    if not is_repacked(module):
        return w.data, w.quant_state
    return _convert_weight_packed_for_cpu_inverse(w.data.clone(), copy.deepcopy(w.quant_state))


def restore_standard_layout(model: nn.Module) -> int:
    """Convert every repacked ``Linear4bit`` back, in place (what ``model.state_dict()`` does as a
    side effect). Returns the number of layers converted.

    Note (bf16 absmax): the repack rounded the absmax to bf16 and the inverse re-quantizes it to
    8 bits, so a layer that *was* repacked comes back within ~1e-3 relative, not bit for bit."""
    mods = [m for m in linear4bit_modules(model).values() if is_repacked(m)]
    for m in mods:
        m.weight.data, m.weight.quant_state = standard_layout(m)
        m.quant_state = m.weight.quant_state  # the module keeps its own reference too
    return len(mods)


def keep_standard_layout(model: nn.Module) -> nn.Module:
    """Switch the CPU repack off (``support_avx512bf16_for_cpu = False``) on every 4-bit layer.
    In place; returns ``model``."""
    for m in linear4bit_modules(model).values():
        m.support_avx512bf16_for_cpu = False
    return model


def defend(model: nn.Module) -> nn.Module:
    """The kit's one defence, whatever ran before: restore any repacked layer, then forbid the
    repack. In place; returns ``model``. :func:`qlora_helpers.core.runtime.load_model` calls it."""
    restore_standard_layout(model)
    return keep_standard_layout(model)


def check_standard_layout(model: nn.Module) -> None:
    """Raise ``RuntimeError`` naming the first 4-bit layer that is repacked or may still be
    repacked by an evaluation (a model that did not come through :func:`defend`)."""
    for name, m in linear4bit_modules(model).items():
        if is_repacked(m) or m.support_avx512bf16_for_cpu:
            state = "is repacked" if is_repacked(m) else "may be repacked by its next eval forward"
            raise RuntimeError(
                f"4-bit layer {name} {state} (bitsandbytes' AVX512-BF16 CPU layout), so its bytes "
                f"are not NF4 as stored. Load models with qlora_helpers.core.runtime.load_model, or "
                f"call qlora_helpers.core.cpu_layout.defend(model) first.")


def simulate_cpu_repack(model: nn.Module) -> int:
    """Do to every ``Linear4bit`` what its first eval forward does on an AVX512-BF16 CPU: call
    bitsandbytes' own ``_convert_weight_packed_for_cpu`` (needs out_features % 32 == 0).
    In place. Returns the number of layers repacked. (The forward itself then needs that CPU.)

    Raises:
        ValueError: a layer is not on the CPU. The repack is a CPU kernel's layout; a CUDA model never
            has it, and bitsandbytes' function would write a layout no CUDA kernel reads. Load a CPU copy
            (``get_profile("offline")``), as notebook 05 does on a GPU.
    """
    mods = [m for m in linear4bit_modules(model).values() if not is_repacked(m)]
    elsewhere = sorted({m.weight.device.type for m in mods} - {"cpu"})
    if elsewhere:
        raise ValueError(f"simulate_cpu_repack: the model's 4-bit layers are on {', '.join(elsewhere)}, but the repack "
                         f"is a CPU layout that only CPU kernels write. Load a CPU copy for this lesson: "
                         f"load_model(get_profile('offline'))")
    for m in mods:
        m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu(
            m.weight.data, m.weight.quant_state)
        m.quant_state = m.weight.quant_state
    return len(mods)


def pretend_avx512bf16(model: nn.Module) -> nn.Module:
    """Make every 4-bit layer behave as on an AVX512-BF16 CPU (``support_avx512bf16_for_cpu =
    True``), so a test can check that a defence holds on any CPU. In place; returns ``model``."""
    for m in linear4bit_modules(model).values():
        m.support_avx512bf16_for_cpu = True
    return model
