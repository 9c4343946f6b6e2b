"""Scoring items with the base and the fine-tuned model (Ray-free), one batch at a time.

    score_batch(pair, items, ec) -> [ItemScore]      what every Ray actor runs too (`ray_eval`)
    score_in_process(cfg, model_path, tuned_dir, items) -> Scoring

A `Scorer` is any callable with `score_in_process`'s signature: `compare` takes one, so the Ray
layer can plug in its actor pool; every scorer runs `score_batch`, so all give the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from peft import PeftModel

from oikyo_ray.config import OikyoConfig
from oikyo_ray.data.tokenize import IGNORE
from oikyo_ray.eval.generate import generate
from oikyo_ray.eval.items import Item
from oikyo_ray.model.load import load_model, load_tokenizer

MODELS = ("base", "tuned")


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


class ModelPair:
    """Base and fine-tuned, loaded once. An adapter dir is put on the base (one set of base
    weights; `use("base")` disables the adapter); a full or merged model dir is loaded beside it."""

    def __init__(self, cfg: OikyoConfig, model_path: str, tuned_dir: str | Path, device: str | None = None):
        self.tokenizer = load_tokenizer(cfg.model, model_path)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        base = load_model(cfg.model, model_path)
        self.adapter = is_adapter_dir(tuned_dir)
        if self.adapter:
            self.base, self.tuned = None, PeftModel.from_pretrained(base, str(tuned_dir)).to(device).eval()
        else:
            self.base = base.to(device).eval()
            self.tuned = load_model(cfg.model, str(tuned_dir)).to(device).eval()

    @contextmanager
    def use(self, which: str):
        if which == "tuned":
            yield self.tuned
        elif self.adapter:
            with self.tuned.disable_adapter():
                yield self.tuned
        else:
            yield self.base


class SingleModel:
    """One model under the name "tuned" (for `compare.evaluate_model`)."""

    def __init__(self, model, tokenizer):
        self.tokenizer, self.model = tokenizer, model

    def use(self, which: str):
        return nullcontext(self.model)


@dataclass
class ItemScore:
    """What the models made of one item: per model, the summed NLL over the item's `tokens`
    labelled tokens (0 without labels) and the generated text ("" without a prompt)."""

    id: str
    tokens: int = 0
    nll: dict[str, float] = field(default_factory=dict)
    text: dict[str, str] = field(default_factory=dict)


class Scoring(NamedTuple):
    backend: str  # where the items were scored: "local" (this process) or "ray"
    scores: list[ItemScore]


Scorer = Callable[[OikyoConfig, str, str, list[Item]], Scoring]


@torch.no_grad()
def row_nll(model, input_ids: list[list[int]], labels: list[list[int]], pad_id: int) -> list[tuple[float, int]]:
    """(summed next-token NLL over labelled tokens, their count) per row; a token-weighted mean of
    these is exactly `train.loop.eval_loss` (Hugging Face's shifted cross-entropy)."""
    n = max(len(x) for x in input_ids)
    ids = torch.full((len(input_ids), n), pad_id, dtype=torch.long)
    lab = torch.full((len(input_ids), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(input_ids), n), dtype=torch.long)
    for i, (a, b) in enumerate(zip(input_ids, labels)):
        ids[i, : len(a)], lab[i, : len(b)], mask[i, : len(a)] = torch.tensor(a), torch.tensor(b), 1
    dev = model.device
    logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
    tgt = lab[:, 1:].to(dev)
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), tgt, ignore_index=IGNORE, reduction="none")
    return list(zip(ce.sum(1).tolist(), (tgt != IGNORE).sum(1).tolist()))


def mean_nll(
    model, input_ids: list[list[int]], labels: list[list[int]], pad_id: int, batch_size: int = 16
) -> float | None:
    """Token-weighted mean of `row_nll` over rows, `batch_size` at a time; None without labels."""
    total, count = 0.0, 0
    for i in range(0, len(input_ids), batch_size):
        for nll, n in row_nll(model, input_ids[i : i + batch_size], labels[i : i + batch_size], pad_id):
            total, count = total + nll, count + n
    return total / count if count else None


def score_batch(pair, items: list[Item], ec, models=MODELS) -> list[ItemScore]:
    """Per item and model: NLL and token count (items with labels) and generated text (items with
    a prompt); generation is seeded identically for each model and each group of prompts."""
    tok = pair.tokenizer
    out = [ItemScore(it.id, nll=dict.fromkeys(models, 0.0), text=dict.fromkeys(models, "")) for it in items]
    loss_idx = [i for i, it in enumerate(items) if it.labels]
    gen_groups: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        if it.prompt:
            gen_groups.setdefault(it.max_new_tokens, []).append(i)
    for which in models:
        with pair.use(which) as model:
            if loss_idx:
                nll = row_nll(
                    model,
                    [list(items[i].input_ids) for i in loss_idx],
                    [list(items[i].labels) for i in loss_idx],
                    tok.pad_token_id,
                )
                for i, (s, n) in zip(loss_idx, nll):
                    out[i].nll[which], out[i].tokens = float(s), int(n)
            for budget, idx in sorted(gen_groups.items()):
                gens = generate(
                    model, tok, [items[i].prompt for i in idx], budget, ec.temperature, ec.top_p, seed=ec.seed
                )
                for i, g in zip(idx, gens):
                    out[i].text[which] = g["text"]
    return out


def score_items(pair, items: list[Item], ec, models=MODELS) -> list[ItemScore]:
    """`score_batch` over batches of eval.batch_size items."""
    out = []
    for i in range(0, len(items), ec.batch_size):
        out += score_batch(pair, items[i : i + ec.batch_size], ec, models)
    return out


def score_in_process(cfg: OikyoConfig, model_path: str, tuned_dir: str, items: list[Item]) -> Scoring:
    """Both models loaded here, the items scored in batches (the default `Scorer`)."""
    return Scoring("local", score_items(ModelPair(cfg, model_path, tuned_dir), items, cfg.eval))
