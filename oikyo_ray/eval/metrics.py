"""Generation metrics on (prediction, reference) pairs (Ray-free).

Every corpus metric returns a float in [0, 1] (higher is better) computed over the pairs it applies
to; `applies` says which pairs those are, so each metric is reported with its own `n`:

    exact_match  SQuAD-style normalised string equality                          (every pair)
    token_f1     SQuAD-style bag-of-words F1 of normalised tokens                 (every pair)
    rouge_l      ROUGE-L F-measure, Google's `rouge-score` (no stemming)          (every pair)
    bleu         corpus BLEU from `sacrebleu` (default 13a tokenisation), / 100    (every pair)
    json_valid   share of predictions that parse as a JSON object or array        (pairs whose reference does)
    tool_call    the predicted call's name and arguments equal the reference's    (tool-call pairs)
    tool_name    the predicted call's function name equals the reference's        (tool-call pairs)

A tool call is the JSON text the data stage writes for an assistant tool turn: ``{"name",
"arguments"}`` or a list of them; arguments given as a JSON string are parsed before comparing.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import sacrebleu
from rouge_score import rouge_scorer

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


@lru_cache(maxsize=1)
def _rouge() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure of one pair (rouge-score's tokeniser: lower-case ASCII words and digits)."""
    return float(_rouge().score(ref, pred)["rougeL"].fmeasure)


def corpus_bleu(preds: list[str], refs: list[str]) -> float:
    """sacrebleu corpus BLEU (one reference per prediction), scaled to [0, 1]."""
    if not preds:
        return float("nan")
    return float(sacrebleu.corpus_bleu(preds, [refs]).score) / 100.0


def parse_json(text: str) -> Any:
    """The JSON object or array in `text` (surrounding whitespace allowed), else None."""
    try:
        value = json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return None
    return value if isinstance(value, (dict, list)) else None


def json_valid(pred: str) -> float:
    return float(parse_json(pred) is not None)


def _calls(value: Any) -> list[tuple[str, Any]] | None:
    """[(name, arguments)] of a call or list of calls; None when it is not one."""
    items = value if isinstance(value, list) else [value]
    out = []
    for c in items:
        if not isinstance(c, dict):
            return None
        if isinstance(c.get("function"), dict):  # OpenAI {"type": "function", "function": {...}}
            c = c["function"]
        name, args = c.get("name"), c.get("arguments", {})
        if not isinstance(name, str):
            return None
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                return None
        out.append((name, args))
    return out or None


def tool_call_match(pred: str, ref: str) -> float:
    """1 when the predicted call(s) equal the reference's: same names and arguments, same order."""
    want, got = _calls(parse_json(ref)), _calls(parse_json(pred))
    return float(want is not None and got is not None and got == want)


def tool_name_match(pred: str, ref: str) -> float:
    """1 when the predicted call(s) name the same functions as the reference, in order."""
    want, got = _calls(parse_json(ref)), _calls(parse_json(pred))
    return float(want is not None and got is not None and [n for n, _ in got] == [n for n, _ in want])


# name -> (applies(ref, is_tool_call) -> bool, corpus score(preds, refs) -> float)
def _mean(fn: Callable[[str, str], float]) -> Callable[[list[str], list[str]], float]:
    return lambda preds, refs: sum(fn(p, r) for p, r in zip(preds, refs)) / len(preds) if preds else float("nan")


METRICS: dict[str, tuple[Callable[[str, bool], bool], Callable[[list[str], list[str]], float]]] = {
    "exact_match": (lambda ref, tool: True, _mean(exact_match)),
    "token_f1": (lambda ref, tool: True, _mean(token_f1)),
    "rouge_l": (lambda ref, tool: True, _mean(rouge_l)),
    "bleu": (lambda ref, tool: True, corpus_bleu),
    "json_valid": (lambda ref, tool: parse_json(ref) is not None, _mean(lambda p, r: json_valid(p))),
    "tool_call": (lambda ref, tool: tool, _mean(tool_call_match)),
    "tool_name": (lambda ref, tool: tool, _mean(tool_name_match)),
}
TEXT_METRICS = ["exact_match", "token_f1", "rouge_l", "bleu"]


def choose_metrics(requested: Sequence[str] | str, refs: list[str], tool_flags: list[bool]) -> list[str]:
    """The metrics to compute: the configured list, or for "auto" the text metrics plus
    json_valid when some reference is JSON and tool_call/tool_name when some row is a tool call."""
    if requested != "auto":
        return list(requested)
    names = list(TEXT_METRICS)
    if any(t for t in tool_flags):
        names += ["tool_call", "tool_name"]
    if any(parse_json(r) is not None for r, t in zip(refs, tool_flags) if not t) or any(tool_flags):
        names.append("json_valid")
    return names


def score(names: list[str], preds: list[str], refs: list[str], tool_flags: list[bool]) -> dict[str, dict]:
    """{metric: {"value", "n"}} over the pairs each metric applies to (value NaN when none do)."""
    out = {}
    for name in names:
        applies, fn = METRICS[name]
        idx = [i for i, (r, t) in enumerate(zip(refs, tool_flags)) if applies(r, t)]
        p, r = [preds[i] for i in idx], [refs[i] for i in idx]
        out[name] = {"value": fn(p, r) if idx else float("nan"), "n": len(idx)}
    return out
