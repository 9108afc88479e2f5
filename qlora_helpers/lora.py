"""LoRA from the equation up: ``W' = W + (alpha / r) * B @ A``, checked against PEFT.

What it teaches (notebook ``01_lora_math``):

1. Why a low-rank update is enough: the SVD of a weight update, the best rank-r approximation
   (Eckart-Young) and its error, and what a rank-r update costs: ``r * (in + out)`` parameters
   instead of ``in * out``, for one layer and for a whole model (Llama-2-7B, Llama-3-8B).
2. ``LoRALinear``: the ~40 lines of a LoRA layer, with PEFT's names (``base_layer``, ``lora_A``,
   ``lora_B``, ``lora_dropout``, ``scaling``, ``get_delta_weight``, ``merge``, ``unmerge``), PEFT's
   init (Kaiming-uniform A, zero B, so a fresh adapter is a no-op) and rsLoRA's ``alpha / sqrt(r)``.
3. ``inject_lora``: put LoRA on the linear layers named by ``target_modules`` (PEFT's matching
   rule, including ``"all-linear"``) and freeze everything else.
4. A plain-PyTorch training loop that moves only A and B, and merge / unmerge of the result.

Papers: LoRA, Hu et al. 2021, arXiv:2106.09685; rsLoRA, Kalajdzievski 2023, arXiv:2312.03732.

Production code it is checked against: ``peft.tuners.lora.layer.Linear`` and
``peft.tuners.tuners_utils._maybe_include_all_linear_layers`` (peft 0.21.2).
``tests/test_lora.py`` uses PEFT as the oracle: same logits, same merged weights, same number of
trainable parameters, with the same non-zero A and B copied into both.
"""
from __future__ import annotations

import math
import re
import warnings
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .core.chat_data import conversation_ids, padded_collator
from .core.recipe import check_rank
from .core.training import OPTIMIZERS, build_optimizer, on_model_device, train_loop

ALL_LINEAR = "all-linear"  # PEFT's shorthand: every nn.Linear except the output head


# ---------------------------------------------------------------------------------------------
# 1. The low-rank picture
# ---------------------------------------------------------------------------------------------
def best_rank_r(delta: torch.Tensor, r: int) -> torch.Tensor:
    """The closest rank-``r`` matrix to ``delta`` in Frobenius norm (Eckart-Young): keep the
    ``r`` largest singular values. ``best_rank_r(torch.eye(3), 1)`` keeps one of the three 1s.

    Args:
        delta: a weight update, shape (out, in).
        r: the rank to keep, 1 <= r <= min(out, in).
    Returns:
        ``U[:, :r] @ diag(S[:r]) @ Vh[:r]``, shape (out, in).
    """
    check_rank(r)
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)  # (out, k), (k,), (k, in)
    return (U[:, :r] * S[:r]) @ Vh[:r]  # (out, in)


def relative_error_by_rank(delta: torch.Tensor, ranks: Iterable[int]) -> list[float]:
    """``||delta - best_rank_r(delta, r)||_F / ||delta||_F`` for each r, read off the singular
    values: the error of the best rank-r approximation is the energy in the dropped ones.

    Args:
        delta: shape (out, in).
        ranks: ranks to evaluate.
    Returns:
        One relative error in [0, 1] per rank.
    """
    S = torch.linalg.svdvals(delta.double())  # (k,) descending
    energy = S.pow(2)  # (k,)
    total = energy.sum()
    return [float((energy[r:].sum() / total).sqrt()) for r in ranks]


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor in front of ``B @ A``: ``alpha / r`` (LoRA) or ``alpha / sqrt(r)`` (rsLoRA).

    >>> lora_scaling(16, 8), lora_scaling(16, 64), lora_scaling(16, 64, use_rslora=True)
    (2.0, 0.25, 2.0)
    """
    check_rank(r)
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def linear_param_counts(in_features: int, out_features: int, r: int) -> tuple[int, int]:
    """(full update, LoRA update) parameter counts for one linear layer.

    >>> linear_param_counts(4096, 4096, 16)  # 128x fewer
    (16777216, 131072)

    Returns:
        ``(out * in, r * (in + out))``: a dense ΔW versus A (r, in) plus B (out, r).
    """
    check_rank(r)
    return out_features * in_features, r * (in_features + out_features)


def llama_linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of the seven linear layers of one Llama decoder layer,
    from the config alone. Grouped-query attention shrinks k_proj and v_proj.

    Args:
        config: a ``transformers.LlamaConfig`` (or anything with the same fields).
    Returns:
        ``{"q_proj": (hidden, heads * head_dim), ..., "down_proj": (intermediate, hidden)}``.
    """
    h, i = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim  # query width
    kv_heads = config.num_key_value_heads or config.num_attention_heads  # GQA: fewer K/V heads
    kv = kv_heads * head_dim  # key / value width
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def llama_lora_param_count(config, r: int, target_modules: str | Sequence[str] = ALL_LINEAR) -> int:
    """LoRA's trainable parameters on a Llama model, by formula:
    ``n_layers * sum over targeted projections of r * (in + out)``.
    ``"all-linear"`` means the seven projections (the output head is never targeted).

    Returns:
        The count PEFT's ``get_nb_trainable_parameters()[0]`` reports for the same config.
    """
    shapes = llama_linear_shapes(config)
    names = list(shapes) if target_modules == ALL_LINEAR else list(target_modules)
    per_layer = sum(linear_param_counts(*shapes[n], r)[1] for n in names)
    return config.num_hidden_layers * per_layer


def count_trainable(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad=True``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# 2. The LoRA layer
# ---------------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """``y = base_layer(x) + scaling * lora_B(lora_A(dropout(x)))``, the frozen base untouched.

    Same names, init and arithmetic as ``peft.tuners.lora.layer.Linear`` with one adapter.

    Args:
        base_layer: the frozen ``nn.Linear`` (in_features -> out_features).
        r: rank of the update. alpha: numerator of the scaling (PEFT's ``lora_alpha``).
        dropout: dropout on the input of the LoRA path only (PEFT's ``lora_dropout``).
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
    """

    def __init__(self, base_layer: nn.Linear, r: int = 8, alpha: float = 8,
                 dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)  # W (out, in) stays frozen
        self.r, self.lora_alpha = r, alpha
        self.scaling = lora_scaling(alpha, r, use_rslora)  # alpha/r or alpha/sqrt(r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False)  # A: (r, in)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False)  # B: (out, r)
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A as nn.Linear's default init (Kaiming-uniform, a=sqrt(5)); B = 0, so B @ A = 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def get_delta_weight(self) -> torch.Tensor:
        """ΔW = scaling * B @ A, shape (out, in): what ``merge`` adds to W."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, r) @ (r, in)

    def merge(self) -> None:
        """W <- W + ΔW: one matmul per layer at inference, no extra latency."""
        if self.merged:
            warnings.warn("Already merged. Nothing to do.")
            return
        if not self.base_layer.weight.is_floating_point():
            raise ValueError(f"cannot add ΔW to a {self.base_layer.weight.dtype} (quantized) "
                             f"weight; merge into a full-precision copy of the base instead "
                             f"(merging into 4-bit re-quantizes W + ΔW and loses precision)")
        w = self.base_layer.weight
        merged = (w.data + self.get_delta_weight()).to(w.dtype)  # (out, in); added in fp32, rounded once to W's dtype (as PEFT)
        if not torch.isfinite(merged).all():  # PEFT's safe_merge: never write a broken adapter into the base
            bad = int((~torch.isfinite(merged)).sum())
            raise ValueError(f"merge refused: W + ΔW has {bad} non-finite value(s) in this {tuple(w.shape)} layer "
                             f"(ΔW finite: {bool(torch.isfinite(self.get_delta_weight()).all())}); the adapter is broken "
                             f"(a NaN/inf from training?) or overflows {w.dtype}: do not merge it")
        w.data = merged
        self.merged = True

    def unmerge(self) -> None:
        """W <- W - ΔW (exact up to fp rounding; see the notebook for the bound)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        w = self.base_layer.weight
        w.data -= self.get_delta_weight().to(w.dtype)  # (out, in)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        result = self.base_layer(x)  # (..., out)
        if self.merged:
            return result  # ΔW already inside W
        a = self.lora_A.weight  # fp32 whatever the base's dtype (inject_lora says why), as PEFT does
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype)))) * self.scaling  # (..., out)
        return (result + update).to(result.dtype)  # summed in fp32, rounded once to the base's dtype (as PEFT)

    def extra_repr(self) -> str:
        return (f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, "
                f"merged={self.merged}")


# ---------------------------------------------------------------------------------------------
# 3. Injection into a model
# ---------------------------------------------------------------------------------------------
def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the output embedding (``lm_head``), which "all-linear" skips, as PEFT does."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {name for name, m in model.named_modules() if head is not None and m is head}


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a list entry: the full module name, or its last dotted components."""
    return name == target or name.endswith("." + target)


def find_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Names of the modules LoRA will wrap, with PEFT's meaning of ``target_modules``.

    Args:
        model: any ``nn.Module`` (a transformers model for "all-linear" to skip the head).
        target_modules: ``"all-linear"``; another string = a regex that must match the whole
            module name (PEFT's rule); or a list of names, each matching a module whose name is
            that name or ends with ``"." + name`` (``"q_proj"`` matches ``"...self_attn.q_proj"``).
    Returns:
        Module names in the model's order (the order PEFT creates its layers in, so that with
        the same seed both draw the same A), every one an ``nn.Linear``.
    Raises:
        ValueError: a list entry matched nothing (stricter than PEFT, which only raises when
            *no* entry matched), or a matched module is not an ``nn.Linear``.

    Note: PEFT's "all-linear" also takes transformers' ``Conv1D`` (GPT-2's linear layers); the
    Llama family, the only architecture this kit uses, has none.
    """
    modules = dict(model.named_modules())
    linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        head = _output_head_names(model)
        return [n for n in linear if n not in head]
    if isinstance(target_modules, str):
        names = [n for n in modules if n and re.fullmatch(target_modules, n)]
        _require_linear_match(target_modules, names, modules)
        return names
    names = set()
    for t in target_modules:
        hits = [n for n in modules if n and _matches(n, t)]
        _require_linear_match(t, hits, modules)
        names.update(hits)
    return [n for n in modules if n in names]


def _require_linear_match(target: str, hits: list[str], modules: dict[str, nn.Module]) -> None:
    """ValueError naming ``target`` if it matched nothing or matched a non-linear module."""
    if not hits:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items()
                         if isinstance(m, nn.Linear)})
        raise ValueError(f"target module {target!r} matches no module of the model; its linear "
                         f"layers are named {linear} (or pass 'all-linear')")
    for n in hits:
        if not isinstance(modules[n], nn.Linear):
            raise ValueError(f"target module {target!r} matches {n!r}, a "
                             f"{type(modules[n]).__name__}, not an nn.Linear; LoRALinear only "
                             f"wraps linear layers: target its projections instead (e.g. "
                             f"'q_proj', 'down_proj') or 'all-linear'")


def inject_lora(model: nn.Module, target_modules: str | Sequence[str] = ALL_LINEAR, r: int = 8,
                alpha: float = 8, dropout: float = 0.0, use_rslora: bool = False) -> nn.Module:
    """Freeze every parameter, then replace each targeted ``nn.Linear`` by a ``LoRALinear``.

    Defaults are ``peft.LoraConfig``'s (r=8, lora_alpha=8, lora_dropout=0.0). In place.

    Args:
        model: the base model. target_modules: see :func:`find_targets`.
        r, alpha, dropout, use_rslora: see :class:`LoRALinear`.
    Returns:
        ``model``, with only the ``lora_A`` / ``lora_B`` weights trainable.
    """
    check_rank(r)
    if lora_layers(model):
        raise ValueError("model already has LoRALinear layers; inject into a fresh base model")
    names = find_targets(model, target_modules)
    if not names:   # nothing to wrap would leave nothing to train: say so instead of training nothing
        raise ValueError(f"target_modules={target_modules!r} leaves no layer to wrap in this "
                         f"{type(model).__name__} (its only linear layer is the output head, or it has none)")
    model.requires_grad_(False)  # freeze the base: embeddings, norms, head, every W
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        # A and B in fp32 on the base's device, whatever the base's dtype (fp16 on a T4, 4-bit): AdamW on
        # fp16 parameters overflows its second moment (eps=1e-8 is 0 in fp16) and turns them NaN after
        # one step (tests/test_lora.py), and fp32 adapters are what PEFT keeps too.
        layer = LoRALinear(base, r, alpha, dropout, use_rslora)       # A and B are created in fp32
        if base.weight.dtype in (torch.float16, torch.bfloat16):
            # PEFT creates its adapter, moves it to the base's dtype, then casts it back to fp32
            # (autocast_adapter_dtype): its initial A is rounded to fp16 once. The same here, so that
            # ours and PEFT's start bit-identical from the same seed on a T4 too (notebook 01).
            layer.lora_A.weight.data = layer.lora_A.weight.data.to(base.weight.dtype).float()
        for m in (layer.lora_A, layer.lora_B):
            m.to(base.weight.device)                                 # only A and B move: W keeps its dtype
        setattr(parent, child, layer)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """``{module name: LoRALinear}`` for every LoRA layer in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> None:
    """``merge()`` every LoRA layer: the model then computes with W + ΔW and no LoRA path."""
    for name, layer in lora_layers(model).items():
        try:
            layer.merge()
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None


def unmerge_lora(model: nn.Module) -> None:
    """``unmerge()`` every LoRA layer: W back to the base weights (up to fp rounding)."""
    for layer in lora_layers(model).values():
        layer.unmerge()


# ---------------------------------------------------------------------------------------------
# Equivalence with PEFT: the same non-zero A and B in both models
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def randomize_lora(model: nn.Module, seed: int = 0,
                   std: float = 0.02) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fill every A and B with N(0, std^2) (B non-zero, so the adapter changes the output).

    Returns:
        ``{module name: (A (r, in), B (out, r))}``, for :func:`copy_lora_to_peft`.
    """
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, layer in lora_layers(model).items():
        for w in (layer.lora_A.weight, layer.lora_B.weight):
            w.copy_(torch.randn(w.shape, generator=gen) * std)
        state[name] = (layer.lora_A.weight.clone(), layer.lora_B.weight.clone())
    return state


@torch.no_grad()
def copy_lora_to_peft(state: dict[str, tuple[torch.Tensor, torch.Tensor]], peft_model,
                      adapter: str = "default") -> None:
    """Write A and B into the matching layers of a PEFT model (``get_peft_model`` output).

    PEFT wraps the base model as ``peft_model.base_model.model``; inside it, a LoRA layer has
    the same name as the ``nn.Linear`` it replaced, and keeps A and B in ``lora_A[adapter]``.
    """
    inner = peft_model.base_model.model
    for name, (A, B) in state.items():
        layer = inner.get_submodule(name)
        layer.lora_A[adapter].weight.copy_(A)  # (r, in)
        layer.lora_B[adapter].weight.copy_(B)  # (out, r)


# ---------------------------------------------------------------------------------------------
# 4. Training in plain PyTorch
# ---------------------------------------------------------------------------------------------
def chat_batch(tokenizer, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Chat rows (``{"messages": [...]}``) as one right-padded batch, trained on every token.

    The rows are tokenized with :func:`qlora_helpers.core.chat_data.conversation_ids` (the chat
    template, up to the assistant's EOS) and padded with
    :func:`~qlora_helpers.core.chat_data.padded_collator`; unlike SFT in notebook 04, the labels keep
    the prompt tokens too: this loop teaches LoRA, not loss masking.

    Returns:
        ``input_ids`` and ``attention_mask`` (batch, seq), and ``labels`` = input_ids with
        padding set to -100 (ignored by the loss).
    """
    ids = [conversation_ids(r, tokenizer)[0] for r in rows]
    return padded_collator(tokenizer, None)([{"input_ids": x, "labels": x} for x in ids])


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the non-padding positions, in fp32 (an fp16 model's logits
    are upcast: the log-softmax over 49,152 classes is where fp16 loses digits). The batch follows the
    model to its device (a GPU in the gpu profile)."""
    batch = on_model_device(batch, model)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits  # (batch, seq, vocab)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=-100)


def train_steps(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], lr: float,
                weight_decay: float = 0.0) -> list[float]:
    """One AdamW step per batch on the parameters with ``requires_grad`` (after
    :func:`inject_lora`: A and B only), constant learning rate, no clipping, the loss
    :func:`lm_loss`; returns the training losses. The loop is the kit's one
    (:func:`qlora_helpers.core.training.train_loop`). ``lr`` has no default: each lesson says its own."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer("adamw_torch", params, lr, weight_decay)
    log = train_loop(model, opt, batches, lr, schedule=lambda step: lr, max_grad_norm=None, loss_fn=lm_loss)
    model.eval()
    return log["losses"]


def one_step_update_norm(r: int, use_rslora: bool, in_features: int = 512, out_features: int = 512,
                         alpha: float = 16, lr: float = 1e-2, seed: int = 0, optimizer: str = "sgd") -> float:
    """How far one optimizer step from B = 0 moves a LoRA layer's output on its input, ``||ΔW x||``.

    The rsLoRA argument in one step: for a loss with upstream gradient g, the gradient of B is
    ``scaling * g (A x)^T`` (A's is zero while B = 0). With A's Kaiming init every entry of
    ``A x`` has a size independent of r, and there are r of them.

    - ``optimizer="sgd"``: ``B_1 = -lr * scaling * g (A x)^T``, so
      ``ΔW x = -lr * scaling^2 * g * ||A x||^2``, which grows like ``scaling^2 * r``: like 1/r with
      alpha/r (a larger rank learns slower), flat with alpha/sqrt(r) (rsLoRA's point).
    - ``optimizer="adamw_torch"`` (any name of :data:`qlora_helpers.core.training.OPTIMIZERS`): Adam's
      first step divides the gradient by its own size, ``B_1 = -lr * sign(g) sign(A x)^T``, so
      ``ΔW x = -lr * scaling * sign(g) * ||A x||_1``, which grows like ``scaling * r``: flat with
      alpha/r, like sqrt(r) with alpha/sqrt(r). The same argument, the opposite verdict.

    ``x`` and ``g`` are fixed unit-variance draws.

    >>> a, b = (one_step_update_norm(r, False, optimizer="adamw_torch") for r in (4, 64))
    >>> 0.8 < b / a < 1.25   # alpha/r under Adam: the step's effect does not depend on r
    True
    """
    if optimizer != "sgd" and optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be 'sgd' or one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(in_features, out_features, bias=False), r, alpha,
                       use_rslora=use_rslora)
    x = torch.randn(1, in_features)  # (1, in) one input
    g = torch.randn(1, out_features)  # (1, out) the upstream gradient dL/dy
    (layer(x) * g).sum().backward()
    if optimizer == "sgd":
        with torch.no_grad():
            layer.lora_B.weight -= lr * layer.lora_B.weight.grad  # (out, r)
    else:
        build_optimizer(optimizer, [layer.lora_B.weight], lr=lr).step()
    with torch.no_grad():
        return float((x @ layer.get_delta_weight().T).norm())  # ||ΔW x||
