"""Preference metrics of the evaluation (Ray-free): the test split's pairs as loss items, base vs
tuned preference accuracy and margin in the report beside the other metrics, and gates on them."""

from __future__ import annotations

import pytest

from oikyo_ray.config import EvalConfig, load_config
from oikyo_ray.data.tokenize import IGNORE
from oikyo_ray.eval.compare import summarise
from oikyo_ray.eval.gates import evaluate_gates
from oikyo_ray.eval.items import Item, ItemKind, pair_items
from oikyo_ray.eval.report import format_table
from oikyo_ray.eval.scoring import ItemScore

ROWS = [
    {"prompt_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8, 9]},
    {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []},  # no room within data.max_length: skipped
    {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": []},  # a KTO row, not a pair: skipped
    {"input_ids": [1, 2], "labels": [1, 2]},  # prepared without preference columns: skipped
    {"prompt_ids": [3], "chosen_ids": [4, 4], "rejected_ids": [2]},
]


def test_pairs_become_a_chosen_and_a_rejected_item_with_the_prompt_unlabelled():
    items = pair_items(ROWS, load_config(None, []))
    assert [it.id for it in items] == ["pair-0-chosen", "pair-0-rejected", "pair-1-chosen", "pair-1-rejected"]
    assert {it.kind for it in items} == {ItemKind.PAIR} and not any(it.prompt for it in items)
    assert items[1].input_ids == (5, 6, 8, 9) and items[1].labels == (IGNORE, IGNORE, 8, 9)
    assert len(pair_items(ROWS, load_config(None, ["eval.max_samples=1"]))) == 2


def _report(nll: dict[str, dict[str, float]], ec: EvalConfig | None = None) -> dict:
    """The report of one task item and the pairs of ROWS, with per-model summed NLL per pair item."""
    cfg = load_config(None, ["eval.metrics=[exact_match]"])
    if ec is not None:
        cfg = cfg.model_copy(update={"eval": ec})
    task = Item("task-0", ItemKind.TASK, "p", (1, 2), (1, 2), "a")
    items = [task, *pair_items(ROWS, cfg)]
    scores = [ItemScore("task-0", 1, {"base": 2.0, "tuned": 1.0}, {"base": "a", "tuned": "a"})]
    scores += [ItemScore(i, 1, {m: nll[m][i] for m in nll}, {m: "" for m in nll}) for i in nll["base"]]
    report = summarise(cfg, items, scores)
    report["gates"] = evaluate_gates(report, cfg.eval)
    return report


# NLL = minus the summed log-prob: pair 0 prefers rejected under the base, both pairs chosen when tuned
NLL = {
    "base": {"pair-0-chosen": 3.0, "pair-0-rejected": 2.0, "pair-1-chosen": 1.0, "pair-1-rejected": 4.0},
    "tuned": {"pair-0-chosen": 1.0, "pair-0-rejected": 2.5, "pair-1-chosen": 0.5, "pair-1-rejected": 4.5},
}


def test_preference_accuracy_and_margins_base_vs_tuned():
    r = _report(NLL)
    assert r["base"]["preference_accuracy"] == 0.5 and r["tuned"]["preference_accuracy"] == 1.0
    assert r["base"]["preference_margin"] == pytest.approx((-1.0 + 3.0) / 2)
    assert r["tuned"]["preference_margin"] == pytest.approx((1.5 + 4.0) / 2)
    assert r["preference"] == {"pairs": 2, "reward_margin": pytest.approx(2.75 - 1.0)}
    assert r["delta"]["preference_accuracy"] == 0.5 and r["metrics"] == ["exact_match"]  # not a 0-1 chart metric
    table = format_table(r)
    assert "| preference_accuracy | 0.5000 | 1.0000 | 0.5000 |" in table and "| preference_margin |" in table


def test_gates_name_the_preference_metrics():
    ec = EvalConfig(min_improvement={"preference_accuracy": 0.25}, min_tuned={"preference_margin": 3.0})
    gates = {g["name"]: g for g in _report(NLL, ec)["gates"]}
    assert gates["improvement:preference_accuracy"]["passed"]
    assert not gates["tuned:preference_margin"]["passed"]  # 2.75 < 3


def test_a_test_split_without_pairs_reports_no_preference_metrics():
    cfg = load_config(None, ["eval.metrics=[exact_match]"])
    task = Item("task-0", ItemKind.TASK, "p", (1, 2), (1, 2), "a")
    r = summarise(cfg, [task], [ItemScore("task-0", 1, {"base": 2.0, "tuned": 1.0}, {"base": "a", "tuned": "a"})])
    assert "preference" not in r and "preference_accuracy" not in r["base"]
    assert not any(g["metric"] == "preference_accuracy" for g in evaluate_gates(r, EvalConfig()))
