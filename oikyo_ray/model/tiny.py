"""The embedded default base model: a tiny Llama-shaped causal LM and a BPE tokenizer, built locally.

Nothing is downloaded: the tokenizer is trained with `tokenizers` on the shipped demo data and the
model is initialised from a config with a fixed seed, both saved with `save_pretrained` and reused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from oikyo_ray.demo.tasks import ASSET
from oikyo_ray.model.chat_template import DEFAULT_CHAT_TEMPLATE, IM_END, IM_START

VERSION = "v3"  # v2: the default template renders tools; v3: and reasoning traces
# Wider than Llama's 0.02: with hidden 64 a 0.02 lm_head caps logits near +-1.5, so with a frozen
# random base could never be confident and even a perfect adapter would plateau at high loss.
INIT_RANGE = 0.1
SPECIAL = ["<|pad|>", "<|endoftext|>", IM_START, IM_END]


def _corpus() -> list[str]:
    texts = []
    with ASSET.open(encoding="utf-8") as f:
        for line in f:
            for m in json.loads(line)["messages"]:
                texts.append(f"{m['role']}\n{m['content']}")
    return texts


def build_tokenizer(out_dir: Path, vocab_size: int = 512):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token=IM_END,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START, "<|endoftext|>"],
    )
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_model(out_dir: Path, vocab_size: int, seed: int = 0):
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=3,
        bos_token_id=None,
        initializer_range=INIT_RANGE,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def ensure_tiny_model(cache_dir: str | os.PathLike) -> Path:
    """Return the directory of the tiny model, building it once (atomically) if missing."""
    root = Path(cache_dir).expanduser()
    target = root / f"oikyo-demo-tiny-{VERSION}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        tok = build_tokenizer(tmp)
        build_model(tmp, vocab_size=len(tok))
        try:
            os.rename(tmp, target)  # atomic: concurrent builders race, one wins
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
