"""The runtime profile: dtype and optimizer rules, profile selection, clear errors."""
import pytest
import torch

from qlora_helpers.core import real_model, runtime
from qlora_helpers.core.runtime import HubUnreachableError, compute_dtype_for, get_profile, optimizer_for


@pytest.mark.parametrize("cap, dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                        ((8, 0), torch.bfloat16), ((8, 9), torch.bfloat16),
                                        ((9, 0), torch.bfloat16)])
def test_compute_dtype_follows_capability_not_is_bf16_supported(cap, dtype, monkeypatch):
    # A T4 answers True to is_bf16_supported() through emulation (TROUBLESHOOTING.md, "bf16 on a T4"); the rule must not ask it.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert compute_dtype_for("cuda", cap) == dtype


def test_the_optimizer_names_are_ones_transformers_builds():
    """One vocabulary: every name of training.OPTIMIZERS (and so every profile's optimizer) is a
    TrainingArguments.optim value, and build_optimizer makes what Trainer makes for it: bitsandbytes' paged
    8-bit AdamW on a GPU, torch's AdamW on the CPU (transformers is the oracle)."""
    import bitsandbytes as bnb
    from transformers import Trainer, TrainingArguments

    from qlora_helpers.core.training import OPTIMIZERS, build_optimizer

    def trainer_builds(name):
        return Trainer.get_optimizer_cls_and_kwargs(TrainingArguments(output_dir="unused", optim=name))
    assert {optimizer_for("cpu"), optimizer_for("cuda")} <= set(OPTIMIZERS)
    param = [torch.nn.Parameter(torch.zeros(4096))]
    for name in OPTIMIZERS:
        cls, kwargs = trainer_builds(name)
        ours = build_optimizer(name, param, lr=1e-3)
        assert isinstance(ours, cls), (name, type(ours), cls)
        if cls is bnb.optim.AdamW:     # transformers builds bitsandbytes' AdamW with these flags
            assert (ours.args.optim_bits, ours.is_paged) == (kwargs["optim_bits"], kwargs.get("is_paged", False)), name
    assert trainer_builds(optimizer_for("cpu"))[0] is torch.optim.AdamW
    cls, kwargs = trainer_builds(optimizer_for("cuda"))
    assert cls is bnb.optim.AdamW and kwargs["is_paged"] and kwargs["optim_bits"] == 8
    with pytest.raises(ValueError, match="'sgd' is not one of the kit's"):
        build_optimizer("sgd", param, lr=1e-3)
    with pytest.raises(ValueError, match="capability"):
        compute_dtype_for("cuda")


def test_default_profile_without_gpu_is_offline(monkeypatch):
    monkeypatch.delenv(runtime.PROFILE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    p = get_profile()
    assert (p.name, p.device, p.compute_dtype, p.optimizer) == ("offline", "cpu", torch.float32, "adamw_torch")


def test_gpu_profile_with_a_t4(monkeypatch):
    monkeypatch.delenv(runtime.PROFILE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Tesla T4")
    p = get_profile()
    assert (p.name, p.gpu_name, p.compute_dtype, p.optimizer) == ("gpu", "Tesla T4", torch.float16, "paged_adamw_8bit")
    assert p.model_source == str(real_model.model_dir())  # the same bytes as on a laptop
    monkeypatch.setenv(runtime.PROFILE_ENV, "offline")  # the variable overrides the GPU default
    assert get_profile().name == "offline"


def test_bad_profile_names_and_missing_gpu(monkeypatch):
    with pytest.raises(ValueError, match="QLORA_KIT_MODEL='gpt2' is not a model of the kit"):
        get_profile("offline", model="gpt2")
    monkeypatch.setenv(runtime.PROFILE_ENV, "colab")
    with pytest.raises(ValueError, match="'colab' is not a profile"):
        get_profile()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*QLORA_KIT_PROFILE=offline"):
        get_profile("gpu")


def test_unreachable_hub_says_how_to_go_offline(monkeypatch):
    # HF_HUB_OFFLINE=1 (conftest) makes any uncached hub id unreachable, as on a machine without network.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Tesla T4")
    p = get_profile("gpu")
    p = type(p)(**{**p.__dict__, "model_source": "qlora-kit-tests/no-such-model"})
    with pytest.raises(HubUnreachableError, match="no-such-model.*QLORA_KIT_PROFILE=offline"):
        runtime.load_tokenizer(p)
    assert runtime.get_profile("gpu").dataset_source == runtime.get_profile("offline").dataset_source  # the date task


def test_doctor_reports_the_decisions(offline_profile, capsys):
    facts = runtime.doctor(offline_profile)
    out = capsys.readouterr().out
    for key in ("torch", "transformers", "peft", "bitsandbytes", "compute dtype", "optimizer", "model"):
        assert key in facts and key in out
    assert facts["compute dtype"] == "float32" and facts["profile"] == "offline"


def test_threads_are_an_explicit_call(monkeypatch):
    """Reading a profile leaves torch alone; use_threads sets it ($QLORA_KIT_THREADS, else 1 for the
    tiny model and the machine's cores for the real one)."""
    import torch

    from qlora_helpers.core.runtime import THREADS_ENV, get_profile, use_threads
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv(THREADS_ENV, raising=False)
        profile = get_profile("offline", model="tiny")
        assert torch.get_num_threads() == 2
        assert use_threads(profile) == 1 == torch.get_num_threads()
        assert use_threads(get_profile("offline", model="smollm2")) == __import__("os").cpu_count()
        monkeypatch.setenv(THREADS_ENV, "2")
        assert use_threads(profile) == 2
        monkeypatch.setenv(THREADS_ENV, "two")
        with pytest.raises(ValueError, match="QLORA_KIT_THREADS='two' must be a positive integer"):
            use_threads(profile)
    finally:
        torch.set_num_threads(before)


def test_hub_models_need_the_gpu_profile(monkeypatch):
    with pytest.raises(ValueError, match="qwen2.5-7b.*Qwen/Qwen2.5-7B-Instruct.*QLORA_KIT_PROFILE=gpu"):
        get_profile("offline", model="qwen2.5-7b")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Tesla T4")
    p = get_profile("gpu", model="smollm2-1.7b")
    assert (p.model, p.model_source) == ("smollm2-1.7b", "HuggingFaceTB/SmolLM2-1.7B-Instruct")
    with pytest.raises(HubUnreachableError, match="SmolLM2-1.7B-Instruct"):   # HF_HUB_OFFLINE=1 (conftest)
        runtime.load_tokenizer(p)


def test_opt_in_models_names_the_bad_one(monkeypatch):
    monkeypatch.setenv(runtime.BIG_MODELS_ENV, "qwen2.5-7b,llama-9000")
    with pytest.raises(ValueError, match="'llama-9000' not known.*qwen2.5-1.5b"):
        runtime.opt_in_models()
    monkeypatch.setenv(runtime.CAPSTONE_ENV, " qwen2.5-7b ")
    assert runtime.opt_in_models(runtime.CAPSTONE_ENV) == ["qwen2.5-7b"]


def test_a_cpu_process_quantizes_once_and_hands_out_independent_copies(offline_profile, monkeypatch, tmp_path):
    """load_model keeps one quantized model per (files, dtype, 4-bit config) and returns deep copies: the
    copies hold the bytes a fresh from_pretrained quantizes (the oracle), share no storage, point each
    4-bit weight at its own layer (bitsandbytes' Params4bit.__deepcopy__ does not), and a changed model
    file is quantized again, not served stale."""
    import os
    import shutil
    from dataclasses import replace as dc_replace

    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    src = tmp_path / "model"
    shutil.copytree(offline_profile.model_source, src)
    profile = dc_replace(offline_profile, model_source=str(src))
    monkeypatch.setattr(runtime, "_ensure_local", lambda p: None)   # a copy of the checked files
    calls = []
    real = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    a = runtime.load_model(profile)
    b = runtime.load_model(profile)
    assert len(calls) == 1, "the second load quantized again"
    fresh = real(str(src), dtype=profile.compute_dtype, quantization_config=profile.bnb_config())
    want = fresh.state_dict()
    for m in (a, b):
        got = m.state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    layers = {n: m for n, m in b.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert layers and all(m.weight.module is m and m.quant_state is m.weight.quant_state for m in layers.values())
    name = next(iter(layers))
    dict(a.named_modules())[name].weight.data.zero_()              # a copy changed in place ...
    c = runtime.load_model(profile)
    assert torch.equal(dict(c.named_modules())[name].weight.data, dict(fresh.named_modules())[name].weight.data)
    assert dict(c.named_modules())[name].weight.data_ptr() != layers[name].weight.data_ptr()   # ... reaches no other
    weights = next(src.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    runtime.load_model(profile)
    assert len(calls) == 2, "a changed model file must be quantized again"
    runtime.load_model(profile, double_quant=False)
    assert len(calls) == 3, "another 4-bit config is another entry"
