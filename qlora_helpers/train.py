"""Notebook 04's recipe as a command, on one process or on many: ``python -m qlora_helpers.train --config FILE``,
and the same command under ``accelerate launch`` (DDP or FSDP on several GPUs; DDP on CPU cores).

What it teaches (notebook ``09_scale_out``): a launcher starts N copies of one script; each copy learns
its place from the environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, which ``torchrun`` sets),
loads the model onto its own device and trains on its share of every batch; ``Trainer`` (through
accelerate) wraps the model in DistributedDataParallel, which averages the gradients, or in FSDP,
which also shards the weights and optimizer states. Nothing else changes: the run is
:func:`qlora_helpers.sft.run_sft`, the recipe is :class:`qlora_helpers.core.recipe.Recipe`, the adapter
is saved by :func:`qlora_helpers.adapters.save_adapter`, the same code notebook 04 runs.

The global batch stays the recipe's ``batch_size``: each of N processes takes ``batch_size / N`` rows,
so one step sees the same rows as a single process (accelerate hands the batches of one sampler out
in turn), and ``Trainer`` divides the loss by the label tokens of all processes together
(``average_tokens_across_devices``), so the averaged gradient is the single process's gradient up to
the order of float additions (notebook 09 measures it).

Checked before any model loads (:func:`check_launch`), each with the value and the fix: more
processes than devices; a batch that does not split evenly; FSDP asked of a CPU (``Trainer`` would run
DDP instead, silently: measured with accelerate 1.15); FSDP with 4-bit codes stored as uint8 (FSDP
shards floating-point parameters: FSDP2 refuses integer ones, FSDP1 wants one dtype per flat parameter).

Production code it drives: ``accelerate launch`` (accelerate 1.15), ``transformers.Trainer`` 5.23, PEFT,
bitsandbytes. The shipped configs are ``qlora_helpers/configs/accelerate/*.yaml`` and ``qlora_helpers/configs/train/*.yaml``
(``docs/scale_out.md`` explains them line by line).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from .core.recipe import Recipe, recipe_for
from .core.runtime import THREADS_ENV, get_profile, use_threads
from .sft import run_sft

__all__ = ["CONFIGS", "SUMMARY_FILE", "RunConfig", "load_run_config", "Launch", "launch_from_env", "check_launch", "train", "main"]

SUMMARY_FILE = "train_summary.json"
CONFIGS = Path(__file__).parent / "configs"    # accelerate/{single_gpu,ddp,fsdp_qlora}.yaml, train/date_task.yaml
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}


@dataclass(frozen=True)
class RunConfig:
    """One training run, as a config file describes it (YAML or JSON).

    Attributes:
        profile: "offline" (CPU) or "gpu"; None: the active profile (``$QLORA_KIT_PROFILE``).
        model: a model of the kit ("smollm2", ...); None: the profile's.
        recipe: changes to the profile's recipe (:meth:`Recipe.replace`), e.g. ``{"steps": 30}``.
        output_dir: Trainer's folder; the summary (``train_summary.json``) goes there too.
        adapter_dir: where the adapter is saved (default ``output_dir/adapter``).
        eval_rows: held-out rows for exact match before and after, on the first process (0: none).
        quant_storage: the dtype of the stored 4-bit codes: None (uint8), or the compute dtype for FSDP.
    """
    output_dir: str
    profile: str | None = None
    model: str | None = None
    recipe: dict = field(default_factory=dict)
    adapter_dir: str | None = None
    eval_rows: int = 100
    quant_storage: str | None = None

    def make_recipe(self, profile) -> Recipe:
        """The profile's recipe with this config's changes (unknown fields and bad values: ValueError)."""
        return recipe_for(profile).replace(**self.recipe)


def load_run_config(path: str | Path) -> RunConfig:
    """Read a run config (YAML, or JSON, which is YAML); relative folders are taken from the working directory.

    Raises:
        FileNotFoundError: no such file. ValueError: not a mapping, unknown keys (the message lists the
        known ones), or a value of the wrong kind.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run config {str(path)!r} does not exist; the shipped ones are in {CONFIGS / 'train'}")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a run config is a mapping of keys to values, got {type(data).__name__}")
    known = set(RunConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; a run config knows {sorted(known)}")
    if "output_dir" not in data:
        raise ValueError(f"{path}: output_dir is missing (where the run writes its checkpoints and summary)")
    if not isinstance(data.get("recipe", {}), dict):
        raise ValueError(f"{path}: recipe must be a mapping of recipe fields, e.g. {{steps: 30}}, got {data['recipe']!r}")
    storage = data.get("quant_storage")
    if storage is not None and storage not in _DTYPES:
        raise ValueError(f"{path}: quant_storage={storage!r}; use one of {sorted(_DTYPES)} or leave it out (uint8)")
    return RunConfig(**data)


@dataclass(frozen=True)
class Launch:
    """Where this process stands in a launch: from the environment ``torchrun`` (``accelerate launch``) sets."""
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1
    fsdp: bool = False           # accelerate's config asked for FSDP (ACCELERATE_USE_FSDP)


def launch_from_env(env=None) -> Launch:
    """This process's :class:`Launch`, read from ``env`` (default ``os.environ``)."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", 1))
    return Launch(world_size=world, rank=int(env.get("RANK", 0)), local_rank=int(env.get("LOCAL_RANK", 0)),
                  local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
                  fsdp=env.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"))


def check_launch(config: RunConfig, profile, recipe: Recipe, launch: Launch, devices: int | None = None) -> None:
    """Refuse a launch that cannot work, before any model loads; each error names the value and the fix.

    Args:
        devices: how many devices this machine has for the processes (default: CUDA GPUs on a GPU
            profile, CPU cores on the CPU).

    >>> from qlora_helpers.core.runtime import get_profile
    >>> cpu = get_profile("offline")
    >>> check_launch(RunConfig("out"), cpu, recipe_for(cpu).replace(batch_size=8), Launch(world_size=3), devices=4)
    Traceback (most recent call last):
    ValueError: the recipe's batch_size 8 (the global batch, all processes together) does not split into 3 equal shares: launch with a number of processes that divides 8, or set recipe: {batch_size: ...} in the run config
    """
    if devices is None:
        devices = torch.cuda.device_count() if profile.device == "cuda" else (os.cpu_count() or 1)
    kind = "CUDA GPUs" if profile.device == "cuda" else "CPU cores"
    if launch.local_world_size > devices:
        raise ValueError(f"{launch.local_world_size} processes on this machine but only {devices} {kind}: launch with "
                         f"--num_processes {devices} or fewer (each process needs a device of its own)")
    if recipe.batch_size % launch.world_size:
        raise ValueError(f"the recipe's batch_size {recipe.batch_size} (the global batch, all processes together) does "
                         f"not split into {launch.world_size} equal shares: launch with a number of processes that "
                         f"divides {recipe.batch_size}, or set recipe: {{batch_size: ...}} in the run config")
    if not launch.fsdp:
        return
    if profile.device != "cuda":
        raise ValueError("the accelerate config asks for FSDP (ACCELERATE_USE_FSDP=true) on a CPU: transformers' Trainer "
                         "would train with DDP instead and say nothing (accelerate 1.15: the model comes back as "
                         "DistributedDataParallel, every parameter whole), and accelerate's FSDP1 refuses a CPU. On a CPU "
                         "launch with qlora_helpers/configs/accelerate/ddp.yaml; FSDP needs CUDA GPUs")
    storage = _DTYPES.get(config.quant_storage or "uint8")
    compute = str(profile.compute_dtype).removeprefix("torch.")
    if storage != profile.compute_dtype:
        raise ValueError(f"FSDP-QLoRA needs quant_storage equal to the compute dtype ({compute} "
                         f"here), got {config.quant_storage or 'uint8 (the default)'}: FSDP shards floating-point "
                         f"parameters, and 4-bit codes stored as uint8 fail ('Integer parameters are unsupported' in "
                         f"FSDP2, 'FlatParameter requires uniform dtype' in FSDP1). Set quant_storage: "
                         f"{compute} in the run config")


def train(config: RunConfig, launch: Launch | None = None, log=print) -> dict:
    """Run ``config`` in this process: the checks, then :func:`qlora_helpers.sft.run_sft` with this process's
    share of the batch; the first process saves the adapter and writes ``train_summary.json``.

    Returns:
        :func:`run_sft`'s dict, plus ``recipe`` (the fields) and ``launch`` (world size, FSDP asked).
    """
    launch = launch or launch_from_env()
    profile = get_profile(config.profile, model=config.model)
    recipe = config.make_recipe(profile)
    check_launch(config, profile, recipe, launch)
    if profile.device == "cpu" and THREADS_ENV not in os.environ:    # share the cores between the processes
        os.environ[THREADS_ENV] = str(max(1, (os.cpu_count() or 1) // launch.local_world_size))
    use_threads(profile)
    out = Path(config.output_dir)
    adapter_dir = Path(config.adapter_dir) if config.adapter_dir else out / "adapter"
    first = launch.rank == 0
    result = run_sft(profile, str(out), recipe, n_test=config.eval_rows if first else 0,
                     log=log if first else (lambda *a: None), adapter_dir=adapter_dir,
                     quant_storage=_DTYPES[config.quant_storage] if config.quant_storage else None,
                     per_device_train_batch_size=recipe.batch_size // launch.world_size,
                     ddp_find_unused_parameters=False, logging_steps=1, disable_tqdm=True)
    result.update(recipe=recipe.as_dict(), launch={"world_size": launch.world_size, "fsdp": launch.fsdp})
    if first:
        out.mkdir(parents=True, exist_ok=True)
        (out / SUMMARY_FILE).write_text(json.dumps(result, indent=1))
        log(f"{launch.world_size} process(es), {result['wrapped']}: losses {[round(x, 4) for x in result['losses']]}; "
            f"adapter in {adapter_dir}")
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m qlora_helpers.train --config FILE``; exit status 2 with the reason on a bad config or launch."""
    ap = argparse.ArgumentParser(prog="python -m qlora_helpers.train",
                                 description="Notebook 04's QLoRA recipe as a command; run it under accelerate launch "
                                             "for several processes (qlora_helpers/configs/accelerate/).")
    ap.add_argument("--config", required=True, help="a run config, e.g. qlora_helpers/configs/train/date_task.yaml")
    args = ap.parse_args(argv)
    try:
        train(load_run_config(args.config))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
