"""Checkers for notebook 05's exercises (merging), on the protocol of
:mod:`qlora_helpers.exercises`."""
from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer

from ..core.recipe import KIT_SFT
from ..lora import llama_lora_param_count
from ..merge import merged_weight
from . import attempted, expect


def check_merged_layer(merged_weight_fn, model) -> bool | None:
    """``merged_weight_fn(lora_layer) -> (out, in) tensor``: W + ΔW of one PEFT LoRA layer on a
    4-bit base, by hand (dequantize, then add ``scaling * B @ A``). Checked on every layer."""
    layers = [m for m in model.get_base_model().modules() if isinstance(m, LoraLayer)]
    if not attempted(merged_weight_fn(layers[0]), "Exercise 1"):
        return None   # waiting: nothing to display below the hint
    for layer in layers:
        want = merged_weight(layer)
        got = merged_weight_fn(layer)
        expect(tuple(got.shape) == tuple(want.shape), f"want shape (out, in) = {tuple(want.shape)}, got {tuple(got.shape)}")
        expect(torch.allclose(got.float(), want, atol=1e-5), "wrong merged weight: dequantize the 4-bit base (read it safely, see dequantize_weight), "
            "then add scaling * lora_B @ lora_A")
    print(f"Exercise 1: correct on all {len(layers)} LoRA layers.")
    return True


def check_adapter_bytes(answer, config, r: int = KIT_SFT.r) -> bool | None:
    """Bytes of the fp32 LoRA tensors of an all-linear rank-``r`` adapter on ``config``'s model."""
    if not attempted(answer, "Exercise 2"):
        return None   # waiting: nothing to display below the hint
    want = 4 * llama_lora_param_count(config, r)  # fp32: 4 bytes per A or B entry
    expect(int(answer) == want, f"{answer} bytes: count r * (in + out) per targeted layer (7 per "
                                 f"decoder layer), times the layers, times 4 bytes (fp32)")
    print(f"Exercise 2: correct, {want:,} bytes of LoRA weights (the file adds a small JSON header).")
    return True
