"""The global pass (Ray-free): exact and near duplicates, leakage across splits; every removal
is named with the row it duplicates, nothing is dropped silently."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from functools import partial

from oikyo_ray.config import DataConfig as _DataConfig
from oikyo_ray.config import ModelConfig
from oikyo_ray.data.curate import curate_file
from oikyo_ray.data.quality import global_filter

FIXTURES = Path(__file__).parent / "fixtures" / "data"
# the tiny tokenizer spends ~300 tokens on a fixture's tool schemas: room for the answers
DataConfig = partial(_DataConfig, max_length=1024)


@pytest.fixture(scope="module")
def tok(tiny_model):
    from oikyo_ray.model.load import load_tokenizer

    return load_tokenizer(ModelConfig(), str(tiny_model))


def accepted(tok, data: DataConfig, *names: str) -> list[dict]:
    recs = []
    for n in names:
        recs += curate_file(n, (FIXTURES / n).read_bytes(), data, tok)
    assert all(r["status"] == "ok" for r in recs), [r["reason"] for r in recs if r["status"] != "ok"]
    return recs


def removed(res) -> dict[int, tuple[str, str]]:
    return {row: (d.kind, d.reason) for (_, row), d in sorted(res.removed.items(), key=lambda kv: kv[0][1])}


NEAR = re.compile(r"near-duplicate of dups\.jsonl:3 \(estimated Jaccard (\d\.\d\d) >= data\.near_dup_threshold=0\.9\)")


def test_duplicates_and_near_duplicates(tok):
    data = DataConfig(leakage="off")
    res = global_filter(accepted(tok, data, "dups.jsonl"), data, ["dups.jsonl"])
    got = removed(res)
    assert set(got) == {2, 4, 10}  # 5 (same prompt, other answer), 7 (other label), 9 (other tools) stay
    assert got[2] == ("duplicate", "duplicate of dups.jsonl:1")  # case and spacing differ only
    assert got[10] == ("duplicate", "duplicate of dups.jsonl:8")
    kind, reason = got[4]
    m = NEAR.fullmatch(reason)
    assert kind == "near_duplicate" and m and float(m.group(1)) >= 0.9, reason
    assert res.stats["dedupe"] == {"duplicate": 2, "near_duplicate": 1}


def test_dedupe_switches(tok):
    off = DataConfig(leakage="off", dedupe=False, near_dup_threshold=None)
    assert global_filter(accepted(tok, off, "dups.jsonl"), off, ["dups.jsonl"]).removed == {}
    near_only = DataConfig(leakage="off", dedupe=False)
    got = removed(global_filter(accepted(tok, near_only, "dups.jsonl"), near_only, ["dups.jsonl"]))
    assert set(got) == {2, 4, 10} and all(k == "near_duplicate" for k, _ in got.values())
    assert got[2][1] == "near-duplicate of dups.jsonl:1 (estimated Jaccard 1.00 >= data.near_dup_threshold=0.9)"
    exact_only = DataConfig(leakage="off", near_dup_threshold=None)
    assert set(removed(global_filter(accepted(tok, exact_only, "dups.jsonl"), exact_only, ["dups.jsonl"]))) == {2, 10}


def test_first_occurrence_in_file_order_is_kept(tok):
    data = DataConfig(leakage="off")
    recs = accepted(tok, data, "dups.jsonl")
    other = [{**r, "source": "other.jsonl"} for r in recs if r["row"] == 1]
    res = global_filter(recs + other, data, ["other.jsonl", "dups.jsonl"])  # other.jsonl is listed first
    got = {(s, n): d.reason for (s, n), d in res.removed.items()}
    assert got[("dups.jsonl", 1)] == "duplicate of other.jsonl:1"
    assert got[("dups.jsonl", 2)] == "duplicate of other.jsonl:1"
    assert ("other.jsonl", 1) not in got


def test_leakage_removed_from_the_later_split(tok):
    data = DataConfig()
    recs = accepted(tok, data, "leak.jsonl")
    assert [r["split"] for r in recs] == ["train", "test", "val", "test", "train", "test", "train", "test"]
    res = global_filter(recs, data, ["leak.jsonl"])
    got = removed(res)
    assert set(got) == {1, 3, 5}
    assert got[1] == ("leakage", "leaks into test: same prompt as leak.jsonl:2")
    assert got[3] == ("leakage", "leaks into test: same prompt as leak.jsonl:2")
    assert re.fullmatch(r"leaks into test: prompt near-duplicate \(estimated Jaccard 0\.\d\d\) of leak\.jsonl:4", got[5][1])
    assert {k: v for k, v in res.stats["leakage"].items()} == {
        "action": "remove", "threshold": 0.8, "exact": 2, "near": 1, "removed": 3,
        "pairs": {"val~test": 1, "train~test": 2}}
    assert [(x["row"], x["split"], x["kind"], x["other"]) for x in res.leaks] == [
        (3, "val", "exact", "leak.jsonl:2"), (1, "train", "exact", "leak.jsonl:2"), (5, "train", "near", "leak.jsonl:4")]


def test_leakage_report_off_and_exact_only(tok):
    report = DataConfig(leakage="report")
    res = global_filter(accepted(tok, report, "leak.jsonl"), report, ["leak.jsonl"])
    assert res.removed == {} and len(res.leaks) == 3 and res.stats["leakage"]["removed"] == 0
    off = DataConfig(leakage="off")
    res = global_filter(accepted(tok, off, "leak.jsonl"), off, ["leak.jsonl"])
    assert res.removed == {} and res.leaks == []
    exact = DataConfig(leakage_threshold=None)
    assert set(removed(global_filter(accepted(tok, exact, "leak.jsonl"), exact, ["leak.jsonl"]))) == {1, 3}


def test_global_filter_is_deterministic_whatever_the_input_order(tok):
    data = DataConfig()
    recs = accepted(tok, data, "dups.jsonl", "leak.jsonl")
    a = global_filter(recs, data, ["dups.jsonl", "leak.jsonl"])
    b = global_filter(list(reversed(recs)), data, ["dups.jsonl", "leak.jsonl"])
    assert {k: v.reason for k, v in a.removed.items()} == {k: v.reason for k, v in b.removed.items()}


def test_shared_datasets_duplicates_and_leaks(shared_dir, tok):
    data = DataConfig(max_length=8192)
    files = sorted((shared_dir / "datasets").glob("*.json*"))
    recs = [r for f in files for r in curate_file(f.name, f.read_bytes(), data, tok) if r["status"] == "ok"]
    res = global_filter(recs, data, [f.name for f in files])
    by = {}
    for (src, row), d in res.removed.items():
        by.setdefault((src, d.kind), []).append(row)
    assert {k: len(v) for k, v in by.items()} == {
        ("alpaca_en_demo.json", "duplicate"): 14, ("glaive_toolcall_en_demo.json", "duplicate"): 35,
        ("dpo_en_demo.json", "duplicate"): 5, ("kto_en_demo.json", "leakage"): 3,
        ("dpo_en_demo.json", "leakage"): 1, ("glaive_toolcall_en_demo.json", "leakage"): 1}
    assert res.removed[("alpaca_en_demo.json", 276)].reason == "duplicate of alpaca_en_demo.json:118"
    assert res.removed[("dpo_en_demo.json", 146)].reason == "leaks into test: same prompt as kto_en_demo.json:91"
    assert res.removed[("kto_en_demo.json", 281)].reason == "leaks into test: same prompt as dpo_en_demo.json:213"
    assert res.removed[("glaive_toolcall_en_demo.json", 235)].reason.startswith(
        "leaks into val: prompt near-duplicate (estimated Jaccard ")
    assert res.stats["dedupe"] == {"duplicate": 54, "near_duplicate": 0}
    assert res.stats["leakage"]["pairs"] == {"val~test": 1, "train~val": 2, "train~test": 2}


def _table(recs: list[dict]):
    from oikyo_ray.data.curate import SUMMARY_COLUMNS, to_table

    return to_table(recs, SUMMARY_COLUMNS)


@pytest.mark.parametrize("leakage", ["remove", "report", "off"])
def test_columnar_exact_pass_equals_the_row_loop(tok, shared_dir, leakage):
    """With MinHash off the pipeline decides on Arrow columns (`exact.filter_table`): the same
    removals, reasons, leaks and stats as `global_filter`, in any input order."""
    import numpy as np

    from oikyo_ray.data.exact import filter_table

    data = DataConfig(max_length=8192, near_dup_threshold=None, leakage_threshold=None, leakage=leakage,
                      val_fraction=0.2, test_fraction=0.2)
    files = [FIXTURES / n for n in ("dups.jsonl", "leak.jsonl")] + sorted((shared_dir / "datasets").glob("*.json*"))
    recs = [r for f in files for r in curate_file(f.name, f.read_bytes(), data, tok) if r["status"] == "ok"]
    order = [f.name for f in files]
    want = global_filter(recs, data, order)
    shuffled = [recs[i] for i in np.random.default_rng(0).permutation(len(recs))]
    got, at = filter_table(_table(shuffled), data, order)
    assert {k: (v.kind, v.reason) for k, v in got.removed.items()} == {k: (v.kind, v.reason) for k, v in want.removed.items()}
    assert got.leaks == want.leaks and got.stats == want.stats
    assert sorted((shuffled[i]["source"], shuffled[i]["row"]) for i in at) == sorted(want.removed)
    assert want.stats["dedupe"]["duplicate"] > 10  # the case has duplicates to find
    assert leakage == "off" or want.stats["leakage"]["exact"] > 0  # ... and leaks


def test_near_duplicate_configs_take_the_row_loop(tok):
    from oikyo_ray.data.exact import filter_table

    data = DataConfig()  # MinHash on by default
    recs = accepted(tok, data, "dups.jsonl")
    got, at = filter_table(_table(recs), data, ["dups.jsonl"])
    assert removed(got) == removed(global_filter(recs, data, ["dups.jsonl"]))
    assert any(d.kind == "near_duplicate" for d in got.removed.values())
    assert sorted(recs[i]["row"] for i in at) == sorted(row for _, row in got.removed)
