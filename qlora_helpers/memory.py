"""Where the memory of a fine-tuning run goes, and whether a model will fit on a GPU.

What it teaches (notebook ``03_double_quant_memory``):

1. Exact parameter counts from a Hugging Face config, with no weights and no download:
   ``AutoModelForCausalLM.from_config`` under ``torch.device("meta")`` (:func:`count_params`).
2. A memory plan per component (:func:`estimate_memory`) for full fine-tuning (fp32, mixed
   precision), 16-bit LoRA and QLoRA (NF4 with and without double quantization): weights,
   quantization constants, LoRA parameters, their gradients, optimizer states (32-bit, 8-bit,
   paged), activations, and an allowance for the CUDA context and fragmentation.
3. "Will it fit?": ``python -m qlora_helpers.memory llama-2-7b --gpu t4`` and :func:`will_it_fit`.

Paper: QLoRA, Dettmers et al. 2023, arXiv:2305.14314 (section 3: NF4, double quantization, paged
optimizers; figure 6 / appendix: memory footprint). Activations: Korthikanti et al. 2022,
arXiv:2205.05198 (34·s·b·h bytes per layer in 16 bit). Optimizer accounting: ZeRO, Rajbhandari et
al. 2019, arXiv:1910.02054 (16 bytes per parameter for mixed-precision Adam).

Production code it is checked against: transformers' model classes (parameter counts),
bitsandbytes' ``Linear4bit`` quant states (weights and constants, to the byte, in
:mod:`qlora_helpers.double_quant`), ``torch.optim.AdamW`` and ``bitsandbytes.optim.AdamW8bit`` /
``PagedAdamW8bit`` states after one step (the notebook and ``tests/test_memory.py``).

Assumptions, each a named argument or constant (the notebook lists them again):

A1 weights: full fine-tuning keeps fp32 weights (``full_fp32``) or bf16 weights plus an fp32 master
   copy (``full_mixed``, ZeRO's 2 + 4 bytes); LoRA keeps the base in bf16 (2 bytes); QLoRA keeps every
   ``nn.Linear`` except ``lm_head`` in NF4 (exact bytes per layer), the rest (embeddings, norms,
   lm_head) in fp32, because ``prepare_model_for_kbit_training`` upcasts them (``upcast_non_quantized``).
A2 LoRA: ``r * (in + out)`` parameters per targeted linear layer, kept in fp32 (PEFT upcasts adapters
   of a 16-bit base), gradients fp32 (4 bytes each).
A3 optimizer: AdamW 32-bit = two fp32 states (8 bytes per trainable parameter) plus a 4-byte step
   tensor per parameter tensor (torch). 8-bit (bitsandbytes): two uint8 states plus one fp32 absmax
   per 256 values per state for tensors of >= 4096 values; smaller tensors get 32-bit states
   (``min_8bit_size``); two 256-entry fp32 maps per optimizer. Paged: the same bytes, in CUDA unified
   memory, so on a spike they are evicted to CPU RAM instead of failing (counted on the GPU here).
A4 activations (16-bit, flash/SDPA attention, no s^2 term): 34·s·b·h bytes per layer without
   gradient checkpointing (arXiv:2205.05198, table 2); with checkpointing, one 16-bit layer input per
   layer (2·s·b·h) plus one layer recomputed at a time (34·s·b·h); plus the logits in fp32 for the
   loss (4·s·b·V). A GPT-style 4h MLP is assumed; Llama's SwiGLU (~2.7h, three matrices) is close.
A5 overhead: ``cuda_context_gib`` (0.5 GiB: CUDA context and cuBLAS workspace, outside
   ``torch.cuda.max_memory_allocated``) plus ``fragmentation`` (10% of everything else: the caching
   allocator's reserved-but-unused blocks).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from .core.recipe import KIT_SFT, check_rank
from .core.runtime import HUB_MODELS
from .core.training import OPTIMIZERS
from .double_quant import storage_bytes
from .lora import find_targets
from .nf4 import DEFAULT_BLOCKSIZE

__all__ = [
    "KNOWN_CONFIGS", "PUBLISHED_PARAMS", "GPUS", "ONLINE_TABLE_GB", "METHODS",
    "load_config", "count_params", "linear_shapes", "lora_shapes", "nf4_bytes",
    "optimizer_state_bytes", "activation_bytes", "MemoryEstimate", "estimate_memory", "Fit", "will_it_fit",
    "STRATEGIES", "shard_estimate", "main",
]

GiB = 1024 ** 3
GB = 1000 ** 3

_LLAMA = {"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
_QWEN2 = {"model_type": "qwen2", "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
          "rope_theta": 1000000.0}   # Qwen2: q/k/v projections carry a bias (transformers' Qwen2Attention)
KNOWN_CONFIGS: dict[str, dict] = {   # the published config.json values that decide the size
    "llama-2-7b": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                   "max_position_embeddings": 4096},
    "llama-2-13b": {**_LLAMA, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                    "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000,
                    "max_position_embeddings": 4096},
    "llama-33b": {**_LLAMA, "hidden_size": 6656, "intermediate_size": 17920, "num_hidden_layers": 60,
                  "num_attention_heads": 52, "num_key_value_heads": 52, "vocab_size": 32000,
                  "max_position_embeddings": 2048, "rms_norm_eps": 1e-6},
    "llama-65b": {**_LLAMA, "hidden_size": 8192, "intermediate_size": 22016, "num_hidden_layers": 80,
                  "num_attention_heads": 64, "num_key_value_heads": 64, "vocab_size": 32000,
                  "max_position_embeddings": 2048, "rms_norm_eps": 1e-6},
    "llama-2-70b": {**_LLAMA, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000,
                    "max_position_embeddings": 4096},
    "llama-3-8b": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                   "max_position_embeddings": 8192, "rope_theta": 500000.0},
    # The course's model and the opt-in GPU models (qlora_helpers.core.runtime.HUB_MODELS, same names).
    "smollm2-135m": {**_LLAMA, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                     "max_position_embeddings": 8192, "tie_word_embeddings": True},
    "smollm2-1.7b": {**_LLAMA, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                     "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 49152,
                     "max_position_embeddings": 8192, "tie_word_embeddings": True},
    "qwen2.5-1.5b": {**_QWEN2, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True},
    "qwen2.5-7b": {**_QWEN2, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "tie_word_embeddings": False},
}
KNOWN_CONFIGS["smollm2-hub"] = KNOWN_CONFIGS["smollm2-135m"]   # the same model, the hub's bf16 weights
PUBLISHED_PARAMS = {   # the Hub's own count: safetensors metadata (bf16 bytes / 2), or the model card
    "llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-33b": 32_528_943_616,
    "llama-65b": 65_285_660_672, "llama-2-70b": 68_976_648_192, "llama-3-8b": 8_030_261_248,
    "smollm2-135m": 134_515_008, "smollm2-hub": 134_515_008,
    "smollm2-1.7b": 1_711_376_384,   # model.safetensors: 3,422,777,952 bytes = 2 x this + a 25,184-byte header
    "qwen2.5-1.5b": 1_543_714_304,   # safetensors total (model card: "1.54B, 1.31B non-embedding")
    "qwen2.5-7b": 7_615_616_512,     # model.safetensors.index.json: "total_size": 15231233024 (bf16)
}
GPUS = {   # memory.total as nvidia-smi reports it on each card (MiB); the CUDA context comes out of it (A5)
    "t4": 15360 * 2 ** 20,          # Colab's free GPU
    "l4": 23034 * 2 ** 20,          # Colab
    "a10": 23028 * 2 ** 20,         # 24 GB class (NVML total 24,146,608,128 bytes)
    "rtx-4090": 24564 * 2 ** 20,    # 24 GB consumer card (the paper: 33B on 24 GB)
    "a100-40gb": 40960 * 2 ** 20,   # Colab
    "l40s": 46068 * 2 ** 20,        # 48 GB class, ECC on
    "rtx-a6000": 49140 * 2 ** 20,   # 48 GB class (the paper's headline: 65B on one 48 GB GPU)
    "a100-80gb": 81920 * 2 ** 20,
    "h100-80gb": 81559 * 2 ** 20,
}
ONLINE_TABLE_GB = {   # the table learners meet online: full / 16-bit LoRA / QLoRA, in GB
    "7B": (120, 16, 6), "13B": (240, 32, 12), "30B": (600, 64, 24), "65B": (1200, 160, 48), "70B": (1200, 160, 48),
}
METHODS = ("full_fp32", "full_mixed", "lora16", "qlora", "qlora_no_dq")


# ---------------------------------------------------------------------------------------------
# 1. Configs and exact parameter counts
# ---------------------------------------------------------------------------------------------
def _from_dict(d: dict):
    d = dict(d)
    model_type = d.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"a config dict needs a 'model_type' (e.g. 'llama'), got keys {sorted(d)}")
    try:
        return AutoConfig.for_model(model_type, **d)
    except ValueError as err:
        raise ValueError(f"unknown architecture model_type={model_type!r}: transformers does not know it "
                         f"({err.__class__.__name__}). Use a model_type from transformers' CONFIG_MAPPING, "
                         f"e.g. 'llama', 'qwen2', 'mistral'") from None


def load_config(config):
    """A ``PretrainedConfig`` from a dict (with ``model_type``), a config object, a known name
    (``"llama-2-7b"``, see :data:`KNOWN_CONFIGS`), a hub id (those of
    :data:`qlora_helpers.core.runtime.HUB_MODELS` offline; any other through ``AutoConfig``, which needs
    the Hub), or a path to ``config.json`` or its folder.

    Raises:
        FileNotFoundError: a path that does not exist. ValueError: an unknown architecture.
    """
    if isinstance(config, PretrainedConfig):
        return config
    if isinstance(config, dict):
        return _from_dict(config)
    if isinstance(config, str) and config.lower() in KNOWN_CONFIGS:
        return _from_dict(KNOWN_CONFIGS[config.lower()])
    if config in HUB_MODELS.values():                       # a hub id the kit knows: no download
        return _from_dict(KNOWN_CONFIGS[next(k for k, v in HUB_MODELS.items() if v == config)])
    path = Path(config)
    if not path.exists():
        if isinstance(config, str) and config.count("/") == 1 and not config.startswith((".", "/")):
            try:                                            # a hub id: only its config.json is fetched
                return AutoConfig.from_pretrained(config)
            except OSError as err:
                raise FileNotFoundError(
                    f"could not read the config of hub model {config!r} ({type(err).__name__}: the Hub is "
                    f"unreachable, or HF_HUB_OFFLINE=1 is set, as in the offline profile). Download its config.json elsewhere and pass its "
                    f"path, or use a known name: {', '.join(KNOWN_CONFIGS)}") from None
        raise FileNotFoundError(f"config {str(config)!r} is neither a file/folder that exists nor a known "
                                f"name; pass a path to a config.json (or its folder) or one of "
                                f"{', '.join(KNOWN_CONFIGS)}")
    if path.is_file():
        return _from_dict(json.loads(path.read_text()))
    return AutoConfig.from_pretrained(str(path))


@functools.lru_cache(maxsize=32)
def _meta_model(config_json: str):
    """The model of a config on the meta device: shapes and names, no memory, no download."""
    cfg = _from_dict(json.loads(config_json))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


@functools.lru_cache(maxsize=32)
def _meta_model_facts(config_json: str) -> tuple[int, tuple]:
    model = _meta_model(config_json)
    total = sum(p.numel() for p in model.parameters())                 # tied weights appear once
    linears = tuple((name, m.in_features, m.out_features) for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear))
    return total, linears


def _key(config) -> str:
    cfg = load_config(config)
    return json.dumps(cfg.to_dict(), sort_keys=True, default=str)


def count_params(config) -> int:
    """Exact parameter count, tied embeddings counted once. Builds the model on the meta device
    (no memory, no download).

    >>> count_params("llama-2-7b")  # the published "7B"
    6738415616

    Args:
        config: anything :func:`load_config` accepts.
    Returns:
        the number of parameters.
    """
    return _meta_model_facts(_key(config))[0]


def linear_shapes(config) -> list[tuple[str, int, int]]:
    """``(name, in_features, out_features)`` of every ``nn.Linear``, ``lm_head`` included."""
    return list(_meta_model_facts(_key(config))[1])


def lora_shapes(config, r: int, target_modules="all-linear") -> list[tuple[int, int]]:
    """Shapes of the LoRA tensors: ``(r, in)`` for A and ``(out, r)`` for B per targeted layer.

    Args:
        config: anything :func:`load_config` accepts.
        r: the LoRA rank, > 0.
        target_modules: as PEFT and :func:`qlora_helpers.lora.find_targets` read it (the same
            function decides): ``"all-linear"`` (every linear but the output head), a list of
            names such as ``["q_proj", "v_proj"]``, or a regex over the full module name.
    Returns:
        list of 2-tuples, two per targeted layer.
    """
    check_rank(r)
    model = _meta_model(_key(config))
    modules = dict(model.named_modules())
    out = []
    for name in find_targets(model, target_modules):  # ValueError naming the target if none match
        lin = modules[name]
        out += [(r, lin.in_features), (lin.out_features, r)]
    return out


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


# ---------------------------------------------------------------------------------------------
# 2. Components
# ---------------------------------------------------------------------------------------------
def nf4_bytes(config, double_quant: bool = True, blocksize: int = DEFAULT_BLOCKSIZE) -> dict[str, int]:
    """Exact bytes of the NF4 layers (every linear but lm_head), split into codes and constants.

    Returns:
        ``{"weights": packed bytes, "constants": absmax (+ DQ scales, code map, offset, NF4 table),
        "n_quantized": weights quantized, "n_layers": layers}``.
    """
    weights = constants = n_quant = n_layers = 0
    for name, fan_in, fan_out in linear_shapes(config):
        if name.rsplit(".", 1)[-1] == "lm_head":
            continue                                                   # kept in 16/32 bit
        parts = storage_bytes(fan_in * fan_out, blocksize, double_quant)
        weights += parts.pop("packed")                                 # ceil(n/2) bytes
        constants += sum(parts.values())                               # absmax, absmax2, code2, offset, code
        n_quant += fan_in * fan_out
        n_layers += 1
    return {"weights": weights, "constants": constants, "n_quantized": n_quant, "n_layers": n_layers}


def optimizer_state_bytes(shapes, optimizer: str = "adamw_torch", min_8bit_size: int = 4096) -> int:
    """Bytes of the optimizer state for trainable tensors of ``shapes`` (assumption A3).

    Args:
        shapes: list of tensor shapes (tuples).
        optimizer: "adamw_torch", "adamw_8bit" or "paged_adamw_8bit" (bitsandbytes): TrainingArguments.optim names.
        min_8bit_size: bitsandbytes keeps 32-bit states for tensors smaller than this.
    Returns:
        bytes, exact for torch AdamW and bitsandbytes' 8-bit AdamW after the first step.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {optimizer!r}")
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if optimizer == "adamw_torch":
            total += 2 * 4 * n + 4                                     # exp_avg + exp_avg_sq fp32, step fp32
        elif n < min_8bit_size:
            total += 2 * 4 * n                                         # small tensor: 32-bit states, int step
        else:
            total += 2 * n + 2 * 4 * -(-n // 256)                      # 2 uint8 states + fp32 absmax per 256
    if optimizer != "adamw_torch":
        total += 2 * 256 * 4                                           # the two 256-entry maps, once
    return total


def activation_bytes(config, batch_size: int, seq_len: int, gradient_checkpointing: bool = True) -> int:
    """Activations kept for the backward pass (assumption A4), bytes.

    Args:
        config: anything :func:`load_config` accepts.
        batch_size, seq_len: b and s, > 0.
        gradient_checkpointing: keep only each layer's input and recompute one layer at a time.
    Returns:
        bytes: layers * 34·s·b·h (or layers * 2·s·b·h + 34·s·b·h) + 4·s·b·V for fp32 logits.
    """
    _check_positive("batch_size", batch_size)
    _check_positive("seq_len", seq_len)
    cfg = load_config(config)
    sbh = seq_len * batch_size * cfg.hidden_size
    per_layer = 34 * sbh                                               # arXiv:2205.05198, 16-bit, no s^2 term
    if gradient_checkpointing:
        layers = cfg.num_hidden_layers * 2 * sbh + per_layer           # checkpointed inputs + one live layer
    else:
        layers = cfg.num_hidden_layers * per_layer
    logits = 4 * seq_len * batch_size * cfg.vocab_size                 # fp32 logits for the loss
    return layers + logits


# ---------------------------------------------------------------------------------------------
# 3. The estimate
# ---------------------------------------------------------------------------------------------
@dataclass
class MemoryEstimate:
    """Bytes per component of one training run; ``total`` includes the overhead allowance."""
    method: str
    n_params: int
    n_trainable: int
    components: dict[str, int] = field(default_factory=dict)
    assumptions: dict[str, object] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.components.values())

    def table(self, unit: float = GB) -> str:
        """A plain-text table, one line per component, in GB (10^9 bytes) by default."""
        name = "GB" if unit == GB else "GiB" if unit == GiB else "bytes"
        lines = [f"{self.method}: {self.n_params:,} params, {self.n_trainable:,} trainable"]
        for key, value in self.components.items():
            lines.append(f"  {key:<22} {value / unit:10.3f} {name}")
        lines.append(f"  {'total':<22} {self.total / unit:10.3f} {name}")
        return "\n".join(lines)


def _weights(config, method: str, n_params: int, upcast_non_quantized: bool) -> dict[str, int]:
    if method == "full_fp32":
        return {"weights": 4 * n_params}                               # fp32
    if method == "full_mixed":
        return {"weights": 2 * n_params, "master weights": 4 * n_params}   # bf16 + fp32 master (ZeRO)
    if method == "lora16":
        return {"weights": 2 * n_params}                               # bf16 base
    q = nf4_bytes(config, double_quant=(method == "qlora"))
    rest = n_params - q["n_quantized"]                                 # embeddings, norms, lm_head
    bytes_rest = 4 if upcast_non_quantized else 2                      # A1
    return {"weights": q["weights"] + bytes_rest * rest, "quant constants": q["constants"]}


def estimate_memory(config, method: str = "qlora", r: int = KIT_SFT.r, target_modules=KIT_SFT.target_modules,
                    batch_size: int = 1, seq_len: int = 512, gradient_checkpointing: bool = True,
                    optimizer: str = "adamw_torch", upcast_non_quantized: bool = True,
                    cuda_context_gib: float = 0.5, fragmentation: float = 0.10,
                    adapter_bytes: int = 4) -> MemoryEstimate:
    """Peak GPU memory of a fine-tuning run, per component (assumptions A1-A5, module docstring).

    Args:
        config: anything :func:`load_config` accepts.
        method: one of :data:`METHODS`.
        r, target_modules: the LoRA adapter (ignored for full fine-tuning).
        batch_size, seq_len, gradient_checkpointing: decide the activations (A4).
        optimizer: "adamw_torch" (32-bit), "adamw_8bit" or "paged_adamw_8bit" (TrainingArguments.optim names).
        upcast_non_quantized: QLoRA's non-NF4 parameters in fp32 (prepare_model_for_kbit_training).
        adapter_bytes: bytes per LoRA parameter and per gradient: 4 (fp32, PEFT's default today,
            A2) or 2 (bf16, as the paper's ``qlora.py`` cast its LoRA modules).
        cuda_context_gib, fragmentation: the overhead allowance (A5); 0 and 0 for what
            ``max_memory_allocated`` sees.
    Returns:
        :class:`MemoryEstimate`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_rank(r)
    n_params = count_params(config)
    comp = _weights(config, method, n_params, upcast_non_quantized)
    if method.startswith("full"):
        shapes, n_train = [(n_params,)], n_params
        comp["lora params"] = 0
        comp["gradients"] = (4 if method == "full_fp32" else 2) * n_params
    else:
        shapes = lora_shapes(config, r, target_modules)
        n_train = sum(a * b for a, b in shapes)
        if adapter_bytes not in (2, 4):
            raise ValueError(f"adapter_bytes must be 4 (fp32) or 2 (bf16), got {adapter_bytes!r}")
        comp["lora params"] = adapter_bytes * n_train                  # fp32 adapters (A2)
        comp["gradients"] = adapter_bytes * n_train                    # gradients in the adapters' dtype
    comp["optimizer states"] = optimizer_state_bytes(shapes, optimizer)
    comp["activations"] = activation_bytes(config, batch_size, seq_len, gradient_checkpointing)
    comp["cuda context + frag."] = int(cuda_context_gib * GiB + fragmentation * sum(comp.values()))
    assumptions = dict(r=r, target_modules=target_modules, batch_size=batch_size, seq_len=seq_len,
                       gradient_checkpointing=gradient_checkpointing, optimizer=optimizer,
                       upcast_non_quantized=upcast_non_quantized, cuda_context_gib=cuda_context_gib,
                       fragmentation=fragmentation, adapter_bytes=adapter_bytes)
    return MemoryEstimate(method, n_params, n_train, comp, assumptions)


@dataclass(frozen=True)
class Fit:
    """The verdict of :func:`will_it_fit`, as data: the GPU, its memory and what the run needs (bytes).

    >>> f = Fit("t4", capacity=16_106_127_360, needed=10_000_000_000)
    >>> f.fits, round(f.margin / GB, 2)
    (True, 6.11)
    >>> print(f)
    T4 (16.1 GB): fits, margin 6.11 GB
    >>> print(Fit("t4", 16_106_127_360, 20_000_000_000))
    T4 (16.1 GB): does NOT fit, short by 3.89 GB
    """
    gpu: str
    capacity: int
    needed: int

    @property
    def margin(self) -> int:
        """GPU memory - estimated total (negative: short by that much)."""
        return self.capacity - self.needed

    @property
    def fits(self) -> bool:
        return self.margin >= 0

    def __str__(self) -> str:
        said = f"fits, margin {self.margin / GB:.2f} GB" if self.fits else f"does NOT fit, short by {-self.margin / GB:.2f} GB"
        return f"{self.gpu.upper()} ({self.capacity / GB:.1f} GB): {said}"


def will_it_fit(estimate: MemoryEstimate, gpu: str) -> Fit:
    """Does the run of ``estimate`` fit on ``gpu`` (a key of :data:`GPUS`)? A :class:`Fit`."""
    key = gpu.lower()
    if key not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; use one of {', '.join(GPUS)}")
    return Fit(key, GPUS[key], estimate.total)


# ---------------------------------------------------------------------------------------------
# 4. Several GPUs: what DDP replicates and what FSDP shards (notebook 09)
# ---------------------------------------------------------------------------------------------
STRATEGIES = ("ddp", "fsdp")


def _layer_bytes(config, method: str) -> int:
    """Bytes of the largest decoder layer's weights as stored (NF4 codes for QLoRA, 16 bit for LoRA):
    what FSDP gathers onto every GPU while that layer computes."""
    cfg = load_config(config)
    per_layer: dict[str, int] = {}
    for name, fan_in, fan_out in linear_shapes(config):
        if ".layers." not in name:
            continue
        layer = name.split(".layers.")[1].split(".")[0]
        n = fan_in * fan_out
        per_layer[layer] = per_layer.get(layer, 0) + (storage_bytes(n)["packed"] if method.startswith("qlora") else 2 * n)
    if not per_layer:
        raise ValueError(f"no decoder layers named '.layers.' in {cfg.model_type}: FSDP's unit is unknown")
    return max(per_layer.values())


def shard_estimate(estimate: MemoryEstimate, config, strategy: str, num_gpus: int,
                   cpu_offload: bool = False) -> MemoryEstimate:
    """Memory **per GPU** of the run ``estimate`` describes (its batch is the batch of one GPU) on
    ``num_gpus`` GPUs.

    - ``"ddp"`` (DistributedDataParallel): every GPU holds the whole run; DDP adds its gradient
      buckets, a second copy of the trainable gradients that the all-reduce works on
      (``gradient_as_bucket_view=False``, torch's default). More GPUs make the run faster, never smaller.
    - ``"fsdp"`` (FULL_SHARD, FSDP-QLoRA): weights, adapters, gradients and optimizer states are split
      in ``num_gpus`` shards; each GPU gathers one decoder layer at a time (two with prefetch: the one
      computing and the next) and the root unit (embeddings, final norm, head) for the whole pass.
      bitsandbytes' quantization constants live in each weight's ``quant_state``, not in a parameter,
      so FSDP does not shard them: each GPU holds them all. Activations are per GPU as before.
      ``cpu_offload`` (FSDP's ``offload_params``) keeps the shards and their optimizer step in CPU RAM:
      the GPU keeps the gathered layers, the constants and the activations, on one GPU as on several.

    >>> run = estimate_memory("llama-2-70b", "qlora", r=8, batch_size=2, seq_len=2048)
    >>> per_gpu = shard_estimate(run, "llama-2-70b", "fsdp", 2)
    >>> round(run.total / GB, 1), round(per_gpu.total / GB, 1)  # one GPU, then each of two
    (51.3, 32.5)

    Raises:
        ValueError: an unknown strategy, a number of GPUs below 1, CPU offload without FSDP.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 1:
        raise ValueError(f"num_gpus must be a positive int, got {num_gpus!r}")
    if cpu_offload and strategy != "fsdp":
        raise ValueError("cpu_offload is FSDP's offload_params: use strategy='fsdp', or leave cpu_offload off")
    comp = {k: v for k, v in estimate.components.items() if k != "cuda context + frag."}
    if strategy == "ddp":
        comp["ddp gradient buckets"] = comp["gradients"] if num_gpus > 1 else 0
    else:
        sharded = ("weights", "master weights", "lora params", "gradients", "optimizer states")
        for key in sharded:
            if key in comp:
                comp[key] = 0 if cpu_offload else -(-comp[key] // num_gpus)    # ceil: shards are padded
        unit = _layer_bytes(config, estimate.method)
        per_param = 4 if estimate.method == "full_fp32" else 2          # FSDP-QLoRA: one storage dtype, 16 bit
        outside = count_params(config) - sum(i * o for n, i, o in linear_shapes(config) if ".layers." in n)
        # One GPU without offload keeps its whole model (FSDP runs NO_SHARD): nothing to gather. With offload
        # the weights live in CPU RAM even on one GPU, and each unit is copied in to compute (torch's
        # FlatParamHandle supports NO_SHARD + offload).
        gathers = num_gpus > 1 or cpu_offload
        comp["gathered layers (2)"] = 2 * unit if gathers else 0
        comp["gathered root unit"] = per_param * outside if gathers else 0   # embeddings, norm, head
    overhead = estimate.assumptions["cuda_context_gib"] * GiB + estimate.assumptions["fragmentation"] * sum(comp.values())
    comp["cuda context + frag."] = int(overhead)
    assumptions = dict(estimate.assumptions, strategy=strategy, num_gpus=num_gpus, cpu_offload=cpu_offload)
    return MemoryEstimate(estimate.method, estimate.n_params, estimate.n_trainable, comp, assumptions)


# ---------------------------------------------------------------------------------------------
# 5. Command line: python -m qlora_helpers.memory CONFIG --gpu t4 [--num-gpus 2 --strategy fsdp]
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Print the estimate and whether it fits; exit status 0 if it fits, 1 if not."""
    ap = argparse.ArgumentParser(prog="python -m qlora_helpers.memory",
                                 description="Will this fine-tuning run fit on the GPU?")
    ap.add_argument("config", help=f"config.json, its folder, or one of: {', '.join(KNOWN_CONFIGS)}")
    ap.add_argument("--gpu", default="t4", choices=sorted(GPUS))
    ap.add_argument("--method", default="qlora", choices=METHODS)
    ap.add_argument("--r", type=int, default=KIT_SFT.r, help=f"LoRA rank (default: the kit's recipe, {KIT_SFT.r})")
    ap.add_argument("--target-modules", default=KIT_SFT.target_modules,
                    help="all-linear, or comma-separated names such as q_proj,v_proj")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    ap.add_argument("--optimizer", default="paged_adamw_8bit", choices=list(OPTIMIZERS))
    ap.add_argument("--num-gpus", type=int, default=1, help="GPUs of the --gpu kind (memory is then per GPU)")
    ap.add_argument("--strategy", default="ddp", choices=STRATEGIES,
                    help="ddp: each GPU holds the whole run; fsdp: weights, adapters and states sharded")
    ap.add_argument("--cpu-offload", action="store_true", help="FSDP's offload_params: shards in CPU RAM")
    args = ap.parse_args(argv)
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    try:
        est = estimate_memory(args.config, args.method, args.r, targets, args.batch_size, args.seq_len,
                              not args.no_gradient_checkpointing, args.optimizer)
        if args.num_gpus > 1 or args.strategy != "ddp" or args.cpu_offload:
            est = shard_estimate(est, args.config, args.strategy, args.num_gpus, args.cpu_offload)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    fit = will_it_fit(est, args.gpu)
    print(est.table())
    if args.num_gpus > 1:
        print(f"per GPU, {args.num_gpus} x {args.gpu} with {args.strategy.upper()}"
              f"{' and CPU offload' if args.cpu_offload else ''} (batch {args.batch_size} on each GPU):")
    print(fit)
    return 0 if fit.fits else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
