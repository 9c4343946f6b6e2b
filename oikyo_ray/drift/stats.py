"""Distribution shift between a reference sample and live traffic (Ray-free, numpy).

    psi(ref, live)        population stability index over the reference's quantile bins
    ks(ref, live)         two-sample Kolmogorov-Smirnov statistic (largest gap of the ECDFs)
    js(p, q)              Jensen-Shannon divergence of two count vectors (base 2: 0..1)
    script_mix(texts)     share of letters per Unicode script (Latin, Cyrillic, Han, ...)
    total_variation(a, b) half the L1 distance of two share dicts (0..1)

Quantile bins make PSI follow where the reference has mass (equal-width bins waste most of their
range on the long tail of token lengths); empty bins are floored at EPS, as is usual for PSI.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable

import numpy as np

EPS = 1e-4
BINS = 10


def psi(ref: np.ndarray, live: np.ndarray, bins: int = BINS) -> float:
    """Sum over bins of (live - ref) * ln(live / ref), bins at the reference's quantiles."""
    ref, live = np.asarray(ref, dtype=float), np.asarray(live, dtype=float)
    if not len(ref) or not len(live):
        return 0.0
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    r = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1) / len(ref)
    v = np.bincount(np.searchsorted(edges, live, side="right"), minlength=len(edges) + 1) / len(live)
    r, v = np.maximum(r, EPS), np.maximum(v, EPS)
    return float(np.sum((v - r) * np.log(v / r)))


def ks(ref: np.ndarray, live: np.ndarray) -> float:
    """max |F_ref(x) - F_live(x)| over every observed x."""
    ref, live = np.sort(np.asarray(ref, dtype=float)), np.sort(np.asarray(live, dtype=float))
    if not len(ref) or not len(live):
        return 0.0
    xs = np.concatenate([ref, live])
    f_ref = np.searchsorted(ref, xs, side="right") / len(ref)
    f_live = np.searchsorted(live, xs, side="right") / len(live)
    return float(np.max(np.abs(f_ref - f_live)))


def js(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (bits) of two non-negative count vectors of one length."""
    p, q = np.asarray(p, dtype=float), np.asarray(q, dtype=float)
    if p.sum() == 0 or q.sum() == 0:
        return 0.0
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return (kl(p) + kl(q)) / 2


def unigram_counts(token_rows: Iterable[Iterable[int]], vocab_size: int) -> np.ndarray:
    counts = np.zeros(vocab_size, dtype=np.int64)
    for row in token_rows:
        ids = np.asarray(list(row), dtype=np.int64)
        ids = ids[(ids >= 0) & (ids < vocab_size)]
        counts += np.bincount(ids, minlength=vocab_size)
    return counts


def script(ch: str) -> str | None:
    """The script of a letter from its Unicode name (LATIN, CYRILLIC, CJK, ARABIC, ...); None for
    anything that is not a letter (digits, spaces, punctuation belong to every script)."""
    if not ch.isalpha():
        return None
    name = unicodedata.name(ch, "")
    first = name.split(" ", 1)[0]
    return {"CJK": "HAN", "HIRAGANA": "JAPANESE", "KATAKANA": "JAPANESE", "HANGUL": "KOREAN"}.get(first, first or None)


def script_mix(texts: Iterable[str]) -> dict[str, float]:
    counts: Counter[str] = Counter()
    for t in texts:
        counts.update(s for ch in t if (s := script(ch)))
    total = sum(counts.values())
    return {k: v / total for k, v in counts.most_common()} if total else {}


def total_variation(a: dict[str, float], b: dict[str, float]) -> float:
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))
