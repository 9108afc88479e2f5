"""LoftQ: start the adapter where quantization hurt most, on top of the kit's own NF4.

What it teaches (notebook ``06_ablations``): QLoRA freezes ``Q = NF4(W)`` and starts the adapter
at ``B = 0``, so the model it starts from is the *quantized* model, off from ``W`` by ``W - Q``.
LoftQ (Li et al. 2023, arXiv:2310.08659, Algorithm 1) chooses ``Q`` and the adapter *together* so
that ``Q + s * B @ A`` is close to ``W``. It alternates ``T`` times:

1. ``Q = NF4(W - s * B @ A)``           (quantize what the adapter does not already cover),
2. ``s * B @ A = rank-r SVD of (W - Q)`` (the adapter takes the best rank-r part of the error).

Step 2 is optimal for a fixed ``Q`` (Eckart-Young): its squared Frobenius error is the sum of the
discarded squared singular values. ``T = 1`` is "quantize W, then fit the error".

Production code it is checked against: PEFT 0.21.2 ``peft.utils.loftq_utils.loftq_init`` (4 bits,
``num_iter``) and ``_low_rank_decomposition`` (B = U_r sqrt(S_r), A = sqrt(S_r) Vh_r).
``tests/test_loftq.py`` runs PEFT's own function on the CPU with its device string changed
(``loftq_init`` hard-codes ``"cuda"``; ``TROUBLESHOOTING.md``, "PEFT's LoftQ needs CUDA") and, with a GPU, unchanged.

Note (scaling): PEFT writes ``lora_B = U_r sqrt(S_r)`` into the adapter as is, but the adapter's
    forward adds ``scaling * B @ A`` (``scaling = lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA).
    PEFT's LoftQ is therefore exact only when ``scaling == 1``. Here ``B`` is divided by the
    scaling, so that ``Q + scaling * B @ A`` is LoftQ's approximation for any alpha.
Note (double quantization): the model stores its NF4 constants in 8 bits (QLoRA's double
    quantization), so the Q a 4-bit layer computes with is the double-quantized round trip
    (:func:`nf4_dq_roundtrip`, the kit's; on the CPU bit for bit what bitsandbytes writes).
Note (backend): :func:`apply_loftq` quantizes with the layer's own backend (:func:`layer_roundtrip`:
    bitsandbytes on the layer's device, the layer's settings), so the Q LoftQ fits its SVD to is the Q
    the layer holds on any device. On the CPU that is the kit's NF4 + double quantization exactly
    (``tests/test_loftq.py``); bitsandbytes' CUDA kernel finds the nearest 8-bit code of a block constant
    by a binary search of its own and scales by an approximate ``1/absmax`` (fast math), so a few codes
    differ from the kit's there, and LoftQ with the kit's round trip would fit its SVD to a Q the layer
    does not hold.
"""
from __future__ import annotations

from typing import Callable

import bitsandbytes.functional as bf
import torch

from . import double_quant, nf4
from .core.recipe import check_rank

Quantizer = Callable[[torch.Tensor], torch.Tensor]  # W (out, in) -> dequantized Q (out, in)


def nf4_roundtrip(w: torch.Tensor, blocksize: int = nf4.DEFAULT_BLOCKSIZE) -> torch.Tensor:
    """``dequantize(quantize(w))`` in NF4 with fp32 constants (bitsandbytes ``compress_statistics=False``)."""
    packed, absmax = nf4.quantize_nf4(w, blocksize)  # (ceil(n/2),), (n_blocks,)
    return nf4.dequantize_nf4(packed, absmax, w.shape, blocksize)


def nf4_dq_roundtrip(w: torch.Tensor, blocksize: int = nf4.DEFAULT_BLOCKSIZE) -> torch.Tensor:
    """The same with double-quantized constants: what a QLoRA ``Linear4bit`` layer computes with."""
    packed, state = double_quant.quantize_nf4_dq(w, blocksize)
    return double_quant.dequantize_nf4_dq(packed, state, w.shape, blocksize)


def low_rank_split(residual: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best rank-``r`` factors of ``residual``, split as PEFT's ``_low_rank_decomposition``.

    Args:
        residual: float32 (out, in).
        r: rank, 1 <= r <= min(out, in).
    Returns:
        A (r, in) = sqrt(S_r) Vh_r, B (out, r) = U_r sqrt(S_r), and all singular values S (k,).
    """
    check_rank(r, residual.shape)
    U, S, Vh = torch.linalg.svd(residual.float(), full_matrices=False)  # (out,k), (k,), (k,in)
    root = S[:r].sqrt()  # (r,)
    return root[:, None] * Vh[:r], U[:, :r] * root, S


def loftq(w: torch.Tensor, r: int, num_iter: int = 1, scaling: float = 1.0,
          quantize: Quantizer = nf4_roundtrip) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ initialization of one weight matrix (arXiv 2310.08659, Algorithm 1).

    Args:
        w: float (out, in), the full-precision weight.
        r: adapter rank.
        num_iter: T, alternations; 0 is plain QLoRA (Q = NF4(W), B = A = 0); PEFT's ``loftq_iter``.
        scaling: the adapter's ``lora_alpha / r`` (or ``/ sqrt(r)``); B is divided by it (Note: scaling).
        quantize: the round trip to apply (NF4; :func:`nf4_dq_roundtrip` for a double-quant model).
    Returns:
        Q (out, in) dequantized base, A (r, in), B (out, r), with ``Q + scaling * B @ A ~ W``.
    """
    if not scaling > 0:
        raise ValueError(f"scaling must be > 0, got {scaling}")
    q, a, b, _ = _alternate(w, r, num_iter, quantize)
    return q, a, b / scaling


def _alternate(w: torch.Tensor, r: int, num_iter: int, quantize: Quantizer):
    """LoftQ's loop. Returns Q, A, B (unscaled) and the matrix the final Q quantized:
    ``W`` for T <= 1, else ``W - B A`` of the step before the last."""
    if num_iter < 0:
        raise ValueError(f"num_iter must be >= 0 (0 = plain quantization), got {num_iter}")
    check_rank(r, w.shape)
    w = w.float()
    source = w
    q = quantize(source)
    a, b = w.new_zeros(r, w.shape[1]), w.new_zeros(w.shape[0], r)
    for i in range(num_iter):
        a, b, _ = low_rank_split(w - q, r)  # (r, in), (out, r)
        if i + 1 < num_iter:
            source = w - b @ a
            q = quantize(source)
    return q, a, b, source


def loftq_errors(w: torch.Tensor, q: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 scaling: float = 1.0) -> dict[str, float]:
    """Frobenius errors of the initial model against ``W``.

    Returns:
        ``{"plain": ||W - NF4(W)||, "base": ||W - Q||, "loftq": ||W - (Q + s B A)||}``; with
        ``"plain"`` computed with fp32-constant NF4.
    """
    w = w.float()
    return {"plain": (w - nf4_roundtrip(w)).norm().item(), "base": (w - q).norm().item(),
            "loftq": (w - (q + scaling * b @ a)).norm().item()}


# ---------------------------------------------------------------------------------------------
# LoftQ in a PEFT model on a bitsandbytes 4-bit base
# ---------------------------------------------------------------------------------------------
def _fp_name(peft_name: str) -> str:
    """The full-precision model's name of a PEFT model's layer.

    >>> _fp_name("base_model.model.model.layers.0.mlp.up_proj")
    'model.layers.0.mlp.up_proj'
    """
    return peft_name.removeprefix("base_model.model.")


def set_4bit_weight(layer, q_source: torch.Tensor) -> torch.Tensor:
    """Quantize ``q_source`` into ``layer`` (a bitsandbytes ``Linear4bit``) with the layer's own
    settings; returns what the layer now computes with (``dequantize_4bit``), float32 (out, in)."""
    old = layer.weight
    packed, state = bf.quantize_4bit(q_source.contiguous(), blocksize=old.blocksize,
                                     compress_statistics=old.compress_statistics,
                                     quant_type=old.quant_type, quant_storage=old.quant_storage)
    old.data, old.quant_state = packed, state
    layer.quant_state = state
    return bf.dequantize_4bit(packed, state).float()


def layer_roundtrip(layer) -> Quantizer:
    """The round trip a bitsandbytes ``Linear4bit`` applies to a weight: ``quantize_4bit`` then
    ``dequantize_4bit`` on the layer's device (its backend: the CPU's or CUDA's kernel) with the layer's
    blocksize, double quantization, quant type and storage. Returns float32 on the layer's device.
    (Note: backend.)"""
    old = layer.weight

    def roundtrip(w: torch.Tensor) -> torch.Tensor:
        packed, state = bf.quantize_4bit(w.to(old.device).contiguous(), blocksize=old.blocksize,
                                         compress_statistics=old.compress_statistics,
                                         quant_type=old.quant_type, quant_storage=old.quant_storage)
        return bf.dequantize_4bit(packed, state).float()
    return roundtrip


@torch.no_grad()
def apply_loftq(peft_model, fp_model, num_iter: int = 1, adapter: str = "default") -> dict[str, dict]:
    """Replace a fresh QLoRA adapter and its NF4 base by LoftQ's, layer by layer, on the layer's device.

    Call it before any forward pass (the bytes it writes must be the bytes the layer uses). For every LoRA layer: LoftQ on
    the full-precision ``W`` from ``fp_model``, quantizing with the layer's own backend
    (:func:`layer_roundtrip`; Note: backend), write ``NF4(W - s B_{T-1} A_{T-1})`` into the ``Linear4bit``,
    and check that the layer now computes with exactly the Q that LoftQ's last SVD was fitted to.

    Returns:
        ``{layer name: loftq_errors(...)}``.
    """
    fp = dict(fp_model.named_modules())
    report = {}
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or adapter not in module.lora_A:
            continue
        layer = module.get_base_layer()
        w = fp[_fp_name(name)].weight.float().to(layer.weight.device)
        r, s = module.r[adapter], module.scaling[adapter]
        q, a, b, source = _alternate(w, r, num_iter, layer_roundtrip(layer))
        b = b / s  # the layer multiplies B A by s (Note: scaling)
        stored = set_4bit_weight(layer, source)
        if not torch.equal(stored, q):
            raise RuntimeError(f"{name}: the 4-bit layer does not hold LoftQ's Q after writing it: bitsandbytes "
                               f"quantized the same matrix twice with different results on {layer.weight.device}")
        module.lora_A[adapter].weight.copy_(a)
        module.lora_B[adapter].weight.copy_(b)
        report[name] = loftq_errors(w, q, a, b, s)
    return report
