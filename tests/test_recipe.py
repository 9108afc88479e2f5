"""qlora_helpers.core.recipe: one frozen recipe, checked once, read by every training in the kit."""
import dataclasses

import pytest
import torch

from qlora_helpers.core import recipe as R


@pytest.mark.parametrize("field,value,msg", [
    ("r", 0, "Recipe.r: LoRA rank r must be a positive integer, got r=0"), ("r", 8.0, "Recipe.r: LoRA rank r must be a positive integer"),
    ("lr", float("nan"), "Recipe.lr must be a positive finite number"), ("lora_alpha", -1, "lora_alpha"),
    ("lora_dropout", 1.0, r"lora_dropout must be in \[0, 1\)"), ("steps", 0, "Recipe.steps"),
    ("warmup_steps", -1, "warmup_steps must be an int >= 0"), ("batch_size", True, "batch_size")])
def test_bad_values_are_clear_errors(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        R.KIT_SFT.replace(**{field: value})


def test_frozen_and_replace_makes_a_new_recipe():
    with pytest.raises(dataclasses.FrozenInstanceError):
        R.KIT_SFT.lr = 1.0
    other = R.KIT_SFT.replace(r=64)
    assert (R.KIT_SFT.r, other.r) == (16, 64) and other.lr == R.KIT_SFT.lr
    with pytest.raises(ValueError, match=r"unknown recipe field\(s\) \['rank'\]"):
        R.KIT_SFT.replace(rank=8)


def test_lora_config_reaches_peft(offline_profile):
    """PEFT is the oracle: the recipe's scaling is the layer's, and its trainable count is the formula's."""
    from peft import get_peft_model

    from qlora_helpers.core.runtime import load_model
    from qlora_helpers.lora import llama_lora_param_count
    for recipe in (R.KIT_SFT, R.ABLATION_BASELINE.replace(r=64, use_rslora=True),
                   R.ABLATION_BASELINE.replace(target_modules=["q_proj", "v_proj"])):
        model = get_peft_model(load_model(offline_profile, quantized=False), recipe.lora_config())
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.scaling["default"] == recipe.scaling
        targets = recipe.target_modules if isinstance(recipe.target_modules, str) else list(recipe.target_modules)
        assert model.get_nb_trainable_parameters()[0] == llama_lora_param_count(model.config, recipe.r, targets)


def test_training_arguments_read_the_recipe(offline_profile, tmp_path):
    from qlora_helpers.sft import training_arguments
    rec = R.KIT_SFT.replace(lr=1e-3, steps=7, warmup_steps=3, batch_size=4, max_grad_norm=0.5, seed=3)
    a = training_arguments(offline_profile, str(tmp_path), rec)
    assert (a.learning_rate, a.max_steps, a.warmup_steps, a.per_device_train_batch_size,
            a.max_grad_norm, a.seed) == (1e-3, 7, 3, 4, 0.5, 3)
    assert training_arguments(offline_profile, str(tmp_path)).learning_rate == R.recipe_for(offline_profile).lr


def test_the_paper_scripts_constant_schedule_has_no_warmup():
    """The reference scripts set warmup_ratio 0.03 with lr_scheduler_type constant; transformers'
    get_scheduler returns the constant schedule without reading the warm-up, so the paper's runs
    started at full learning rate (hence QLORA_PAPER's warmup_steps = 0). constant_with_warmup,
    the kit's schedule, does warm up."""
    from transformers import get_scheduler
    for name, want in [("constant", [1.0, 1.0, 1.0]), ("constant_with_warmup", [1 / 3, 2 / 3, 1.0])]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = get_scheduler(name, opt, num_warmup_steps=3, num_training_steps=100)
        got = []
        for _ in range(3):
            sched.step()
            got.append(opt.param_groups[0]["lr"])
        assert got == pytest.approx(want), name
    assert all(p.warmup_steps == 0 for p in R.QLORA_PAPER.values())


def test_targets_that_match_nothing_are_refused_with_what_exists(offline_profile):
    """Nothing silently does nothing: a recipe whose targets match no layer stops with the targets asked
    and the linear layers the model has (PEFT's own message names only the first)."""
    from qlora_helpers.core.qlora_model import prepare_qlora_model
    from qlora_helpers.core.recipe import KIT_SFT_TINY
    from qlora_helpers.core.runtime import load_model
    with pytest.raises(ValueError, match=r"target_modules=\['qproj'\].*'q_proj'"):
        prepare_qlora_model(load_model(offline_profile), KIT_SFT_TINY.replace(target_modules=("qproj",)))
