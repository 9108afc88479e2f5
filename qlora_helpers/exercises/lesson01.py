"""Checkers for notebook 01's exercises (LoRA from the equation), on the protocol of
:mod:`qlora_helpers.exercises`."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from peft.tuners.lora import layer as peft_lora
from transformers import LlamaConfig

from ..lora import LoRALinear, llama_lora_param_count, lora_scaling, merge_lora
from . import attempted, call_without, expect, fresh_seed


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


def _fresh_layer(g: torch.Generator, use_rslora: bool, bias: bool) -> LoRALinear:
    """A LoRA layer of random shape, rank and weights, drawn from ``g`` (never the global RNG: a
    checker must not change what the notebook's next cells draw), with a non-zero B."""
    d_in, d_out, r = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((8, 48), (8, 48), (1, 8)))
    alpha = float(torch.randint(1, 64, (1,), generator=g))
    layer = LoRALinear(nn.Linear(d_in, d_out, bias=bias), r=r, alpha=alpha, use_rslora=use_rslora)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))   # non-zero B too, or returning zeros would pass
    return layer


# What exercises 2 and 3 ask the learner to write; calling one of these instead fails the check.
LIBRARY_DELTA = {"LoRALinear.get_delta_weight": LoRALinear.get_delta_weight,
                 "qlora_helpers.lora.lora_scaling": lora_scaling,
                 "peft's lora Linear.get_delta_weight": peft_lora.Linear.get_delta_weight}
LIBRARY_MERGE = {**LIBRARY_DELTA, "LoRALinear.merge": LoRALinear.merge, "qlora_helpers.lora.merge_lora": merge_lora}


def check_exercise_2(delta_weight_fn) -> bool | None:
    """``delta_weight_fn(A, B, alpha, r, use_rslora) -> ΔW`` (out, in) must equal ``get_delta_weight`` on
    layers of random shape, rank, alpha and weights, drawn anew at every check, with both scalings;
    written by hand (:data:`LIBRARY_DELTA` may not be called)."""
    g = torch.Generator().manual_seed(fresh_seed())
    for use_rslora in (False, True, False, True):
        layer = _fresh_layer(g, use_rslora, bias=False)
        A, B = layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone()  # (r, in), (out, r)
        want = layer.get_delta_weight().detach()  # (out, in)
        got = call_without(delta_weight_fn, LIBRARY_DELTA, "Exercise 2", A, B, layer.lora_alpha, layer.r, use_rslora)
        if not attempted(got, "Exercise 2"):
            return None   # waiting: nothing to display below the hint
        got = torch.as_tensor(got)
        expect(tuple(got.shape) == tuple(want.shape), f"ΔW is (out, in) = {tuple(want.shape)} for A {tuple(A.shape)} "
                                                      f"and B {tuple(B.shape)}, got {tuple(got.shape)}")
        expect(torch.allclose(got, want, rtol=1e-4, atol=1e-5),
               f"wrong ΔW with r={layer.r}, alpha={layer.lora_alpha:g}, use_rslora={use_rslora}: check the order of the "
               f"product and which scaling each setting uses")
    print("Exercise 2: correct on 4 random layers, both scalings.")
    return True


def check_exercise_3(to_plain_linear_fn) -> bool | None:
    """``to_plain_linear_fn(layer: LoRALinear) -> nn.Linear`` holding W + ΔW (and the base bias), leaving
    ``layer`` unchanged, must compute what the LoRA layer computes; on random layers, drawn anew at every
    check, written by hand (:data:`LIBRARY_MERGE` may not be called)."""
    g = torch.Generator().manual_seed(fresh_seed())
    for use_rslora in (False, True):
        layer = _fresh_layer(g, use_rslora, bias=True)
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        x = torch.randn(5, layer.base_layer.in_features, generator=g)  # (5, in)
        plain = call_without(to_plain_linear_fn, LIBRARY_MERGE, "Exercise 3", layer)
        if not attempted(plain, "Exercise 3"):
            return None   # waiting: nothing to display below the hint
        expect(type(plain) is nn.Linear, f"return an nn.Linear, got {type(plain).__name__}")
        expect(all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items()),
               "the LoRA layer itself must not change: build a new nn.Linear")
        with torch.no_grad():
            expect(torch.allclose(plain(x), layer(x), rtol=1e-4, atol=1e-4),
                   f"outputs differ (r={layer.r}, use_rslora={use_rslora}): use W + ΔW, with ΔW's scaling, and keep the bias")
    print("Exercise 3: correct, one nn.Linear now does the work of W, A and B.")
    return True


def check_exercise_4(answer) -> bool | None:
    """With rsLoRA at r=64, which alpha gives the same scaling as plain LoRA at r=16, alpha=32?"""
    if not attempted(answer, "Exercise 4"):
        return None   # waiting: nothing to display below the hint
    want, got = lora_scaling(32, 16), lora_scaling(float(answer), 64, use_rslora=True)
    expect(math.isclose(got, want), f"alpha={answer} gives rsLoRA's scaling {got:g} at r=64; the recipe's plain LoRA "
                                    f"(r=16, alpha=32) has {want:g}")
    print(f"Exercise 4: correct, alpha={float(answer):g} gives scaling {want:g} "
          f"at r=64 with rsLoRA.")
    return True
