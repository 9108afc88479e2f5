"""The training entry point (qlora_helpers.train) and its shipped configs: bad configs and launches are refused
before any model loads, with the value and the fix; the shipped accelerate configs are what accelerate reads.
The two-process launch itself runs in notebook 09 under nbval (losses and adapters against one process)."""
import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from qlora_helpers.core.recipe import recipe_for
from qlora_helpers.core.runtime import get_profile
from qlora_helpers.train import CONFIGS, Launch, RunConfig, check_launch, launch_from_env, load_run_config, main


def test_shipped_accelerate_configs_are_what_accelerate_reads():
    """accelerate's own loader is the oracle: each file names the strategy its name says."""
    one = load_config_from_file(str(CONFIGS / "accelerate" / "single_gpu.yaml"))
    ddp = load_config_from_file(str(CONFIGS / "accelerate" / "ddp.yaml"))
    fsdp = load_config_from_file(str(CONFIGS / "accelerate" / "fsdp_qlora.yaml"))
    assert (one.distributed_type, one.num_processes) == (DistributedType.NO, 1)
    assert (ddp.distributed_type, ddp.num_processes) == (DistributedType.MULTI_GPU, 2)
    assert fsdp.distributed_type == DistributedType.FSDP and fsdp.num_processes == 2
    assert fsdp.fsdp_config["fsdp_version"] == 2 and fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp.fsdp_config["fsdp_offload_params"] is False


def test_the_shipped_run_config_is_notebook_04s_recipe():
    cfg = load_run_config(CONFIGS / "train" / "date_task.yaml")
    profile = get_profile("offline")
    assert cfg.make_recipe(profile) == recipe_for(profile) and cfg.eval_rows == 100 and cfg.quant_storage is None


@pytest.mark.parametrize("text,says", [
    ("output_dir: x\nsteps: 3\n", "unknown key(s) ['steps']"),
    ("recipe: {steps: 3}\n", "output_dir is missing"),
    ("output_dir: x\nquant_storage: int4\n", "quant_storage='int4'"),
    ("output_dir: x\nrecipe: [3]\n", "recipe must be a mapping"),
    ("- output_dir\n", "a mapping of keys to values"),
])
def test_bad_run_configs_say_what_and_how(tmp_path, text, says):
    f = tmp_path / "run.yaml"
    f.write_text(text)
    with pytest.raises(ValueError) as err:
        load_run_config(f)
    assert says in str(err.value)


def test_a_bad_recipe_field_and_a_missing_file_are_refused(tmp_path, capsys):
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"output_dir": str(tmp_path), "recipe": {"stpes": 3}}))
    with pytest.raises(ValueError, match="unknown recipe field"):
        load_run_config(f).make_recipe(get_profile("offline"))
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_launch_is_read_from_torchruns_environment():
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"}
    assert launch_from_env(env) == Launch(world_size=4, rank=3, local_rank=1, local_world_size=2, fsdp=True)
    assert launch_from_env({}) == Launch()


def _gpu(dtype):
    import dataclasses
    return dataclasses.replace(get_profile("offline"), device="cuda", compute_dtype=dtype)   # described, nothing loads


def test_launches_that_cannot_work_are_refused_before_loading():
    cpu = get_profile("offline")
    recipe = recipe_for(cpu).replace(batch_size=8)
    run = RunConfig("out")
    check_launch(run, cpu, recipe, Launch(world_size=2, local_world_size=2), devices=2)            # DDP on 2 cores
    with pytest.raises(ValueError, match="3 processes on this machine but only 2 CPU cores: launch with --num_processes 2"):
        check_launch(run, cpu, recipe, Launch(world_size=3, local_world_size=3), devices=2)
    with pytest.raises(ValueError, match="does not split into 3 equal shares"):
        check_launch(run, cpu, recipe, Launch(world_size=3, local_world_size=3), devices=4)
    with pytest.raises(ValueError, match="asks for FSDP .* on a CPU: transformers' Trainer would train with DDP"):
        check_launch(run, cpu, recipe, Launch(world_size=2, local_world_size=2, fsdp=True), devices=2)
    for dtype, name in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        with pytest.raises(ValueError, match=f"quant_storage equal to the compute dtype \\({name} here\\), got uint8"):
            check_launch(run, _gpu(dtype), recipe, Launch(world_size=2, local_world_size=2, fsdp=True), devices=2)
        with pytest.raises(ValueError, match="got float32"):
            check_launch(RunConfig("out", quant_storage="float32"), _gpu(dtype), recipe,
                         Launch(world_size=2, local_world_size=2, fsdp=True), devices=2)
        check_launch(RunConfig("out", quant_storage=name), _gpu(dtype), recipe,
                     Launch(world_size=2, local_world_size=2, fsdp=True), devices=2)
    with pytest.raises(ValueError, match="but only 2 CUDA GPUs"):
        check_launch(run, _gpu(torch.bfloat16), recipe, Launch(world_size=4, local_world_size=4), devices=2)
