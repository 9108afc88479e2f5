"""The offline profile is a real pipeline: standard files, a pretrained base, a learnable task."""
import json
import random

import bitsandbytes as bnb
import torch

from qlora_helpers.core import date_task, offline, tiny_model
from qlora_helpers.core.runtime import load_model, load_task_dataset, load_tokenizer


def test_assets_are_standard_hf_files(assets):
    names = {p.name for p in assets.model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    cfg = json.loads((assets.model_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    # widths are multiples of 64 (qlora_helpers.core.cpu_layout: the CPU repack needs out_features % 32 == 0)
    assert all(cfg[k] % 64 == 0 for k in ("hidden_size", "intermediate_size", "vocab_size"))


def test_base_model_is_pretrained_not_random(assets, offline_profile):
    """Loss of the saved model on held-out English text is far below a uniform guess. Held out:
    the json module's documentation, which is not in the pretraining corpus (checked here)."""
    import json as json_module
    tok = load_tokenizer(offline_profile)
    model = load_model(offline_profile, quantized=False)
    text = json_module.__doc__
    corpus = " ".join(tiny_model.pretraining_text())
    assert not any(line.strip() in corpus for line in text.splitlines() if len(line.strip()) > 30)
    ids = tok(text, return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    untrained = AutoModelForCausalLM.from_config(model.config)   # the same architecture, random weights
    with torch.no_grad():
        random_loss = untrained(input_ids=ids, labels=ids).loss.item()
    # measured: 5.94 (pretrained) against 7.6 (random, about ln 2048 = 7.62): at least 1 nat apart
    assert loss < random_loss - 1.0, (loss, random_loss)
    assert assets.report["final_loss"] < assets.report["first_loss"] - 3


def test_four_bit_load_through_bitsandbytes_config(offline_profile):
    model = load_model(offline_profile)
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, bnb.nn.Linear4bit))}
    assert kinds.pop("lm_head") is torch.nn.Linear
    assert kinds and all(k is bnb.nn.Linear4bit for k in kinds.values())
    qs = model.model.layers[0].mlp.up_proj.weight.quant_state
    assert qs.quant_type == "nf4" and qs.nested and qs.blocksize == 64


def test_tokenizer_chat_template_and_special_tokens(offline_profile):
    tok = load_tokenizer(offline_profile)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id != tok.eos_token_id
    assert tok.tokenize("2024") == ["2", "0", "2", "4"]          # digits split as in Llama


def test_task_splits_are_disjoint_and_correct(assets, offline_profile):
    ds = load_task_dataset(offline_profile)
    assert (len(ds["train"]), len(ds["test"])) == (2000, 200)
    assert not set(ds["train"]["answer"]) & set(ds["test"]["answer"])
    for row in ds["test"]:
        iso = next(w.strip(".?()") for w in row["prompt"].split() if w.count("-") == 2)
        y, m, d = iso.split("-")
        assert row["answer"] == f"{d}/{m}/{y}" and row["messages"][1]["content"] == row["answer"]


def test_test_dates_never_appear_in_pretraining_text():
    splits = date_task.make_task_splits()
    test = {r["answer"] for r in splits["test"]}
    text = " ".join(tiny_model.pretraining_text(exclude=test))
    assert not any(a in text for a in test)
    assert sum(a in text for a in (r["answer"] for r in splits["train"][:200])) > 0  # the check can fire


def test_task_generation_is_deterministic():
    a, b = date_task.make_task_splits(n_train=50, n_test=10), date_task.make_task_splits(n_train=50, n_test=10)
    assert a == b
    assert date_task.make_task_example(random.Random(0)) == date_task.make_task_example(random.Random(0))


def test_shipped_assets_are_verified_fixed_bytes(assets):
    """The model the committed results were made with is shipped, and every file is checked."""
    from qlora_helpers.core.artifacts import verify_manifest
    hashes = verify_manifest(offline.ASSETS_DIR)
    assert sorted(hashes) == sorted(offline.ASSET_FILES)
    assert assets.root == offline.ASSETS_DIR and assets.model_dir == offline.ASSETS_DIR / "model"


def _copy_assets(tmp_path, monkeypatch):
    import shutil
    copy = tmp_path / "offline-v1"
    shutil.copytree(offline.ASSETS_DIR, copy)
    monkeypatch.setattr(offline, "ASSETS_DIR", copy)
    return copy


def test_altered_model_file_is_a_clear_error(tmp_path, monkeypatch):
    import pytest

    from qlora_helpers.core.artifacts import ArtifactMismatchError, sha256_file
    copy = _copy_assets(tmp_path, monkeypatch)
    offline.ensure_offline_assets()                       # the copy itself is fine
    f = copy / "model" / "model.safetensors"
    want = sha256_file(f)
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01                                      # one bit of one weight
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactMismatchError) as err:
        offline.ensure_offline_assets()
    msg = str(err.value)
    assert "model.safetensors" in msg and want in msg and sha256_file(f) in msg
    assert "git checkout -- qlora_helpers/assets" in msg


def test_missing_file_is_a_clear_error(tmp_path, monkeypatch):
    import pytest

    from qlora_helpers.core.artifacts import ArtifactMismatchError
    copy = _copy_assets(tmp_path, monkeypatch)
    (copy / "data" / "test.jsonl").unlink()
    with pytest.raises(ArtifactMismatchError, match="test.jsonl is missing"):
        offline.ensure_offline_assets()


def test_builder_still_runs_and_reports_what_differs(tmp_path):
    """The builder is the documented way to a new base: a 2-step build here (the real one is 500)
    makes the same task data (pure Python, any CPU) and a different model, and says so."""
    differ = tiny_model.build_offline_assets_checked(tmp_path / "b", log=lambda *_: None, pretrain_steps=2)
    assert "model/model.safetensors" in differ
    assert not {"data/train.jsonl", "data/test.jsonl"} & set(differ)


def test_batched_generation_equals_one_by_one(offline_profile):
    """Left padding must not change greedy answers (a wrong padding side would)."""
    from qlora_helpers.core.evaluation import exact_match, generate_answers
    tok, model = load_tokenizer(offline_profile), load_model(offline_profile, quantized=False)
    prompts = [r["prompt"] for r in date_task.make_task_splits(n_train=0, n_test=6)["test"]]
    batched = generate_answers(model, tok, prompts, max_new_tokens=8, batch_size=6)
    single = [generate_answers(model, tok, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == single and tok.padding_side == "right"
    import pytest
    with pytest.raises(ValueError, match="at least one row"):
        exact_match(model, tok, [])


def test_package_data_ships_every_asset():
    """A pip install (Colab's setup cell) must carry the model: every manifest file is matched by
    a package-data pattern in pyproject.toml (setuptools globs do not cross '/')."""
    import fnmatch
    from pathlib import Path

    import tomllib
    root = Path(offline.__file__).resolve().parent.parent   # the package (offline lives in core/)
    patterns = tomllib.loads((root.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["qlora_helpers"]
    rel = offline.ASSETS_DIR.relative_to(root)
    for f in offline.ASSET_FILES + ["MANIFEST.json"]:
        path = str(rel / f)
        assert any(fnmatch.fnmatch(path, p) and path.count("/") == p.count("/") for p in patterns), path


def test_every_subpackage_is_installed():
    """A pip install (not editable) carries only the packages pyproject.toml finds: every folder of
    qlora_helpers with Python files must be one of them (qlora_helpers.exercises was once left out)."""
    from pathlib import Path

    import tomllib
    from setuptools import find_packages
    root = Path(offline.__file__).resolve().parent.parent   # the package (offline lives in core/)
    find = tomllib.loads((root.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    found = set(find_packages(str(root.parent), include=find["include"]))
    folders = {".".join(p.parent.relative_to(root.parent).parts) for p in root.rglob("*.py")}
    assert folders <= found, sorted(folders - found)
