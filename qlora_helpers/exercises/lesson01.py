"""Checkers for notebook 01's exercises (LoRA from the equation), on the protocol of
:mod:`qlora_helpers.exercises`."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from transformers import LlamaConfig

from ..lora import LoRALinear, llama_lora_param_count, lora_scaling
from . import attempted, expect


def check_exercise_1(answer) -> bool | None:
    """Llama-2-13B (hidden 5120, intermediate 13824, 40 layers, 40 heads), r=8 on q_proj and
    v_proj only (the LoRA paper's choice for GPT-3): how many trainable parameters?"""
    if not attempted(answer, "Exercise 1"):
        return None   # waiting: nothing to display below the hint
    cfg = LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=40, vocab_size=32000)
    expected = llama_lora_param_count(cfg, 8, ["q_proj", "v_proj"])
    expect(int(answer) == expected, f"got {answer!r}; per layer it is r*(in+out) for q_proj plus the same for v_proj, "
        f"times 40 layers")
    print(f"Exercise 1: correct, {expected:,} trainable parameters.")
    return True


def check_exercise_2(delta_weight_fn) -> bool | None:
    """``delta_weight_fn(A, B, alpha, r, use_rslora) -> ΔW`` must equal ``get_delta_weight``."""
    torch.manual_seed(0)
    for use_rslora in (False, True):
        layer = LoRALinear(nn.Linear(24, 40, bias=False), r=4, alpha=16, use_rslora=use_rslora)
        nn.init.normal_(layer.lora_B.weight)  # non-zero B, or returning zeros would pass
        A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()  # (4, 24), (40, 4)
        got = delta_weight_fn(A, B, 16, 4, use_rslora)
        if not attempted(got, "Exercise 2"):
            return None   # waiting: nothing to display below the hint
        want = layer.get_delta_weight().detach()  # (40, 24)
        expect(tuple(got.shape) == tuple(want.shape), f"ΔW is (out, in) = {tuple(want.shape)}, got {tuple(got.shape)}")
        expect(torch.allclose(got, want, atol=1e-6), f"wrong ΔW with use_rslora={use_rslora}: check the order B @ A and the scaling")
    print("Exercise 2: correct, ΔW = (alpha/r, or alpha/sqrt(r) with rsLoRA) * B @ A.")
    return True


def check_exercise_3(to_plain_linear_fn) -> bool | None:
    """``to_plain_linear_fn(layer: LoRALinear) -> nn.Linear`` holding W + ΔW (and the base bias),
    leaving ``layer`` unchanged, must compute what the LoRA layer computes."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(24, 40, bias=True), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight)  # non-zero B
    w_before, x = layer.base_layer.weight.detach().clone(), torch.randn(5, 24)  # x: (5, in)
    plain = to_plain_linear_fn(layer)
    if not attempted(plain, "Exercise 3"):
        return None   # waiting: nothing to display below the hint
    expect(type(plain) is nn.Linear, f"return an nn.Linear, got {type(plain).__name__}")
    expect(torch.equal(layer.base_layer.weight, w_before), "the LoRA layer's own W must not change")
    expect(torch.allclose(plain(x), layer(x), atol=1e-5), "outputs differ: use W + ΔW and keep the bias")
    print("Exercise 3: correct, one nn.Linear now does the work of W, A and B.")
    return True


def check_exercise_4(answer) -> bool | None:
    """With rsLoRA at r=64, which alpha gives the same scaling as plain LoRA at r=16, alpha=32?"""
    if not attempted(answer, "Exercise 4"):
        return None   # waiting: nothing to display below the hint
    want, got = lora_scaling(32, 16), lora_scaling(float(answer), 64, use_rslora=True)
    expect(math.isclose(got, want), f"alpha={answer} gives scaling {got:g}, want {want:g}: solve alpha / sqrt(64) = 32 / 16")
    print(f"Exercise 4: correct, alpha={float(answer):g} gives scaling {want:g} "
          f"at r=64 with rsLoRA.")
    return True
