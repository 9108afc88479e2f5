"""The trainable QLoRA model a recipe makes of a 4-bit base: PEFT's k-bit preparation, then LoRA.

What it teaches: the surgery every QLoRA run does before its first step (Dettmers et al., arXiv
2305.14314, section 3): freeze the quantized base, keep the small unquantized weights in fp32, wire
the input for gradient checkpointing, and wrap the chosen linear layers with LoRA. It is the one way
every QLoRA run in the kit (notebook 03's GPU measurement, 04, 06, the GPU self-check) gets its
trainable model, checked against PEFT by being PEFT: ``peft.prepare_model_for_kbit_training`` and
``peft.get_peft_model``, with the numbers of a :class:`qlora_helpers.core.recipe.Recipe`.
"""
from __future__ import annotations

import torch
from peft import get_peft_model, prepare_model_for_kbit_training

from .recipe import Recipe


def prepare_qlora_model(model, config, gradient_checkpointing: bool | None = None):
    """``prepare_model_for_kbit_training`` then ``get_peft_model``: the trainable QLoRA model.

    ``prepare_model_for_kbit_training`` freezes the base, casts the small non-quantized weights
    (norms, embeddings) to fp32 for stability, and makes the input embeddings require grad so that
    gradient checkpointing has something to back-propagate through (the base has no trainable
    weights). ``use_reentrant=False`` is the checkpointing variant PyTorch recommends.

    Args:
        config: a :class:`Recipe` (its ``lora_config()`` and its ``gradient_checkpointing``, the
            same setting :func:`qlora_helpers.sft.training_arguments` reads, so the
            model and the trainer agree), or a ``peft.LoraConfig``.
        gradient_checkpointing: overrides the recipe's setting; ``True`` for a bare ``LoraConfig``.
    Raises:
        ValueError: the targets match no layer of the model, or the result has nothing to train; the
            message names what was asked and the linear layers the model has.
    """
    if isinstance(config, Recipe):
        if gradient_checkpointing is None:
            gradient_checkpointing = config.gradient_checkpointing
        config = config.lora_config()
    elif gradient_checkpointing is None:
        gradient_checkpointing = True
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False})
    linear = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:  # PEFT's NoMatchingPeftModuleError names what was asked, not what exists
        if "not found in the base model" not in str(err):
            raise
        asked = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules)
        raise ValueError(f"LoRA target_modules={asked!r} match no layer of this model (PEFT: {err}). Its linear "
                         f"layers are named {linear}: target some of them, or 'all-linear'.") from None
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError(f"LoRA with target_modules={config.target_modules!r}, r={config.r} left nothing to train "
                         f"(0 trainable parameters); the model's linear layers are {linear}")
    return peft_model
