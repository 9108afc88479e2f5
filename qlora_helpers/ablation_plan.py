"""The ablation plan: the baseline every variant changes one thing of, the variants, the grids.

A variant is a flat dict (what a results file stores); its LoRA and training numbers become a
:class:`~qlora_helpers.core.recipe.Recipe` in :func:`variant_recipe`, which checks them. Running a
plan is :mod:`qlora_helpers.ablations`' job; this module only says what to run.

>>> v = make_variant("r64-rs", r=64, use_rslora=True)
>>> (v["r"], v["lora_alpha"], v["use_rslora"], v["targets"])
(64, 16, True, 'all-linear')
>>> [v["name"] for v in rank_variants((4, 64))]
['r4', 'r4-rs', 'r64', 'r64-rs']
>>> make_variant("bad", targets="mlp")
Traceback (most recent call last):
ValueError: variant 'bad': targets='mlp' is not one of ('qv', 'attention', 'all-linear')
"""
from __future__ import annotations

from .core.recipe import ABLATION_BASELINE, Recipe

TARGETS = {"qv": ["q_proj", "v_proj"], "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
           "all-linear": "all-linear"}
INITS = ("default", "loftq")
OPTIMIZER_VARIANTS = ("adamw", "lorafa", "freeze-a", "lorafa-fp32")
# adamw: AdamW on A and B. lorafa: PEFT's LoRA-FA optimizer as shipped (A frozen, B's gradient projected
# by (A A^T)^-1, that product under bf16 autocast wherever accelerate reports bf16: every CPU).
# freeze-a: A frozen, plain AdamW on B (LoRA-FA without the projection). lorafa-fp32: PEFT's LoRA-FA
# with the projection computed in fp32. The last two take LoRA-FA apart (lorafa_parts).
# The baseline every variant changes one thing of: the recipe ABLATION_BASELINE (r 16, alpha 16,
# the QLoRA paper's alpha; no dropout; lr 3e-3, the kit's fast CPU rate) on all linear layers,
# PEFT's default init and AdamW. A variant is a flat dict (what the results file stores); its
# LoRA and training numbers become a Recipe in variant_recipe, which checks them.
BASELINE = {"r": ABLATION_BASELINE.r, "lora_alpha": ABLATION_BASELINE.lora_alpha, "targets": "all-linear",
            "use_rslora": ABLATION_BASELINE.use_rslora, "init": "default", "loftq_iter": 1,
            "optimizer": "adamw", "use_dora": ABLATION_BASELINE.use_dora, "lr": ABLATION_BASELINE.lr,
            "lora_dropout": ABLATION_BASELINE.lora_dropout}
BASELINE_NAME = f"r{ABLATION_BASELINE.r}"  # "r16": the baseline's name in every grid and results file
CURVES = ["r4", BASELINE_NAME, "r64", "r64-rs", "qv", "lorafa", "dora"]  # the full grid's loss-curve figure


# ----------------------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------------------
def make_variant(name: str, **changes) -> dict:
    """The baseline with ``changes``, validated: ``make_variant("r64-rs", r=64, use_rslora=True)``.

    Raises:
        ValueError: an unknown setting or an invalid value (r <= 0, unknown targets/init/optimizer).
    """
    unknown = set(changes) - set(BASELINE)
    if unknown:
        raise ValueError(f"unknown variant setting(s) {sorted(unknown)}; known: {sorted(BASELINE)}")
    v = {"name": name, **BASELINE, **changes}
    for key, allowed in (("targets", tuple(TARGETS)), ("init", INITS), ("optimizer", OPTIMIZER_VARIANTS)):
        if v[key] not in allowed:
            raise ValueError(f"variant {name!r}: {key}={v[key]!r} is not one of {allowed}")
    try:
        variant_recipe(v)  # the recipe's own checks: r a positive int, lr and alpha > 0, ...
    except ValueError as err:
        raise ValueError(f"variant {name!r}: {err}") from None
    return v


def variant_recipe(variant: dict, steps: int | None = None) -> Recipe:
    """The variant's LoRA and training numbers as a :class:`~qlora_helpers.core.recipe.Recipe`."""
    changes = {k: variant[k] for k in ("r", "lora_alpha", "lora_dropout", "lr", "use_rslora", "use_dora")}
    return ABLATION_BASELINE.replace(target_modules=TARGETS[variant["targets"]], **changes,
                                     **({"steps": steps} if steps else {}))


def rank_variants(ranks=(4, 16, 64)) -> list[dict]:
    """Each rank with LoRA's ``alpha / r`` and rsLoRA's ``alpha / sqrt(r)`` (alpha fixed)."""
    return [make_variant(f"r{r}{'-rs' if rs else ''}", r=r, use_rslora=rs)
            for r in ranks for rs in (False, True)]


def method_variants() -> list[dict]:
    """Targets, init, optimizer and DoRA, each changed alone from the baseline (r 16, all linear)."""
    return [make_variant("qv", targets="qv"), make_variant("attention", targets="attention"),
            make_variant("loftq", init="loftq"), make_variant("lorafa", optimizer="lorafa"),
            make_variant("dora", use_dora=True)]


def lorafa_parts() -> list[dict]:
    """LoRA-FA taken apart: A frozen with plain AdamW on B, and PEFT's projection without bf16 rounding.
    With r16 (AdamW on A and B) and lorafa (PEFT's as shipped) they separate freezing A, projecting B's
    gradient, and rounding that gradient to bf16 (notebook 06, section 7)."""
    return [make_variant("freeze-a", optimizer="freeze-a"), make_variant("lorafa-fp32", optimizer="lorafa-fp32")]


def rslora_own_lr() -> list[dict]:
    """rsLoRA at r = 64 with its own learning rate: the baseline's divided by 8, the factor by which its scale
    ``alpha / sqrt(r)`` exceeds LoRA's ``alpha / r`` at r = 64 (notebook 06, exercise 4; committed run)."""
    return [make_variant("r64-rs-lr8", r=64, use_rslora=True, lr=BASELINE["lr"] / 8)]


def lora_config_for(variant: dict):
    """The variant's PEFT ``LoraConfig`` (targets, rank, alpha, rsLoRA, DoRA): its recipe's."""
    return variant_recipe(variant).lora_config()


def grid(full: bool) -> dict:
    """The reduced CI grid (r 4/64 both scalings, r 16, 20 steps, 100 test rows, 3 seeds for the main comparison) or the full one
    (r 4..64, 300 steps, 3 seeds for every variant). Keys: variants, steps, seeds, main, main_seeds."""
    if full:
        variants = rank_variants((4, 8, 16, 32, 64)) + method_variants()
    else:  # the baseline (r16) without its rsLoRA twin, to fit CI's few minutes
        variants = rank_variants((4, 64)) + [make_variant(BASELINE_NAME)] + method_variants()
    return {"variants": variants, "steps": 300 if full else 20, "seeds": (0, 1, 2) if full else (0,),
            "main": [BASELINE_NAME, "qv"], "main_seeds": (0, 1, 2), "n_test": 200 if full else 100}
