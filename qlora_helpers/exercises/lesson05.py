"""Checkers for notebook 05's exercises (merging), on the protocol of
:mod:`qlora_helpers.exercises`."""
from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora import bnb as peft_bnb

from .. import merge
from ..core.recipe import KIT_SFT
from ..lora import llama_lora_param_count
from . import attempted, call_without, expect, fresh_seed

# What exercise 1 asks the learner to write (the dequantization itself, M.dequantize_weight, is allowed);
# calling one of these instead fails the check.
LIBRARY_MERGE = {"qlora_helpers.merge.merged_weight": merge.merged_weight, "qlora_helpers.merge._lora_delta": merge._lora_delta,
                 "qlora_helpers.merge.merge_to_fp": merge.merge_to_fp,
                 "qlora_helpers.merge.merge_into_4bit": merge.merge_into_4bit,
                 "peft's LoraLayer.get_delta_weight (4-bit)": peft_bnb.Linear4bit.get_delta_weight,
                 "peft's Linear4bit.merge": peft_bnb.Linear4bit.merge}


def check_merged_layer(merged_weight_fn, model) -> bool | None:
    """``merged_weight_fn(lora_layer) -> (out, in) tensor``: W + ΔW of one PEFT LoRA layer on a 4-bit base, by
    hand (dequantize with ``M.dequantize_weight``, then add ``scaling * B @ A``). Checked on 12 of the
    model's LoRA layers chosen anew at every check, against :func:`qlora_helpers.merge.merged_weight`;
    :data:`LIBRARY_MERGE` may not be called."""
    if not attempted(merged_weight_fn, "Exercise 1"):
        return None   # waiting: nothing to display below the hint
    layers = [m for m in model.get_base_model().modules() if isinstance(m, LoraLayer)]
    g = torch.Generator().manual_seed(fresh_seed())
    for i in torch.randperm(len(layers), generator=g)[:12].tolist():
        layer = layers[i]
        want = merge.merged_weight(layer)
        got = call_without(merged_weight_fn, LIBRARY_MERGE, "Exercise 1", layer)
        if not attempted(got, "Exercise 1"):
            return None   # waiting: nothing to display below the hint
        got = torch.as_tensor(got)
        expect(tuple(got.shape) == tuple(want.shape), f"want shape (out, in) = {tuple(want.shape)}, got {tuple(got.shape)}")
        expect(torch.allclose(got.float(), want, atol=1e-5),
               "wrong merged weight: dequantize the 4-bit base (read it safely, see dequantize_weight), "
               "then add scaling * lora_B @ lora_A")
    print(f"Exercise 1: correct on 12 of the {len(layers)} LoRA layers, drawn at random.")
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
