"""Merging a LoRA adapter trained on a 4-bit base, and what each way of merging does to the numbers.

What it teaches (notebook ``05_merge_and_export``):

1. Three ways to serve a QLoRA adapter: (a) keep it beside the 4-bit base (what was trained);
   (b) merge ``W + ΔW`` into a 16/32-bit copy of the base, either the *dequantized* 4-bit weights
   (:func:`merge_to_fp`) or the original full-precision weights (:func:`merge_into_base`);
   (c) merge into the 4-bit weights (PEFT's ``merge_and_unload`` on ``Linear4bit``), which
   re-quantizes ``dequant(Q(W)) + ΔW`` to NF4 (:func:`merge_into_4bit`).
   :func:`compare_outputs` measures each against (a): max |logit diff|, KL, greedy agreement.
2. Why (b) with the original weights is not (a): the adapter was trained on top of
   ``dequant(Q(W))``, quantization error included (:func:`quantization_vs_update`).
3. Export: a merged model is a plain transformers checkpoint (:func:`save_merged`).
4. A trap (``TROUBLESHOOTING.md``, "The CPU repack"; the mechanism and the kit's defence are
   :mod:`qlora_helpers.core.cpu_layout`). On a CPU with AVX512-BF16, bitsandbytes rewrites a 4-bit
   weight into a kernel layout at its first eval-mode forward, and ``dequantize_4bit(weight.data,
   quant_state)`` then reads the codes in the wrong order, so a merge after an evaluation is
   silently wrong. Every model ``load_model`` returns has the repack switched off; on top of that,
   :func:`dequantize_weight` never trusts ``weight.data``: a repacked weight is converted back on
   a *copy* with bitsandbytes' own inverse, and :func:`merge_into_4bit` restores the layout in
   place before PEFT's merge, so a model that did not come through ``load_model`` merges right too.
   Note (bf16 absmax): the repack rounds the absmax to bf16 and the inverse re-quantizes it to
   8 bits; that precision is gone, so a merge after a real repack equals a fresh merge only to
   ~1e-3 relative (``tests/test_merge.py`` states the bound), not bit for bit.
5. Adapters that do not fit the base fail early and by name (:mod:`qlora_helpers.adapters`:
   :func:`check_adapter_matches`, :func:`load_adapter`, :func:`save_adapter`).

Papers: QLoRA, Dettmers et al. 2023, arXiv:2305.14314; LoRA, Hu et al. 2021, arXiv:2106.09685.

Production code it is checked against (peft 0.21.2, bitsandbytes 0.50.2): ``PeftModel.
merge_and_unload`` (``peft.tuners.lora.bnb.Linear4bit.merge``), ``bitsandbytes.functional.
dequantize_4bit``; and, independently of bitsandbytes' layout, the kit's own NF4 +
double quantization (:mod:`qlora_helpers.nf4`, :mod:`qlora_helpers.double_quant`).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn
from bitsandbytes.functional import dequantize_4bit
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from . import double_quant, nf4
from .adapters import load_adapter
from .core.cpu_layout import is_4bit, keep_standard_layout, linear4bit_modules, restore_standard_layout, standard_layout


# ---------------------------------------------------------------------------------------------
# 1. Reading a 4-bit weight safely (the CPU repack: qlora_helpers.core.cpu_layout)
# ---------------------------------------------------------------------------------------------
def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """``dequant(Q(W))`` of a ``Linear4bit``, fp32 (out, in), whatever layout it is in now."""
    packed, state = standard_layout(module)
    return dequantize_4bit(packed, state).float()  # (out, in)


def kit_dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The same as :func:`dequantize_weight`, through the kit's own NF4 and double quantization
    (:mod:`qlora_helpers.nf4`, :mod:`qlora_helpers.double_quant`): an independent check. Computed in
    fp32, then rounded to the quantization state's dtype as bitsandbytes returns it (fp16 on a T4:
    without the rounding the two differ by up to fp16's rounding, 4.9e-4 on SmolLM2, found by
    ``course --t4``), then fp32 again like :func:`dequantize_weight`; the double-quantized block
    constants in the dtype bitsandbytes uses for them (see the comment)."""
    packed, s = standard_layout(module)
    if s.quant_type != "nf4":
        raise ValueError(f"kit_dequantize_weight handles NF4 only, got {s.quant_type!r}")
    if s.nested:
        # bitsandbytes computes the constants in state2's dtype: fp32 as quantized, but the layer's
        # dtype (fp16 on a T4) once a CPU repack has been converted back, so rounded to it here too
        absmax = (double_quant.dequantize_blockwise_8bit(s.absmax, s.state2.absmax, s.state2.code,
                                                         s.state2.blocksize).to(s.state2.dtype)
                  + s.offset).float()  # (n_blocks,)
    else:
        absmax = s.absmax.float()
    return nf4.dequantize_nf4(packed.view(torch.uint8), absmax, tuple(s.shape), s.blocksize).to(s.dtype).float()


# ---------------------------------------------------------------------------------------------
# 2. Three ways to merge
# ---------------------------------------------------------------------------------------------
def _lora_delta(layer) -> torch.Tensor:
    """ΔW = scaling * B @ A of a PEFT LoRA layer's active adapter, fp32 (out, in)."""
    if layer.merged:
        raise ValueError("the adapter is already merged into this layer; unmerge it first "
                         "(model.unmerge_adapter()) or merge from a freshly loaded model")
    return layer.get_delta_weight(layer.active_adapters[0]).float()  # (out, in)


def merged_weight(module: nn.Module) -> torch.Tensor | None:
    """W + ΔW (a LoRA layer), dequant(W) (a 4-bit layer), or None (anything else)."""
    if isinstance(module, LoraLayer):
        inner = module.get_base_layer()
        return _base_weight(inner) + _lora_delta(module)  # (out, in)
    return _base_weight(module) if is_4bit(module) else None


def _base_weight(module: nn.Module) -> torch.Tensor:
    if is_4bit(module):
        return dequantize_weight(module)  # safe whatever the layout (cpu_layout)
    return module.weight.detach().float()


def merge_to_fp(model, dtype: torch.dtype = torch.float32):
    """Merge a LoRA adapter on a 4-bit base into the *dequantized* base: (b).

    Every weight is written into a fresh plain transformers model: ``dequant(Q(W)) + ΔW`` for
    LoRA layers, ``dequant(Q(W))`` for other 4-bit layers, the rest copied. The input is not
    changed, and the result does not depend on bitsandbytes' CPU layout (:mod:`qlora_helpers.core.cpu_layout`).

    Args:
        model: a ``PeftModel`` (one active LoRA adapter, not merged) on a 4-bit base.
        dtype: the merged model's dtype (fp32 here; bf16/fp16 for a GPU export).
    Returns:
        A ``transformers`` model without PEFT or bitsandbytes layers, in eval mode.
    """
    base = model.get_base_model()
    config = copy.deepcopy(base.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {}
    for key, ref in plain.state_dict().items():
        mod_name, _, leaf = key.rpartition(".")
        module = base.get_submodule(mod_name)
        merged = merged_weight(module) if leaf == "weight" else None
        if merged is not None and not torch.isfinite(merged).all():   # as PEFT's safe_merge
            raise ValueError(f"merge refused: {mod_name} would get {int((~torch.isfinite(merged)).sum())} non-finite "
                             f"weight(s); the adapter is broken (a NaN/inf from training?): do not merge it")
        state[key] = merged if merged is not None else _plain_param(module, leaf)
    plain.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return plain.eval()


def _plain_param(module: nn.Module, leaf: str) -> torch.Tensor:
    if isinstance(module, LoraLayer):
        module = module.get_base_layer()
    return getattr(module, leaf).detach().float()


def merge_into_base(fp_model, path: str | Path):
    """Merge the adapter in ``path`` into full-precision base weights, PEFT's way: (b) original.

    Returns:
        ``PeftModel.from_pretrained(fp_model, path).merge_and_unload()``: a plain model.
    """
    return load_adapter(fp_model, path).merge_and_unload().eval()


def merge_into_4bit(model):
    """PEFT's ``merge_and_unload`` on a 4-bit base: (c).

    Note: merging into NF4 re-quantizes: each layer becomes ``Q(dequant(Q(W)) + ΔW)``, so the
    update is rounded to the NF4 grid (``TROUBLESHOOTING.md``, "Merging into 4-bit"). PEFT reads ``weight.data`` with
    ``dequantize_4bit``, which is wrong after a CPU repack (:mod:`qlora_helpers.core.cpu_layout`): the layout is restored first.
    In place on ``model``; returns the unloaded 4-bit transformers model.
    """
    restore_standard_layout(model)
    merged = model.merge_and_unload()
    return keep_standard_layout(merged).eval()


# ---------------------------------------------------------------------------------------------
# 3. Measuring the difference
# ---------------------------------------------------------------------------------------------
def conversation_texts(tok, rows) -> list[str]:
    """Each row's full conversation (prompt and answer) in the chat template: the logits to compare."""
    return [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]


def logit_gap(ref: torch.Tensor, other: torch.Tensor, mask: torch.Tensor, rows: int = 4) -> dict[str, float]:
    """Max |logit difference| and mean KL(ref || other) per token over the real (unmasked) positions.

    Computed ``rows`` sequences at a time, in fp32, on ``ref``'s device: 100 rows of 62 positions
    over a 49,152-token vocabulary are 1.2 GB per logits tensor, and the whole-batch version
    (select, two log-softmaxes, the KL terms) made several such copies at once.

    Args:
        ref, other: logits (batch, seq, vocab). mask: bool (batch, seq), True on real tokens.
    Returns:
        ``{"max_abs_logit_diff", "kl"}`` (KL in nats per token).

    >>> ref = torch.tensor([[[0.0, 0.0], [5.0, 0.0]]]); mask = torch.tensor([[True, False]])
    >>> logit_gap(ref, ref + torch.tensor([1.0, 0.0]), mask)["max_abs_logit_diff"]
    1.0
    """
    if ref.shape != other.shape or ref.shape[:2] != mask.shape:
        raise ValueError(f"logits {tuple(ref.shape)} and {tuple(other.shape)} with mask {tuple(mask.shape)}: "
                         "compare logits of the same texts, tokenized the same way")
    worst, kl_sum, n = 0.0, 0.0, 0
    for i in range(0, ref.shape[0], rows):
        m = mask[i:i + rows].to(ref.device)
        a = ref[i:i + rows][m].float()                    # (tokens, vocab)
        b = other[i:i + rows].to(ref.device)[m].float()
        la, lb = a.log_softmax(-1), b.log_softmax(-1)
        kl_sum += (la.exp() * (la - lb)).sum().item()     # KL(ref || other), summed over tokens
        n += a.shape[0]
        worst = max(worst, (a - b).abs().max().item())
    # KL >= 0; float rounding can give -1e-9 for equal models
    return {"max_abs_logit_diff": worst, "kl": max(kl_sum / max(n, 1), 0.0)}


def agreement(answers: list[str], reference: list[str]) -> float:
    """Share of greedy answers identical to the reference answers.

    >>> agreement(["17/03/2024", "01/01/2000"], ["17/03/2024", "02/01/2000"])
    0.5
    """
    if len(answers) != len(reference) or not answers:
        raise ValueError(f"need two equally long, non-empty answer lists, got {len(answers)} and {len(reference)}")
    return sum(a == b for a, b in zip(answers, reference)) / len(answers)


def quantization_vs_update(model, fp_model) -> list[dict]:
    """Per LoRA layer: size of the quantization error ``W - dequant(Q(W))`` and of the update ΔW.

    Args:
        model: the ``PeftModel`` on the 4-bit base. fp_model: the same base in full precision.
    Returns:
        One dict per layer: ``name``, ``quant_err`` and ``delta`` (Frobenius norms), and ``max_quant_err``, ``max_delta``.
    """
    rows = []
    for name, m in model.get_base_model().named_modules():
        if isinstance(m, LoraLayer):
            w = fp_model.get_submodule(name).weight.detach().float()  # (out, in)
            err, delta = w - dequantize_weight(m.get_base_layer()), _lora_delta(m)
            rows.append({"name": name, "quant_err": err.norm().item(), "delta": delta.norm().item(),
                         "max_quant_err": err.abs().max().item(), "max_delta": delta.abs().max().item()})
    return rows


# ---------------------------------------------------------------------------------------------
# 4. Export
# ---------------------------------------------------------------------------------------------
def folder_bytes(path: str | Path) -> int:
    """Total size of the files in ``path`` (recursively), in bytes."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def save_merged(model, tok, path: str | Path) -> Path:
    """``save_pretrained`` of a merged plain model (safetensors) and its tokenizer into ``path``."""
    if isinstance(model, PeftModel) or linear4bit_modules(model):
        raise ValueError("save_merged expects a plain merged model (merge_to_fp / merge_into_base); "
                         "to save an adapter use save_adapter")
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path
