"""Generation metrics on (prediction, reference) pairs (Ray-free)."""

from __future__ import annotations

import re
import string

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise_answer(s: str) -> str:
    """SQuAD-style: lower-case, drop punctuation and extra whitespace."""
    return " ".join(_PUNCT.sub(" ", s.lower()).split())


def exact_match(pred: str, ref: str) -> float:
    return float(normalise_answer(pred) == normalise_answer(ref))


def token_f1(pred: str, ref: str) -> float:
    p, r = normalise_answer(pred).split(), normalise_answer(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum(min(p.count(t), r.count(t)) for t in set(p))
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)
