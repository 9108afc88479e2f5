"""The offline profile: a tiny base model, its tokenizer and a task dataset, shipped as fixed bytes.

What it teaches: a QLoRA pipeline does not care how big the model is. Everything the GPU
profile does with a hub model (``AutoTokenizer.from_pretrained``,
``AutoModelForCausalLM.from_pretrained(..., quantization_config=...)``,
``datasets.load_dataset``) works unchanged on a folder in standard Hugging Face format. The kit
ships such a folder, made without any network by :mod:`qlora_helpers.core.tiny_model` (a tokenizer, a
pretrained tiny Llama) with the date task's rows (:mod:`qlora_helpers.core.date_task`).

Fixed bytes, not a per-machine build. Everything is seeded, yet the pretrained weights depend on
the CPU: torch picks different matrix kernels on AVX2, AVX-512 and ARM, their float rounding
differs, and 500 steps of training turn that into a different model (``TROUBLESHOOTING.md``,
"The CPU decides the numbers"). So the kit ships the model it was built with, in
``qlora_helpers/assets/offline-v1/`` with a ``MANIFEST.json`` of SHA-256 hashes, and
:func:`ensure_offline_assets` checks them before anything loads (:mod:`qlora_helpers.core.artifacts`).
The shipped copy was built with AVX2 kernels (``build_report.json`` records how), and
``python -m qlora_helpers.core.tiny_model --build DIR`` still builds a fresh copy and reports which files
differ from the shipped ones on this CPU. On an x86 CPU with AVX2 or better,

    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 DNNL_MAX_CPU_ISA=AVX2 \
        python -m qlora_helpers.core.tiny_model --build /tmp/rebuild

reproduced the shipped bytes on a 2-core AVX-512 Intel Xeon (about 75 s), torch's thread count left
at its default.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .artifacts import verify_manifest

RECIPE_VERSION = "v1"  # bump when anything the builder (qlora_helpers.core.tiny_model) makes changes
# The shipped build (package data, so a pip install from git carries it too).
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets" / f"offline-{RECIPE_VERSION}"
ASSET_FILES = ["model/config.json", "model/generation_config.json", "model/model.safetensors",
               "model/tokenizer.json", "model/tokenizer_config.json", "model/chat_template.jinja",
               "data/train.jsonl", "data/test.jsonl", "build_report.json"]


def cache_root() -> Path:
    """Folder for what the kit makes while it runs (trained adapters, MLflow runs):
    ``$QLORA_KIT_CACHE`` or ``~/.cache/qlora-kit``."""
    return Path(os.environ.get("QLORA_KIT_CACHE", Path.home() / ".cache" / "qlora-kit"))


def project_dir() -> Path:
    """The checkout a notebook writes into (``build/``, ``figures/``): the folder above ``notebooks/`` when the
    working directory is ``notebooks/`` or a language track in it (``notebooks/ko/``), else the working
    directory (a script run from the checkout's top)."""
    cwd = Path.cwd()
    for d in (cwd, cwd.parent):
        if d.name == "notebooks":
            return d.parent
    return cwd


@dataclass(frozen=True)
class OfflineAssets:
    """Where the offline profile lives. Each path loads with the standard library call."""
    root: Path
    model_dir: Path   # AutoModelForCausalLM / AutoTokenizer.from_pretrained(model_dir)
    data_files: dict  # datasets.load_dataset("json", data_files=data_files)
    report: dict      # what the build measured (pretraining loss, sizes, seconds)


def _assets(root: Path) -> OfflineAssets:
    return OfflineAssets(root=root, model_dir=root / "model",
                         data_files={s: str(root / "data" / f"{s}.jsonl") for s in ("train", "test")},
                         report=json.loads((root / "build_report.json").read_text()))


def ensure_offline_assets() -> OfflineAssets:
    """The offline profile's shipped assets, after checking every file's SHA-256.

    Raises:
        qlora_helpers.core.artifacts.ArtifactMismatchError: a file is missing or altered (the message
            names it, both hashes and the fix).
    """
    verify_manifest(ASSETS_DIR, fix=(
        "restore the kit's copy (git checkout -- qlora_helpers/assets, or reinstall the kit). "
        "To make a different base on purpose, build one with python -m qlora_helpers.core.tiny_model "
        "--build DIR; every committed result (notebook outputs, the ablation grid) then needs "
        "re-making"))
    return _assets(ASSETS_DIR)


def main(argv: list[str] | None = None) -> int:
    """Check the shipped offline profile (``python -m qlora_helpers.core.offline``); to rebuild it, see
    :mod:`qlora_helpers.core.tiny_model`."""
    r = ensure_offline_assets().report
    print(f"offline profile ready and verified (SHA-256): {r['n_params']:,} parameters, pretraining "
          f"loss {r['first_loss']:.2f} -> {r['final_loss']:.2f} ({r['seconds']:.0f} s when built)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
