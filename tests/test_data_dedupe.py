"""The global pass (Ray-free, `dedupe.filter_table`): exact and near duplicates, leakage across
splits; every removal is named with the row it duplicates, nothing is dropped silently."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from oikyo_ray.config import DataConfig as _DataConfig
from oikyo_ray.config import ModelConfig
from oikyo_ray.data.curate import SUMMARY_COLUMNS, curate_file, to_table
from oikyo_ray.data.dedupe import filter_table
from oikyo_ray.data.quality import row_keys

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


def global_pass(recs: list[dict], data, files: list[str]):
    """`filter_table` on curated records; checks that the positions it returns are the removed rows."""
    res, at = filter_table(to_table(recs, SUMMARY_COLUMNS), data, files)
    assert sorted((recs[i]["source"], recs[i]["row"]) for i in at) == sorted(res.removed)
    return res


def removed(res) -> dict[int, tuple[str, str]]:
    return {row: (d.kind, d.reason) for (_, row), d in sorted(res.removed.items(), key=lambda kv: kv[0][1])}


NEAR = re.compile(r"near-duplicate of dups\.jsonl:3 \(estimated Jaccard (\d\.\d\d) >= data\.near_dup_threshold=0\.9\)")


def test_duplicates_and_near_duplicates(tok):
    data = DataConfig(leakage="off")
    res = global_pass(accepted(tok, data, "dups.jsonl"), data, ["dups.jsonl"])
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
    assert global_pass(accepted(tok, off, "dups.jsonl"), off, ["dups.jsonl"]).removed == {}
    near_only = DataConfig(leakage="off", dedupe=False)
    got = removed(global_pass(accepted(tok, near_only, "dups.jsonl"), near_only, ["dups.jsonl"]))
    assert set(got) == {2, 4, 10} and all(k == "near_duplicate" for k, _ in got.values())
    assert got[2][1] == "near-duplicate of dups.jsonl:1 (estimated Jaccard 1.00 >= data.near_dup_threshold=0.9)"
    exact_only = DataConfig(leakage="off", near_dup_threshold=None)
    assert set(removed(global_pass(accepted(tok, exact_only, "dups.jsonl"), exact_only, ["dups.jsonl"]))) == {2, 10}


def test_first_occurrence_in_file_order_is_kept(tok):
    data = DataConfig(leakage="off")
    recs = accepted(tok, data, "dups.jsonl")
    other = [{**r, "source": "other.jsonl"} for r in recs if r["row"] == 1]
    res = global_pass(recs + other, data, ["other.jsonl", "dups.jsonl"])  # other.jsonl is listed first
    got = {(s, n): d.reason for (s, n), d in res.removed.items()}
    assert got[("dups.jsonl", 1)] == "duplicate of other.jsonl:1"
    assert got[("dups.jsonl", 2)] == "duplicate of other.jsonl:1"
    assert ("other.jsonl", 1) not in got


def test_leakage_removed_from_the_later_split(tok):
    data = DataConfig()
    recs = accepted(tok, data, "leak.jsonl")
    assert [r["split"] for r in recs] == ["train", "test", "val", "test", "train", "test", "train", "test"]
    res = global_pass(recs, data, ["leak.jsonl"])
    got = removed(res)
    assert set(got) == {1, 3, 5}
    assert got[1] == ("leakage", "leaks into test: same prompt as leak.jsonl:2")
    assert got[3] == ("leakage", "leaks into test: same prompt as leak.jsonl:2")
    assert re.fullmatch(
        r"leaks into test: prompt near-duplicate \(estimated Jaccard 0\.\d\d\) of leak\.jsonl:4", got[5][1]
    )
    assert {k: v for k, v in res.stats["leakage"].items()} == {
        "action": "remove",
        "threshold": 0.8,
        "exact": 2,
        "near": 1,
        "removed": 3,
        "pairs": {"val~test": 1, "train~test": 2},
    }
    assert [(x["row"], x["split"], x["kind"], x["other"]) for x in res.leaks] == [
        (3, "val", "exact", "leak.jsonl:2"),
        (1, "train", "exact", "leak.jsonl:2"),
        (5, "train", "near", "leak.jsonl:4"),
    ]


def test_leakage_report_off_and_exact_only(tok):
    report = DataConfig(leakage="report")
    res = global_pass(accepted(tok, report, "leak.jsonl"), report, ["leak.jsonl"])
    assert res.removed == {} and len(res.leaks) == 3 and res.stats["leakage"]["removed"] == 0
    off = DataConfig(leakage="off")
    res = global_pass(accepted(tok, off, "leak.jsonl"), off, ["leak.jsonl"])
    assert res.removed == {} and res.leaks == []
    exact = DataConfig(leakage_threshold=None)
    assert set(removed(global_pass(accepted(tok, exact, "leak.jsonl"), exact, ["leak.jsonl"]))) == {1, 3}


@pytest.mark.parametrize("near", [True, False])
def test_global_pass_is_deterministic_whatever_the_input_order(tok, near):
    data = DataConfig() if near else DataConfig(near_dup_threshold=None, leakage_threshold=None)
    recs = accepted(tok, data, "dups.jsonl", "leak.jsonl")
    a = global_pass(recs, data, ["dups.jsonl", "leak.jsonl"])
    shuffled = [recs[i] for i in np.random.default_rng(0).permutation(len(recs))]
    b = global_pass(shuffled, data, ["dups.jsonl", "leak.jsonl"])
    decisions = lambda res: {k: (v.kind, v.reason) for k, v in res.removed.items()}  # noqa: E731
    assert decisions(a) == decisions(b)
    assert a.leaks == b.leaks and a.stats == b.stats and len(a.removed) == (6 if near else 4)


def test_shared_datasets_duplicates_and_leaks(shared_dir, tok):
    data = DataConfig(max_length=8192)
    files = sorted((shared_dir / "datasets").glob("*.json*"))
    recs = [r for f in files for r in curate_file(f.name, f.read_bytes(), data, tok) if r["status"] == "ok"]
    res = global_pass(recs, data, [f.name for f in files])
    by = {}
    for (src, row), d in res.removed.items():
        by.setdefault((src, d.kind), []).append(row)
    assert {k: len(v) for k, v in by.items()} == {
        ("alpaca_en_demo.json", "duplicate"): 14,
        ("glaive_toolcall_en_demo.json", "duplicate"): 35,
        ("dpo_en_demo.json", "duplicate"): 5,
        ("kto_en_demo.json", "leakage"): 3,
        ("dpo_en_demo.json", "leakage"): 1,
        ("glaive_toolcall_en_demo.json", "leakage"): 1,
    }
    assert res.removed[("alpaca_en_demo.json", 276)].reason == "duplicate of alpaca_en_demo.json:118"
    assert res.removed[("dpo_en_demo.json", 146)].reason == "leaks into test: same prompt as kto_en_demo.json:91"
    assert res.removed[("kto_en_demo.json", 281)].reason == "leaks into test: same prompt as dpo_en_demo.json:213"
    assert res.removed[("glaive_toolcall_en_demo.json", 235)].reason.startswith(
        "leaks into val: prompt near-duplicate (estimated Jaccard "
    )
    assert res.stats["dedupe"] == {"duplicate": 54, "near_duplicate": 0}
    assert res.stats["leakage"]["pairs"] == {"val~test": 1, "train~val": 2, "train~test": 2}


WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
    "one",
    "two",
    "three",
    "four",
]


def summary(rows: list[tuple[str, str, str]], data) -> pa.Table:
    """The summary columns the global pass reads, for rows of (split, prompt, answer) of t.jsonl."""
    recs = []
    for n, (split, prompt, answer) in enumerate(rows, start=1):
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        recs.append({"source": "t.jsonl", "row": n, "split": split, **row_keys(msgs, {}, data)})
    return pa.Table.from_pylist(recs)


def test_exact_rules_run_before_the_near_ones():
    """A copy of a row that went as a near-duplicate (or as a near leak) names that row: the exact
    rules see every row, the near ones only what the exact ones left."""
    text, near_text = " ".join(WORDS), " ".join(WORDS[:-1] + ["five"])  # one word of 30 changed
    data = _DataConfig(near_dup_threshold=0.8, leakage="off")
    rows = [("train", "Say it.", text), ("train", "Say it.", near_text), ("train", "SAY  it.", near_text.upper())]
    res, at = filter_table(summary(rows, data), data, ["t.jsonl"])
    got = removed(res)
    assert set(got) == {2, 3} and got[3] == ("duplicate", "duplicate of t.jsonl:2")
    assert got[2][0] == "near_duplicate" and re.fullmatch(
        r"near-duplicate of t\.jsonl:1 \(estimated Jaccard 0\.\d\d >= data\.near_dup_threshold=0\.8\)", got[2][1]
    )
    assert at.tolist() == [1, 2] and res.stats["dedupe"] == {"duplicate": 1, "near_duplicate": 1}

    data = _DataConfig(near_dup_threshold=None, leakage_threshold=0.8)
    rows = [("test", text, "A."), ("val", near_text, "B."), ("train", near_text, "C.")]
    res, at = filter_table(summary(rows, data), data, ["t.jsonl"])
    got = removed(res)
    assert got[3] == ("leakage", "leaks into val: same prompt as t.jsonl:2")
    assert re.fullmatch(
        r"leaks into test: prompt near-duplicate \(estimated Jaccard 0\.\d\d\) of t\.jsonl:1", got[2][1]
    )
    assert [(x["row"], x["kind"], x["other"]) for x in res.leaks] == [
        (2, "near", "t.jsonl:1"),
        (3, "exact", "t.jsonl:2"),
    ]
    assert res.stats["leakage"]["pairs"] == {"val~test": 1, "train~val": 1} and at.tolist() == [1, 2]


def test_leaked_rows_are_not_leaked_into():
    """A removed leak leaves the index (the next split's copy names the held-out original), a
    reported one stays in it (and the next split's copy names it)."""
    near_text = " ".join(WORDS[:-1] + ["five"])
    rows = [("test", " ".join(WORDS), "A."), ("val", near_text, "B."), ("train", near_text + " six", "C.")]
    remove = _DataConfig(near_dup_threshold=None, leakage_threshold=0.7)
    res, _ = filter_table(summary(rows, remove), remove, ["t.jsonl"])
    assert [(x["row"], x["other"]) for x in res.leaks] == [(2, "t.jsonl:1"), (3, "t.jsonl:1")]
    report = _DataConfig(near_dup_threshold=None, leakage_threshold=0.7, leakage="report")
    res, at = filter_table(summary(rows, report), report, ["t.jsonl"])
    assert [(x["row"], x["other"]) for x in res.leaks] == [(2, "t.jsonl:1"), (3, "t.jsonl:2")]
    assert res.removed == {} and len(at) == 0
