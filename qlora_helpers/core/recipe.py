"""One recipe for every training run in the kit: LoRA and training hyper-parameters, frozen.

What it teaches: a fine-tuning run is a handful of numbers (rank, alpha, dropout, targets,
learning rate, warm-up, clipping, batch, steps, seed). nanoGPT keeps its model's numbers in one
``GPTConfig`` dataclass that everything reads; the kit does the same for its runs. A
:class:`Recipe` is immutable: a variant is a new recipe (:meth:`Recipe.replace`), so no run can
change another's numbers by accident, and every rule about them (a rank is a positive int, a
learning rate is positive and finite, ...) is checked here, once.

A recipe becomes a trainable model in :mod:`qlora_helpers.core.qlora_model` (PEFT's surgery), and trainer
settings in :mod:`qlora_helpers.sft`; this module only holds the numbers and their rules.

The presets: :data:`KIT_SFT` (notebook 04, the Trainer), :data:`KIT_LOOP` (the plain loop's
stand-in adapter of notebook 05), :data:`ABLATION_BASELINE` (notebook 06's baseline) and
:data:`QLORA_PAPER` (the QLoRA paper's reference scripts, arXiv:2305.14314,
``artidoro/qlora/scripts/finetune_guanaco_{7b,13b,33b,65b}.sh``).

Note (the paper's warm-up): the scripts pass ``--warmup_ratio 0.03`` with
``--lr_scheduler_type constant``. transformers' ``get_scheduler`` returns the ``constant``
schedule before it reads the warm-up, so those runs had none (``tests/test_recipe.py`` pins it
with transformers 5.23). The kit's recipes warm up for 10 steps with ``constant_with_warmup``.

>>> KIT_SFT.r, KIT_SFT.lora_alpha, KIT_SFT.scaling
(16, 32, 2.0)
>>> ABLATION_BASELINE.replace(r=64, use_rslora=True).scaling  # alpha / sqrt(r)
2.0
>>> QLORA_PAPER["65b"].lr, QLORA_PAPER["65b"].lora_dropout, QLORA_PAPER["65b"].warmup_steps
(0.0001, 0.05, 0)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from dataclasses import dataclass

from peft import LoraConfig


def check_rank(r, shape=None) -> None:
    """The one rule for a LoRA rank, everywhere in the kit: a positive int (not a bool, not a float),
    and at most ``min(shape)`` when a matrix ``shape`` is given (a rank cannot exceed it).

    >>> check_rank(16)
    >>> check_rank(16.0)
    Traceback (most recent call last):
    ValueError: LoRA rank r must be a positive integer, got r=16.0; typical values are 8, 16 or 64
    >>> check_rank(8, shape=(4, 32))
    Traceback (most recent call last):
    ValueError: LoRA rank r=8 exceeds min(shape) = 4 for a matrix of shape (4, 32)
    """
    if not isinstance(r, numbers.Integral) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got r={r!r}; typical values are 8, 16 or 64")
    if shape is not None and r > min(shape):
        raise ValueError(f"LoRA rank r={r} exceeds min(shape) = {min(shape)} for a matrix of shape {tuple(shape)}")


@dataclass(frozen=True)
class Recipe:
    """Every hyper-parameter of a LoRA / QLoRA training run.

    Attributes:
        r: adapter rank. lora_alpha: scale numerator (``alpha / r``, or ``alpha / sqrt(r)`` with
            ``use_rslora``). lora_dropout: dropout on the adapter's input.
        target_modules: PEFT's ``target_modules`` (``"all-linear"``: every linear layer but the head).
        use_rslora, use_dora: PEFT's rsLoRA scaling and DoRA.
        lr: learning rate after warm-up. warmup_steps: linear warm-up, then constant.
        max_grad_norm: gradient clipping (the paper's 0.3). weight_decay: AdamW's.
        batch_size: rows per optimizer step. steps: optimizer steps. seed: init and batch order.
        gradient_checkpointing: keep only each layer's input in the forward pass and recompute the
            rest in the backward pass: less activation memory for more compute (the paper's runs
            use it; a 135M model on a CPU does not need it, see :data:`KIT_SFT`).
    """
    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    lr: float = 2e-3
    warmup_steps: int = 10
    max_grad_norm: float = 0.3
    weight_decay: float = 0.0
    batch_size: int = 16
    steps: int = 350
    seed: int = 0
    gradient_checkpointing: bool = True

    def __post_init__(self):
        def bad(name, want):
            value = getattr(self, name)
            raise ValueError(f"Recipe.{name} must be {want}, got {value!r}")
        try:
            check_rank(self.r)
        except ValueError as err:
            raise ValueError(f"Recipe.r: {err}") from None
        for name in ("batch_size", "steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "a positive int")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            bad("warmup_steps", "an int >= 0")
        for name in ("lora_alpha", "lr", "max_grad_norm"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                bad(name, "a positive finite number")
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", "in [0, 1)")
        if not 0 <= self.weight_decay < 1:
            bad("weight_decay", "in [0, 1)")
        if not isinstance(self.gradient_checkpointing, bool):
            bad("gradient_checkpointing", "True or False")
        if isinstance(self.target_modules, list):  # frozen means hashable: lists become tuples
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def scaling(self) -> float:
        """The factor in front of ``B @ A``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def replace(self, **changes) -> "Recipe":
        """A new recipe with ``changes`` (checked like any recipe); the original is unchanged.

        Raises:
            ValueError: an unknown field (the message lists the known ones) or an invalid value.
        """
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown recipe field(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        """Every field, JSON-ready (target modules as a list)."""
        d = dataclasses.asdict(self)
        d["target_modules"] = d["target_modules"] if isinstance(d["target_modules"], str) else list(d["target_modules"])
        return d

    def fingerprint(self) -> str:
        """A short hash of every field: what a cached adapter records, so that a changed recipe never
        reloads an adapter another recipe trained (:func:`qlora_helpers.adapters.task_adapter`).

        >>> KIT_SFT.fingerprint() == KIT_SFT.replace().fingerprint() != KIT_SFT.replace(r=8).fingerprint()
        True
        """
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def lora_config(self):
        """This recipe's PEFT ``LoraConfig`` for a causal LM (bias off, the output head excluded)."""
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=targets, use_rslora=self.use_rslora, use_dora=self.use_dora,
                          bias="none", task_type="CAUSAL_LM")


# The kit's SFT recipe on the real model (notebook 04, both profiles): rank 16 with alpha = 2r
# (scaling 2), the common PEFT recipe, lr 1e-3, batch 8, 30 steps. Measured on SmolLM2-135M with
# notebook 04's Trainer, 2 CPU threads, exact match on 100 held-out dates after 30 steps: lr 5e-4
# 0.97, 1e-3 1.00, 2e-3 0.60 and 5e-3 0.49 (loss spikes, digits miscopied); the base scores 0.00.
# Longer runs drive the loss towards the zero-loss alarm (below 1e-3 by step 30).
# No gradient checkpointing: a batch of 8 x ~64 tokens keeps little activation memory on a 135M
# model, and recomputing it cost a quarter of the step time (notebook 04, section 3: 2 CPU threads,
# r16 all-linear, packed batches 207 real tokens/s without, 134 with).
KIT_SFT = Recipe(lr=1e-3, batch_size=8, steps=30, gradient_checkpointing=False)
# The same recipe on the kit's tiny model (128 wide): more, larger steps (the unit tests, notebook 06).
KIT_SFT_TINY = Recipe()
# The plain-loop adapter notebook 05 trains when notebook 04 has not run (no dropout).
KIT_LOOP = KIT_SFT.replace(lora_dropout=0.0)
# Notebook 06's baseline on the tiny model: the QLoRA paper's alpha 16 (scaling 1 at r 16), no
# dropout, lr 3e-3.
ABLATION_BASELINE = KIT_SFT_TINY.replace(lora_alpha=16, lora_dropout=0.0, lr=3e-3, steps=300)

# The QLoRA paper's reference scripts (Guanaco on OASST1): the same for every size but the
# learning rate and dropout; batch 4 per device x 4 accumulation steps; no warm-up (see Note).
_PAPER = Recipe(r=64, lora_alpha=16, lora_dropout=0.05, lr=2e-4, warmup_steps=0, max_grad_norm=0.3,
                weight_decay=0.0, batch_size=16, steps=1875, seed=0)
QLORA_PAPER = {"7b": _PAPER.replace(lora_dropout=0.1), "13b": _PAPER,
               "33b": _PAPER.replace(lr=1e-4), "65b": _PAPER.replace(lr=1e-4)}


def recipe_for(profile) -> Recipe:
    """The SFT recipe of a :class:`qlora_helpers.core.runtime.Profile`'s model: :data:`KIT_SFT` for the
    real model on every device (so a laptop and Colab train the same way), :data:`KIT_SFT_TINY`
    for the tiny one."""
    return KIT_SFT_TINY if profile.model == "tiny" else KIT_SFT
