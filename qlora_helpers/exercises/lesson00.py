"""Checkers for notebook 00's exercise (a model in 4 bits), on the protocol of
:mod:`qlora_helpers.exercises`. The oracle is what bitsandbytes stores: every tensor of each
layer's quantization state, as ``QuantState.as_dict`` lists them."""
from __future__ import annotations

import bitsandbytes as bnb
import torch

from ..core.runtime import load_model
from . import attempted, call_without, expect, fresh_seed


def linear4bit_bytes(model) -> int:
    """Bytes of every ``Linear4bit`` weight: packed codes plus every tensor of its quantization state."""
    total = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            state = m.weight.quant_state.as_dict(packed=False).values()
            total += m.weight.numel() * m.weight.element_size()
            total += sum(t.numel() * t.element_size() for t in state if isinstance(t, torch.Tensor))
    return total


# What the exercise asks the learner to predict; calling one of these instead fails the check.
LIBRARY_BYTES = {"qlora_helpers.exercises.lesson00.linear4bit_bytes": linear4bit_bytes,
                 "qlora_helpers.core.runtime.load_model": load_model,
                 "bitsandbytes.functional.quantize_4bit": bnb.functional.quantize_4bit}


def check_no_dq_bytes(predict_fn, profile) -> bool | None:
    """The exercise (predict, then measure): ``predict_fn(shapes) -> int``, the bytes bitsandbytes stores for
    4-bit NF4 layers of ``shapes`` ((out, in) each) *without* double quantization: packed codes, one fp32
    absmax per 64 weights, the 16-entry fp32 NF4 table per layer. Checked on random layers, drawn anew at
    every check and quantized by bitsandbytes, then on the course model's own layers loaded without double
    quantization; written from the formula (:data:`LIBRARY_BYTES` may not be called)."""
    if not attempted(predict_fn, "Exercise"):
        return None   # waiting: nothing to display below the hint
    g = torch.Generator().manual_seed(fresh_seed())
    shapes = [tuple(int(x) for x in torch.randint(8, 700, (2,), generator=g)) for _ in range(4)]
    want = 0
    for out_f, in_f in shapes:
        packed, state = bnb.functional.quantize_4bit(torch.randn(out_f, in_f, generator=g), quant_type="nf4",
                                                     compress_statistics=False)
        want += packed.numel() * packed.element_size() + sum(
            t.numel() * t.element_size() for t in state.as_dict(packed=False).values() if isinstance(t, torch.Tensor))
    got = call_without(predict_fn, LIBRARY_BYTES, "The exercise", list(shapes))
    if not attempted(got, "Exercise"):
        return None   # waiting: nothing to display below the hint
    expect(int(got) == want, f"layers {shapes}: got {int(got):,} bytes, bitsandbytes stores {'more' if want > got else 'fewer'}: "
                             f"count the packed codes, the scales (a partial last block has one too) and each layer's table")
    model = load_model(profile, double_quant=False)
    layers = [(m.out_features, m.in_features) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    want = linear4bit_bytes(model)
    got = call_without(predict_fn, LIBRARY_BYTES, "The exercise", layers)
    expect(int(got) == want, f"the course model's {len(layers)} layers: got {int(got):,} bytes, bitsandbytes stores "
                             f"{'more' if want > got else 'fewer'}")
    print(f"Exercise: correct on 4 random layers and on the model's {len(layers)}: {want:,} bytes without double "
          f"quantization; each 64-weight block pays 32 bits for its scale instead of about 8.")
    return True
