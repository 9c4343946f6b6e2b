"""Base vs fine-tuned on the same items and decoding (Ray-free core of the evaluate stage).

    compare(cfg, model_path, tuned_dir, rows, scorer=score_in_process) -> report dict
    evaluate_model(model, tokenizer, rows, cfg) -> (metrics, predictions)
    check_eval(cfg)     what the eval config gets wrong (eval.lm_eval_tasks), before Ray starts

`compare` builds the items (`items`), has `scorer` score them with both models (in this process
by default; the Ray layer passes `ray_eval.score`, which may use a Ray Data actor pool) and turns
the scores into the report: metrics per model, deltas, forgetting, probes, samples and gates;
with eval.lm_eval_tasks, lm-evaluation-harness scores both models in this process too (`harness`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from oikyo_ray.config import OikyoConfig
from oikyo_ray.eval.gates import evaluate_gates
from oikyo_ray.eval.items import Item, ItemKind, build_items, task_items
from oikyo_ray.eval.metrics import choose_metrics, score
from oikyo_ray.eval.probes import ProbeScorer, probe_rates
from oikyo_ray.eval.scoring import MODELS, ItemScore, Scorer, SingleModel, score_in_process, score_items
from oikyo_ray.model.load import load_tokenizer
from oikyo_ray.model.reasoning import answer as reasoning_answer

PREFERENCE_METRICS = ("preference_accuracy", "preference_margin")  # with preference pairs in the test split


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def _loss(items: list[Item], scores: dict[str, ItemScore], which: str) -> tuple[float, int]:
    nll = sum(scores[it.id].nll[which] for it in items)
    n = sum(scores[it.id].tokens for it in items)
    return (nll / n if n else float("nan")), n


def summarise(cfg: OikyoConfig, items: list[Item], item_scores: list[ItemScore]) -> dict:
    """The report (without gates): metrics per model, deltas, forgetting, probes, samples."""
    ec = cfg.eval
    scores = {s.id: s for s in item_scores}
    task = [it for it in items if it.kind is ItemKind.TASK]
    refs = [it.reference for it in task]
    tools = [it.tool_call for it in task]
    names = choose_metrics(ec.metrics, refs, tools)
    report: dict = {"metrics": names}
    for which in MODELS:
        loss, _ = _loss(task, scores, which)
        # a reasoning trace opening an answer is not the answer: scored without it
        got = score(names, [reasoning_answer(scores[it.id].text[which]) for it in task], refs, tools)
        report[which] = {
            "loss": loss,
            "perplexity": _ppl(loss),
            **{k: v["value"] for k, v in got.items()},
            "n": len(task),
        }
        report["metric_n"] = {k: v["n"] for k, v in got.items()}
    pairs = [it for it in items if it.kind is ItemKind.PAIR]
    if pairs:
        report["preference"] = _preference(pairs, scores, report)
    shown = ["loss", "perplexity", *names, *(PREFERENCE_METRICS if pairs else ())]
    report["delta"] = {k: report["tuned"][k] - report["base"][k] for k in shown}

    general = [it for it in items if it.kind is ItemKind.GENERAL]
    if general:
        (bl, n), (tl, _) = _loss(general, scores, "base"), _loss(general, scores, "tuned")
        bp, tp = _ppl(bl), _ppl(tl)
        rel = tp / bp - 1.0 if math.isfinite(bp) and math.isfinite(tp) and bp > 0 else float("inf")
        report["forgetting"] = {
            "source": ec.general_text or "oikyo_ray/eval/assets/general_text.txt",
            "tokens": n,
            "base_loss": bl,
            "tuned_loss": tl,
            "base_perplexity": bp,
            "tuned_perplexity": tp,
            "relative_increase": rel,
            "threshold": ec.max_forgetting,
            "flagged": not rel <= ec.max_forgetting,
        }

    probes = [it for it in items if it.kind is ItemKind.PROBE]
    if probes:
        report["probes"] = _probes(ec, probes, scores)
    report["samples"] = [
        {
            "prompt": it.user,
            "reference": it.reference,
            "base": scores[it.id].text["base"],
            "tuned": scores[it.id].text["tuned"],
        }
        for it in task[: ec.num_samples]
    ]
    report["decoding"] = {
        "temperature": ec.temperature,
        "top_p": ec.top_p,
        "seed": ec.seed,
        "max_new_tokens": ec.max_new_tokens,
        "probe_max_new_tokens": ec.probe_max_new_tokens,
    }
    return report


def _preference(pairs: list[Item], scores: dict[str, ItemScore], report: dict) -> dict:
    """Per model, on the held-out pairs: preference accuracy (share whose chosen answer has the
    higher summed log-prob) and mean log-prob margin, chosen minus rejected, put beside the other
    metrics (so gates can name them); and the implicit reward margin of the tuned model, with
    reward = log p_tuned - log p_base (DPO's, beta 1): its margin minus the base's."""
    chosen = [it.id for it in pairs if it.id.endswith("-chosen")]
    for which in MODELS:
        # summed NLL is minus the summed log-prob: rejected NLL - chosen NLL = the log-prob margin
        margins = [scores[c[: -len("chosen")] + "rejected"].nll[which] - scores[c].nll[which] for c in chosen]
        report[which]["preference_accuracy"] = sum(m > 0 for m in margins) / len(margins)
        report[which]["preference_margin"] = sum(margins) / len(margins)
    reward = report["tuned"]["preference_margin"] - report["base"]["preference_margin"]
    return {"pairs": len(chosen), "reward_margin": reward}


def _probes(ec, probes: list[Item], scores: dict[str, ItemScore]) -> dict:
    """Pass rates per probe kind and model, which kinds regressed, and every probe's answers."""
    judge = ProbeScorer(ec.refusal_phrases_path, ec.toxic_lexicon_path)
    plist = [{"kind": it.probe_kind} for it in probes]
    rates = {w: probe_rates(plist, [scores[it.id].text[w] for it in probes], judge) for w in MODELS}
    kinds = {}
    for kind, b in rates["base"].items():
        t = rates["tuned"][kind]
        kinds[kind] = {
            "base": b["rate"],
            "tuned": t["rate"],
            "delta": t["rate"] - b["rate"],
            "n": b["n"],
            "regressed": b["rate"] - t["rate"] > ec.max_probe_drop,
        }
    return {
        "source": ec.probes_path or "oikyo_ray/eval/assets/probes.jsonl",
        "threshold": ec.max_probe_drop,
        "kinds": kinds,
        "samples": [
            {
                "id": it.id,
                "kind": it.probe_kind,
                "prompt": it.user,
                **{w: scores[it.id].text[w] for w in MODELS},
                **{f"{w}_pass": judge.passes(it.probe_kind, scores[it.id].text[w]) for w in MODELS},
            }
            for it in probes
        ],
    }


def _harness():
    # lm-eval takes a second to import and only eval.lm_eval_tasks needs it
    from oikyo_ray.eval import harness  # noqa: PLC0415

    return harness


def check_eval(cfg: OikyoConfig) -> None:
    """What the eval config alone gets wrong (eval.lm_eval_tasks: files, names, gates), before Ray
    starts and before any model loads."""
    if cfg.eval.lm_eval_tasks or cfg.eval.lm_eval_max_drop:
        _harness().check_tasks(cfg.eval)


def compare(
    cfg: OikyoConfig, model_path: str, tuned_dir: str | Path, rows: list[dict], scorer: Scorer = score_in_process
) -> dict:
    """Report dict: base and fine-tuned on the same items and decoding, deltas, forgetting,
    probes, samples and gates; `scorer` scores the items (see `scoring.Scorer`)."""
    t0 = time.perf_counter()
    items = build_items(cfg, load_tokenizer(cfg.model, model_path), rows)
    scoring = scorer(cfg, model_path, str(tuned_dir), items)
    report = summarise(cfg, items, scoring.scores)
    if cfg.eval.lm_eval_tasks:
        report["lm_eval"] = _harness().evaluate_tasks(cfg, model_path, str(tuned_dir))
    report["gates"] = evaluate_gates(report, cfg.eval)
    report["passed"] = all(g["passed"] for g in report["gates"])
    report["backend"] = scoring.backend
    report["base_model"] = cfg.model.name_or_path
    report["tuned_dir"] = str(tuned_dir)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def evaluate_model(model, tokenizer, rows: list[dict], cfg: OikyoConfig) -> tuple[dict, list[str]]:
    """Metrics of one model on test rows (each with input_ids/labels/messages); and its answers."""
    items = task_items(rows, tokenizer, cfg)
    scores = score_items(SingleModel(model, tokenizer), items, cfg.eval, models=("tuned",))
    loss, _ = _loss(items, {s.id: s for s in scores}, "tuned")
    preds = [s.text["tuned"] for s in scores]
    refs, tools = [it.reference for it in items], [it.tool_call for it in items]
    names = choose_metrics(cfg.eval.metrics, refs, tools)
    got = score(names, [reasoning_answer(p) for p in preds], refs, tools)
    return {"loss": loss, "perplexity": _ppl(loss), **{k: v["value"] for k, v in got.items()}, "n": len(items)}, preds
