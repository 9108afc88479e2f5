"""The offline profile: a tiny base model, its tokenizer and a task dataset, built here.

What it teaches: a QLoRA pipeline does not care how big the model is. Everything the GPU
profile does with a hub model (``AutoTokenizer.from_pretrained``,
``AutoModelForCausalLM.from_pretrained(..., quantization_config=...)``,
``datasets.load_dataset``) works unchanged on a folder in standard Hugging Face format.
This module makes such a folder without any network:

1. a byte-level BPE tokenizer (the GPT-2 / Llama 3 family of tokenizers) trained on English
   text that ships with CPython (``pydoc_data.topics``), digits split one per token as in
   Llama, with a ChatML-style chat template;
2. a small Llama-architecture causal LM, *pretrained* on that text for about a minute, so it
   is a base model (it continues English), not random weights;
3. an instruction dataset for a task with an exact-match metric (date reformatting, see
   :func:`make_task_example`), as JSON Lines that ``datasets.load_dataset("json", ...)`` reads.

Everything is seeded; the result is cached under a folder keyed by :data:`RECIPE_VERSION`,
so the second call returns at once. Building writes to a temporary folder and renames it,
so two processes never see half a model.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

RECIPE_VERSION = "v1"  # bump when anything below changes what is built

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]


def cache_root() -> Path:
    """Folder for built assets: ``$QLORA_KIT_CACHE`` or ``~/.cache/qlora-kit``."""
    return Path(os.environ.get("QLORA_KIT_CACHE", Path.home() / ".cache" / "qlora-kit"))


# ---------------------------------------------------------------------------------------------
# The task: rewrite an ISO date (2024-03-17) as day/month/year (17/03/2024).
# Every output character is a copy of an input character at a fixed relative offset, so a
# small transformer can learn it, and exact match is unambiguous.
# ---------------------------------------------------------------------------------------------
PROMPTS = [
    "Rewrite the date {iso} as DD/MM/YYYY.",
    "Convert {iso} to day/month/year format.",
    "What is {iso} in DD/MM/YYYY notation?",
    "Please write the date {iso} the European way (DD/MM/YYYY).",
]


def make_task_example(rng: random.Random) -> dict:
    """One chat example. ``make_task_example(random.Random(0))["answer"]`` -> e.g. ``'25/07/1987'``."""
    year, month, day = rng.randint(1900, 2099), rng.randint(1, 12), rng.randint(1, 28)
    iso = f"{year:04d}-{month:02d}-{day:02d}"
    answer = f"{day:02d}/{month:02d}/{year:04d}"
    prompt = rng.choice(PROMPTS).format(iso=iso)
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": answer}],
            "prompt": prompt, "answer": answer}


def make_task_splits(n_train: int = 2000, n_test: int = 200, seed: int = 0) -> dict[str, list[dict]]:
    """Disjoint train/test splits (no test date appears in train)."""
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < n_train + n_test:
        ex = make_task_example(rng)
        if ex["answer"] not in seen:
            seen.add(ex["answer"])
            rows.append(ex)
    return {"train": rows[:n_train], "test": rows[n_train:]}


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
    from pydoc_data.topics import topics
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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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
    ``out_features % 32 == 0`` (shared/PITFALLS.md, item 1); multiples of 64 keep the model
    usable there, and keep the NF4 blocks (64 values) aligned with rows.
    """
    from transformers import LlamaConfig
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
    """Next-token pretraining on random windows of one long token stream (plain PyTorch)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    data = torch.tensor(token_ids, dtype=torch.long)  # (n_tokens,)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup)
                                              * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=g)
        batch = torch.stack([data[s:s + seq_len] for s in starts])  # (batch, seq_len)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log and (step % 100 == 0 or step == steps - 1):
            log(f"pretrain step {step:4d}/{steps}  loss {loss.item():.3f}  "
                f"{time.perf_counter() - t0:.0f}s")
    model.eval()
    tail = losses[-20:]
    return PretrainReport(steps, steps * batch_size * seq_len, losses[0], sum(tail) / len(tail),
                          time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# Build (or reuse) the whole offline profile
# ---------------------------------------------------------------------------------------------
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


def build_offline_assets(out: Path, pretrain_steps: int = 500, seed: int = 0, log=print) -> None:
    """Train the tokenizer, pretrain the tiny Llama, write model, tokenizer and task data to ``out``."""
    import torch
    from transformers import LlamaForCausalLM

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
              "build_seconds": time.perf_counter() - t0}
    (out / "build_report.json").write_text(json.dumps(report, indent=1))


def ensure_offline_assets(log=print) -> OfflineAssets:
    """Return the offline profile's assets, building them once (about two minutes on 2 cores)."""
    root = cache_root() / f"offline-{RECIPE_VERSION}"
    if (root / "build_report.json").exists():
        return _assets(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".building-{RECIPE_VERSION}-", dir=root.parent))
    try:
        log(f"Building the offline profile into {root} (once; about two minutes) ...")
        build_offline_assets(tmp, log=log)
        try:
            tmp.rename(root)
        except OSError:  # another process finished first; its copy is as good as ours
            if not (root / "build_report.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _assets(root)


if __name__ == "__main__":
    r = ensure_offline_assets().report
    print(f"offline profile ready: {r['n_params']:,} parameters, pretraining loss "
          f"{r['first_loss']:.2f} -> {r['final_loss']:.2f} ({r['seconds']:.0f} s when built)")
