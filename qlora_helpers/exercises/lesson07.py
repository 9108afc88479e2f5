"""Checkers for notebook 07's exercise (the claims measured), on the protocol of :mod:`qlora_helpers.exercises`.
The oracle is a measurement: the bytes of a freshly built QLoRA model's trainable tensors, their gradients and
AdamW's state after one step (:func:`qlora_helpers.method_compare.memory_components`)."""
from __future__ import annotations

import torch
from transformers import AutoConfig

from .. import lora, measured_memory, memory, method_compare
from ..core.recipe import KIT_LOOP
from ..core.training import build_optimizer
from . import attempted, call_without, expect, fresh_seed

TARGET_CHOICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COMPONENTS = ("trainable weights", "gradients", "optimizer state")
# What the exercise asks the learner to predict; calling one of these instead fails the check.
LIBRARY_PLAN = {"qlora_helpers.memory.estimate_memory": memory.estimate_memory,
                "qlora_helpers.method_compare.planner_components": method_compare.planner_components,
                "qlora_helpers.method_compare.memory_components": method_compare.memory_components,
                "qlora_helpers.method_compare.build_method_model": method_compare.build_method_model,
                "qlora_helpers.lora.llama_lora_param_count": lora.llama_lora_param_count,
                "qlora_helpers.lora.linear_param_counts": lora.linear_param_counts,
                "qlora_helpers.measured_memory.optimizer_bytes": measured_memory.optimizer_bytes}


def measured(profile, r: int, targets: tuple[str, ...]) -> dict[str, int]:
    """Trainable, gradient and AdamW-state bytes of the QLoRA model at rank ``r`` on ``targets``, measured: the
    model built as every kit QLoRA run is, a zero gradient on each trainable tensor, one AdamW step."""
    model = method_compare.build_method_model(profile, "qlora", KIT_LOOP.replace(r=r, target_modules=targets))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = build_optimizer("adamw_torch", params, lr=0.0)
    opt.step()
    got = method_compare.memory_components(model, opt, 0)
    return {k: got[k] for k in COMPONENTS}


def check_predicted_bytes(predict_fn, profile) -> bool | None:
    """The exercise (predict, then measure): ``predict_fn(config, r, targets) -> {"trainable weights",
    "gradients", "optimizer state"}`` in bytes, for QLoRA (fp32 adapters, torch's AdamW) on the course model
    (``config``: its transformers config) at rank ``r`` on the linear layers named in ``targets``. Checked
    against a measurement (:func:`measured`) for two configurations drawn anew at every check; written from
    the shapes (:data:`LIBRARY_PLAN` may not be called)."""
    if not attempted(predict_fn, "Exercise"):
        return None   # waiting: nothing to display below the hint
    config = AutoConfig.from_pretrained(profile.model_source)
    g = torch.Generator().manual_seed(fresh_seed())
    for _ in range(2):
        r = (2, 4, 8, 12, 32)[int(torch.randint(0, 5, (1,), generator=g))]
        pick = torch.randperm(len(TARGET_CHOICES), generator=g)[:int(torch.randint(1, 5, (1,), generator=g))]
        targets = tuple(TARGET_CHOICES[i] for i in sorted(pick.tolist()))
        got = call_without(predict_fn, LIBRARY_PLAN, "The exercise", config, r, targets)
        if not attempted(got, "Exercise"):
            return None   # waiting: nothing to display below the hint
        want = measured(profile, r, targets)
        for key in COMPONENTS:
            expect(key in got, f"return a dict with {', '.join(COMPONENTS)}; {key!r} is missing")
            expect(int(got[key]) == want[key], f"r={r} on {', '.join(targets)}: {key} {int(got[key]):,} bytes predicted, "
                                               f"measured {'more' if want[key] > got[key] else 'less'}")
    print("Exercise: correct on two random configurations, to the byte: adapters, gradients and AdamW's state "
          "(two fp32 moments and one step counter per tensor).")
    return True
