"""Drift checks of captured prompts against the training prompts (Ray-free).

    ref = summarize(reference_texts(run_dir / "data", cfg.drift), tok)
    live = summarize([prompt_text(r) for r in rows], tok)     # or merged from per-batch parts
    report = drift_report("bot", ref, live, cfg.drift, perplexity, trend)

Both sides are reduced to mergeable figures (`Side`: token lengths, unigram counts, unknown
tokens, script letters), so the live side can be summarized batch by batch where the rows are
(`ray_drift.py`) and merged here. The prompt is what the user wrote: the non-assistant turns'
text, the same for a training row and a captured chat (so chat templates never count as drift).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from oikyo_ray.config import DriftConfig
from oikyo_ray.data.prepared import load_split_rows
from oikyo_ray.drift import stats

USER_ROLES = ("system", "user", "tool", "observation", "function")


@dataclass
class Side:
    """One sample of prompts, reduced to what the checks compare (merge with `+`)."""

    n: int = 0
    lengths: list[int] = field(default_factory=list)
    unigrams: np.ndarray | None = None
    unknown: int = 0
    tokens: int = 0
    letters: Counter = field(default_factory=Counter)

    def __add__(self, other: Side) -> Side:
        if self.unigrams is None or other.unigrams is None:
            uni = self.unigrams if other.unigrams is None else other.unigrams
        else:
            uni = self.unigrams + other.unigrams
        return Side(
            self.n + other.n,
            self.lengths + other.lengths,
            uni,
            self.unknown + other.unknown,
            self.tokens + other.tokens,
            self.letters + other.letters,
        )


def _content(c) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # typed parts
        return "\n".join(p.get("text", "") for p in c if isinstance(p, dict))
    return ""


def messages_text(messages: list[dict]) -> str:
    """What the user side of a conversation wrote (system, user and tool turns)."""
    texts = [_content(m.get("content")) for m in messages if m.get("role") in USER_ROLES]
    if not texts:  # a plain-text row: its one turn is the text
        texts = [_content(m.get("content")) for m in messages]
    return "\n".join(t for t in texts if t)


def prompt_text(row: dict) -> str:
    """A captured row's prompt as the user wrote it (chat: the messages, as JSON)."""
    prompt = row.get("prompt") or ""
    if row.get("endpoint") == "chat":
        try:
            return messages_text(json.loads(prompt))
        except (json.JSONDecodeError, AttributeError, TypeError):
            return prompt  # redaction or a cut at max_chars may leave it unparseable: take it whole
    return prompt


def split_texts(data_dir: Path, split: str) -> list[str]:
    """The prompts of a prepared split (its rows' non-assistant turns)."""
    return [messages_text(json.loads(r["messages"])) for r in load_split_rows(data_dir, split)]


def reference_texts(data_dir: Path, cfg: DriftConfig, seed: int = 0) -> list[str]:
    """Up to cfg.reference_rows training prompts (a seeded sample of the train split)."""
    texts = split_texts(data_dir, "train")
    return random.Random(seed).sample(texts, cfg.reference_rows) if len(texts) > cfg.reference_rows else texts


def summarize(texts: list[str], tokenizer) -> Side:
    vocab = len(tokenizer)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    unk = tokenizer.unk_token_id
    letters: Counter = Counter()
    for t in texts:
        letters.update(s for ch in t if (s := stats.script(ch)))
    return Side(
        n=len(texts),
        lengths=[len(x) for x in ids],
        unigrams=stats.unigram_counts(ids, vocab),
        unknown=sum(x.count(unk) for x in ids) if unk is not None else 0,
        tokens=sum(len(x) for x in ids),
        letters=letters,
    )


def _shares(c: Counter) -> dict[str, float]:
    total = sum(c.values())
    return {k: v / total for k, v in c.most_common()} if total else {}


def checks(ref: Side, live: Side, cfg: DriftConfig, perplexity: dict | None = None) -> list[dict]:
    """Each check: its figure, threshold and whether it drifted."""
    uni_ref = ref.unigrams if ref.unigrams is not None else np.zeros(1)
    uni_live = live.unigrams if live.unigrams is not None else np.zeros(1)
    unk = (live.unknown / live.tokens if live.tokens else 0.0) - (ref.unknown / ref.tokens if ref.tokens else 0.0)
    out = [
        ("length_psi", stats.psi(np.array(ref.lengths), np.array(live.lengths)), cfg.psi_max),
        ("length_ks", stats.ks(np.array(ref.lengths), np.array(live.lengths)), cfg.ks_max),
        ("unigram_js", stats.js(uni_ref, uni_live), cfg.unigram_js_max),
        ("script_tv", stats.total_variation(_shares(ref.letters), _shares(live.letters)), cfg.script_tv_max),
        ("unknown_rate_rise", unk, cfg.unknown_rate_max),
    ]
    if perplexity:
        out.append(("perplexity_ratio", perplexity["live"] / perplexity["test"], cfg.perplexity_ratio_max))
    return [{"check": n, "value": round(float(v), 6), "threshold": t, "drifted": bool(v > t)} for n, v, t in out]


def feedback_trend(rows: list[dict]) -> dict[str, list[dict]]:
    """Per version, per day: positive and negative ratings and the positive share."""
    days: dict[str, dict[str, Counter]] = {}
    for r in rows:
        version, day = str(r.get("version", "-")), str(r.get("date", "?"))
        days.setdefault(version, {}).setdefault(day, Counter())[r.get("verdict", "neutral")] += 1
    out: dict[str, list[dict]] = {}
    for version, by_day in sorted(days.items()):
        out[version] = []
        for day, c in sorted(by_day.items()):
            rated = c["positive"] + c["negative"]
            share = round(c["positive"] / rated, 4) if rated else None
            out[version].append({"date": day, "positive": c["positive"], "negative": c["negative"], "share": share})
    return out


def drift_report(
    model: str, ref: Side, live: Side, cfg: DriftConfig, perplexity: dict | None = None, trend: dict | None = None
) -> dict:
    """The report: figures of both sides, the checks, and a verdict (None when too few rows)."""
    found = checks(ref, live, cfg, perplexity)
    enough = live.n >= cfg.min_live_rows
    return {
        "model": model,
        "window_days": cfg.window_days,
        "rows": {"reference": ref.n, "live": live.n},
        "enough_rows": enough,
        "drifted": bool(enough and any(c["drifted"] for c in found)) if enough else None,
        "checks": found,
        "lengths": {
            "reference_mean": float(np.mean(ref.lengths)) if ref.lengths else None,
            "live_mean": float(np.mean(live.lengths)) if live.lengths else None,
        },
        "scripts": {"reference": _shares(ref.letters), "live": _shares(live.letters)},
        "perplexity": perplexity,
        "feedback": trend or {},
    }
