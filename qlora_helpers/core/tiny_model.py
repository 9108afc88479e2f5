"""The kit's tiny model, built from nothing: a tokenizer, a small Llama, pretraining, the offline assets.

What it teaches: a QLoRA pipeline does not care how big the model is, and a base model is just a
language model pretrained on text. This module made the offline profile's folder without any
network (:mod:`qlora_helpers.core.offline` holds the shipped bytes and checks them):

1. a byte-level BPE tokenizer (the GPT-2 / Llama 3 family of tokenizers) trained on English
   text that ships with CPython (``pydoc_data.topics``), digits split one per token as in
   Llama, with a ChatML-style chat template;
2. a small Llama-architecture causal LM, *pretrained* on that text with the kit's one loop (about
   75 s on 2 cores), so it is a base model (it continues English), not random weights;
3. the date task's rows (:mod:`qlora_helpers.core.date_task`) as JSON Lines that
   ``datasets.load_dataset("json", ...)`` reads; no test date appears in the pretraining text.

``python -m qlora_helpers.core.tiny_model --build DIR`` builds a fresh copy and reports which files differ
from the shipped ones on this CPU (the model's bytes depend on the CPU's kernels, see
:mod:`qlora_helpers.core.offline`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .artifacts import write_manifest
from .date_task import make_task_splits
from .offline import ASSET_FILES, ASSETS_DIR, RECIPE_VERSION
from .training import build_optimizer, train_loop

# ---------------------------------------------------------------------------------------------
# Pretraining text
# ---------------------------------------------------------------------------------------------
DATE_SENTENCES = [
    "The meeting of {iso} was moved; in Europe that date is written {eu}.",
    "{iso}, or {eu} as the British write it, was a Tuesday.",
    "Records dated {iso} are filed under {eu}.",
    "ISO 8601 writes {eu} as {iso}.",
    "The form asked for {eu} but the database stored {iso}.",
]


def date_prose(n_sentences: int, exclude: set[str], seed: int = 1) -> list[str]:
    """Documents of 20 sentences that mention dates in both notations.

    This is the base model's "world knowledge": it sees both ways of writing a date in running
    text, never as a question and answer. Dates in ``exclude`` (the test split) never appear,
    so the evaluation measures a skill, not recall.
    """
    rng, sents = random.Random(seed), []
    while len(sents) < n_sentences:
        y, m, d = rng.randint(1900, 2099), rng.randint(1, 12), rng.randint(1, 28)
        eu = f"{d:02d}/{m:02d}/{y:04d}"
        if eu not in exclude:
            sents.append(rng.choice(DATE_SENTENCES).format(iso=f"{y:04d}-{m:02d}-{d:02d}", eu=eu))
    return [" ".join(sents[i:i + 20]) for i in range(0, len(sents), 20)]


def pretraining_text(exclude: set[str] = frozenset(), n_date_sentences: int = 6000) -> list[str]:
    """English documents that ship with CPython (the 79 help topics of ``pydoc``, ~465 KB),
    plus :func:`date_prose`, shuffled with a fixed seed."""
    docs = [topics[k] for k in sorted(topics)] + date_prose(n_date_sentences, set(exclude))
    random.Random(0).shuffle(docs)
    return docs


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as used by Qwen2.5 and SmolLM2: the assistant turn ends with <|im_end|>, the EOS token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int = 2048):
    """Byte-level BPE with single-digit pre-tokenization, wrapped as a fast HF tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),  # 2024 -> 2 0 2 4, as in Llama
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|im_end|>",
        pad_token="<|pad|>", chat_template=CHAT_TEMPLATE, model_max_length=512,
        clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
def tiny_llama_config(vocab_size: int, **overrides):
    """A Llama with every width a multiple of 64.

    Note: on CPUs with AVX512-BF16 bitsandbytes repacks 4-bit weights and then requires
    ``out_features % 32 == 0`` (:mod:`qlora_helpers.core.cpu_layout`); multiples of 64 keep the model
    usable there, and keep the NF4 blocks (64 values) aligned with rows.
    """
    kw = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=384,
              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
              bos_token_id=0, eos_token_id=4, pad_token_id=2)
    kw.update(overrides)
    return LlamaConfig(**kw)


@dataclass
class PretrainReport:
    steps: int
    tokens_seen: int
    first_loss: float
    final_loss: float
    seconds: float


def pretrain(model, token_ids: list[int], steps: int = 600, batch_size: int = 16,
             seq_len: int = 128, lr: float = 3e-3, seed: int = 0, log=print) -> PretrainReport:
    """Next-token pretraining on random windows of one long token stream, with the kit's one loop
    (:func:`qlora_helpers.core.training.train_loop`): AdamW (betas 0.9/0.95, weight decay 0.1), linear
    warm-up over 5% of the steps then a cosine to zero, gradients clipped to 1.0."""
    g = torch.Generator().manual_seed(seed)
    data = torch.tensor(token_ids, dtype=torch.long)  # (n_tokens,)
    opt = build_optimizer("adamw_torch", model.parameters(), lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)

    def cosine(s: int) -> float:  # linear warm-up, then a cosine to zero
        return lr * (min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))

    def windows():  # random windows of the token stream, drawn as training goes
        for _ in range(steps):
            starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=g)
            batch = torch.stack([data[s:s + seq_len] for s in starts])  # (batch, seq_len)
            yield {"input_ids": batch, "labels": batch}

    t0 = time.perf_counter()
    losses = train_loop(model, opt, windows(), lr, schedule=cosine, max_grad_norm=1.0,
                        log=(lambda m: log(f"pretrain {m}")) if log else None)["losses"]
    model.eval()
    tail = losses[-20:]
    return PretrainReport(steps, steps * batch_size * seq_len, losses[0], sum(tail) / len(tail),
                          time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# Build the whole offline profile
# ---------------------------------------------------------------------------------------------
# What the shipped build ran with. torch's kernels come from ATEN_CPU_CAPABILITY, its matrix
# products from MKL (MKL_ENABLE_INSTRUCTIONS) and oneDNN (DNNL_MAX_CPU_ISA), each choosing by CPU;
# all three set to AVX2 reproduced the shipped model bit for bit on a 2-core AVX-512 Intel Xeon,
# where ATEN_CPU_CAPABILITY=avx2 alone did not (pretraining loss 2.00 instead of 1.96). The thread
# count is left at torch's default and recorded: calling torch.set_num_threads(2) there, the same
# count as the default, gave other bytes (loss 1.9425 instead of 1.9578).
BUILD_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "DNNL_MAX_CPU_ISA")


def build_offline_assets(out: Path, pretrain_steps: int = 500, seed: int = 0, log=print) -> None:
    """Train the tokenizer, pretrain the tiny Llama, write model, tokenizer and task data to ``out``."""
    _build(Path(out), pretrain_steps, seed, log)


def _build(out: Path, pretrain_steps: int, seed: int, log) -> None:
    t0 = time.perf_counter()
    splits = make_task_splits(seed=seed)
    texts = pretraining_text(exclude={ex["answer"] for ex in splits["test"]})
    tok = train_tokenizer(texts)
    eot = tok.convert_tokens_to_ids("<|end_of_text|>")
    ids = [i for doc in texts for i in tok(doc, verbose=False)["input_ids"] + [eot]]
    log(f"tokenizer: {len(tok)} tokens; pretraining corpus: {len(ids):,} tokens")

    torch.manual_seed(seed)
    config = tiny_llama_config(len(tok), bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    rep = pretrain(model, ids, steps=pretrain_steps, seed=seed, log=log)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out / "model")  # safetensors
    tok.save_pretrained(out / "model")

    (out / "data").mkdir(parents=True)
    for name, rows in splits.items():
        with open(out / "data" / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    report = {"recipe": RECIPE_VERSION, "seed": seed, "n_params": model.num_parameters(),
              "corpus_tokens": len(ids), "vocab_size": len(tok), **rep.__dict__,
              "build_seconds": time.perf_counter() - t0,
              "built_with": {"torch": torch.__version__, "machine": platform.machine(),
                             "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                             "threads": torch.get_num_threads(),
                             **{k: os.environ.get(k) for k in BUILD_ENV}}}
    (out / "build_report.json").write_text(json.dumps(report, indent=1))


def build_offline_assets_checked(out: Path, log=print, pretrain_steps: int = 500) -> list[str]:
    """Build a fresh copy into ``out`` (which must not exist), write its manifest, and return the
    files whose bytes differ from the shipped copy (on most CPUs: the model, see module docstring)."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; pass a new folder to --build")
    log(f"Building the offline profile into {out} (about two minutes; torch kernels: "
        f"{torch.backends.cpu.get_cpu_capability()}, "
        + ", ".join(f"{k}={os.environ.get(k)}" for k in BUILD_ENV)
        + "). Its model's bytes depend on the CPU and these settings.")
    build_offline_assets(out, pretrain_steps=pretrain_steps, log=log)
    write_manifest(out, ASSET_FILES)
    shipped = json.loads((ASSETS_DIR / "MANIFEST.json").read_text())["files"]
    fresh = json.loads((out / "MANIFEST.json").read_text())["files"]
    return [f for f in ASSET_FILES if f != "build_report.json" and shipped.get(f) != fresh[f]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build a fresh copy of the offline profile and compare it with the shipped one.")
    ap.add_argument("--build", type=Path, metavar="DIR", required=True,
                    help="build a fresh copy into DIR (a new folder) and report which files differ from the shipped one")
    args = ap.parse_args(argv)
    differ = build_offline_assets_checked(args.build)
    print("identical to the shipped copy" if not differ else
          f"differs from the shipped copy in: {', '.join(differ)} (expected on a CPU whose "
          f"torch kernels differ from the build's; see TROUBLESHOOTING.md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
