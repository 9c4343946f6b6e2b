"""The whole data stage without Ray (`prepare.prepare` in this process: the same steps as on Ray
Data), its manifest and cache, and the `oikyo data prepare|inspect` commands."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from oikyo_ray.config import load_config
from oikyo_ray.data.cli import add_data_commands, format_report, reason_pattern
from oikyo_ray.data.curate import OUTPUT_COLUMNS
from oikyo_ray.data.manifest import SPLITS, data_config_hash
from oikyo_ray.data.prepare import prepare as prepare_local
from oikyo_ray.data.prepared import load_split_rows
from oikyo_ray.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures" / "data"
MIX = ["dups.jsonl", "leak.jsonl", "messages_rows.jsonl", "alpaca_mixed.csv"]


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def config(tmp_path: Path, files: list, *overrides: str):
    paths = ", ".join(str(f if isinstance(f, Path) else FIXTURES / f) for f in files)
    # max_length 1024: the tiny tokenizer spends ~300 tokens on a fixture's tool schemas
    return load_config(
        None,
        [
            f"data.paths=[{paths}]",
            f"model.cache_dir={tmp_path / 'cache'}",
            f"run.root={tmp_path / 'runs'}",
            "data.max_length=1024",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def tok_path(tiny_model) -> str:
    return str(tiny_model)


@pytest.fixture
def mix(tmp_path, tok_path):
    out = tmp_path / "out"
    return prepare_local(config(tmp_path, MIX), tok_path, out), out


def read_rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]


def test_counts_rejects_and_splits(mix):
    m, out = mix
    assert m["counts"] == {"read": 34, "accepted": 18, "rejected": 16, "train": 14, "val": 0, "test": 4}
    assert m["filters"] == {
        "duplicate": 3,
        "empty_turn": 1,
        "format": 2,
        "invalid_json": 1,
        "label": 1,
        "leakage": 3,
        "near_duplicate": 1,
        "role_order": 3,
        "unicode": 1,
    }
    assert [(Path(i["path"]).name, i["read"], i["accepted"], i["rejected"]) for i in m["inputs"]] == [
        ("dups.jsonl", 10, 7, 3),
        ("leak.jsonl", 8, 5, 3),
        ("messages_rows.jsonl", 11, 3, 8),
        ("alpaca_mixed.csv", 5, 3, 2),
    ]
    rejects = read_rejects(out)
    assert len(rejects) == 16 and all(set(r) == {"source", "row", "reason", "filter"} for r in rejects)
    assert rejects == sorted(rejects, key=lambda r: (r["source"], r["row"]))
    csv = str(FIXTURES.resolve() / "alpaca_mixed.csv")
    assert {"source": csv, "row": 5, "reason": f"duplicate of {csv}:1", "filter": "duplicate"} in rejects
    for split in SPLITS:
        rows = load_split_rows(out, split)
        assert len(rows) == m["counts"][split]
        assert all(list(r) == OUTPUT_COLUMNS for r in rows)
    train = load_split_rows(out, "train")
    assert [r["hash"] for r in train] == sorted(r["hash"] for r in train)
    kept = [(r["hash"], r["meta"]) for s in SPLITS for r in load_split_rows(out, s)]
    assert len(set(kept)) == 18  # no duplicate survived (a row's hash is of its messages; label and tools are meta)
    metas = [json.loads(r["meta"]) for s in SPLITS for r in load_split_rows(out, s)]
    assert sum("tools" in x for x in metas) == m["meta"]["tools"] == 2
    ignored = {"messages[].tool_call_id": 1}  # read by nothing (results follow calls in order): reported
    assert m["meta"] == {"tools": 2, "preference": 0, "label_true": 1, "label_false": 2, "ignored_keys": ignored}


def test_exact_rules_only(tmp_path, tok_path):
    """MinHash off: the global pass on exact keys alone, beside rows rejected before it."""
    m = prepare_local(
        config(tmp_path, MIX, "data.cache=false", "data.near_dup_threshold=null", "data.leakage_threshold=null"),
        tok_path,
        tmp_path / "out",
    )
    assert m["counts"] == {"read": 34, "accepted": 20, "rejected": 14, "train": 16, "val": 0, "test": 4}
    assert m["filters"]["duplicate"] == 3 and m["filters"]["leakage"] == 2 and "near_duplicate" not in m["filters"]
    assert (m["leakage"]["exact"], m["leakage"]["near"]) == (2, 0)


def test_manifest_hashes_and_histogram(mix, tmp_path):
    m, out = mix
    assert [i["sha256"] for i in m["inputs"]] == [sha(FIXTURES / f) for f in MIX]
    assert [i["bytes"] for i in m["inputs"]] == [(FIXTURES / f).stat().st_size for f in MIX]
    # one part per input piece (here: per file, in data.paths order) that kept rows of the split
    assert set(m["outputs"]) == {
        "rejects.jsonl",
        *(f"train/part-0000{i}.parquet" for i in range(4)),
        "test/part-00001.parquet",
    }
    assert all(sha(out / name) == digest for name, digest in m["outputs"].items())
    cfg = config(tmp_path, MIX)
    assert (
        m["data_config_hash"]
        == data_config_hash(cfg.data)
        != data_config_hash(config(tmp_path, MIX, "data.max_length=128").data)
    )
    assert data_config_hash(cfg.data) == data_config_hash(config(tmp_path, MIX, "data.cache=false").data)
    h = m["tokens"]["histogram"]
    assert h["edges"][0] == 0 and h["edges"][-1] == 1024 and len(h["edges"]) == 17
    assert [sum(h[s]) for s in SPLITS] == [m["counts"][s] for s in SPLITS]
    lengths = [r["num_tokens"] for s in SPLITS for r in load_split_rows(out, s)]
    assert m["tokens"]["total"] == sum(lengths) and m["tokens"]["max"] == max(lengths)
    assert json.loads((out / "manifest.json").read_text()) == m


def test_content_hash_depends_on_content_only(mix, tmp_path, tok_path):
    m, _ = mix
    again = prepare_local(config(tmp_path, MIX, "data.cache=false"), tok_path, tmp_path / "again")
    assert again["content_hash"] == m["content_hash"] and again["cache"]["hit"] is False
    other = prepare_local(config(tmp_path, MIX, "data.cache=false", "data.max_length=64"), tok_path, tmp_path / "o")
    assert other["content_hash"] != m["content_hash"]


def test_cache_reuse_and_invalidation(mix, tmp_path, tok_path):
    m, out = mix
    assert m["cache"]["hit"] is False
    hit = prepare_local(config(tmp_path, MIX), tok_path, tmp_path / "second")
    assert hit["cache"] == {
        "key": m["cache"]["key"],
        "hit": True,
        "dir": str(tmp_path / "cache" / "data" / m["cache"]["key"]),
    }
    assert {k: v for k, v in hit.items() if k != "cache"} == {k: v for k, v in m.items() if k != "cache"}
    for name, digest in m["outputs"].items():
        assert sha(tmp_path / "second" / name) == digest
    assert load_split_rows(tmp_path / "second", "train") == load_split_rows(out, "train")
    # a changed setting or a changed input byte misses
    assert (
        prepare_local(config(tmp_path, MIX, "data.max_repetition=0.9"), tok_path, tmp_path / "c")["cache"]["hit"]
        is False
    )
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in MIX:
        shutil.copy(FIXTURES / f, copy / f)
    base = prepare_local(config(tmp_path, [copy / f for f in MIX]), tok_path, tmp_path / "d")
    assert base["cache"]["hit"] is False  # other paths: other key (rejects name their source)
    with (copy / "leak.jsonl").open("a", encoding="utf-8") as fh:
        fh.write('{"instruction": "One more row.", "output": "Added."}\n')
    changed = prepare_local(config(tmp_path, [copy / f for f in MIX]), tok_path, tmp_path / "d")
    assert changed["cache"]["hit"] is False and changed["counts"]["read"] == 35


def test_cache_off_writes_no_cache(tmp_path, tok_path):
    m = prepare_local(config(tmp_path, ["dups.jsonl"], "data.cache=false"), tok_path, tmp_path / "out")
    assert m["cache"]["hit"] is False and not (tmp_path / "cache" / "data").exists()


def test_rerun_into_the_same_dir_leaves_no_stale_shards(tmp_path, tok_path):
    out = tmp_path / "out"
    prepare_local(config(tmp_path, MIX, "data.cache=false"), tok_path, out)
    (out / "train" / "stale-part.parquet").write_bytes((out / "train" / "part-00000.parquet").read_bytes())
    m = prepare_local(config(tmp_path, ["dups.jsonl"], "data.cache=false", "data.leakage=off"), tok_path, out)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["part-00000.parquet"]
    assert sum(len(load_split_rows(out, s)) for s in SPLITS) == m["counts"]["accepted"] == 7


def test_empty_val_and_test_splits(tmp_path, tok_path):
    out = tmp_path / "out"
    m = prepare_local(config(tmp_path, ["dups.jsonl"], "data.val_fraction=0", "data.test_fraction=0"), tok_path, out)
    assert (m["counts"]["train"], m["counts"]["val"], m["counts"]["test"]) == (7, 0, 0)
    assert (out / "val").is_dir() and not any((out / "val").iterdir())
    assert load_split_rows(out, "val") == [] and load_split_rows(out, "test") == []
    assert sum(m["tokens"]["histogram"]["val"]) == 0 and m["leakage"]["exact"] == 0


def test_no_usable_rows_raises_after_writing_rejects(tmp_path, tok_path):
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"no usable training rows \(2 of 2 rejected"):
        prepare_local(config(tmp_path, ["renamed.jsonl"]), tok_path, out)
    assert [r["filter"] for r in read_rejects(out)] == ["format", "format"]
    assert not (out / "manifest.json").exists() and not (out / "train").exists()


def test_broken_files_are_all_named(tmp_path, tok_path):
    with pytest.raises(DataError) as e:
        prepare_local(
            config(tmp_path, ["truncated.json", "dups.jsonl", "top_level_object.json", "empty.jsonl"]),
            tok_path,
            tmp_path / "out",
        )
    msg = str(e.value)
    assert "truncated.json: invalid JSON at line 2 column 23 (byte 60)" in msg
    assert "top_level_object.json: top level must be a JSON array of rows, got dict" in msg
    assert "empty.jsonl: empty file (no rows)" in msg and "dups.jsonl" not in msg


def test_a_directory_contributes_its_data_files_only(tmp_path, tok_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "README.md").write_text("# not data\n")
    shutil.copy(FIXTURES / "dups.jsonl", d / "dups.jsonl")
    m = prepare_local(config(tmp_path, [d], "data.leakage=off"), tok_path, tmp_path / "out")
    assert [Path(i["path"]).name for i in m["inputs"]] == ["dups.jsonl"] and m["counts"]["accepted"] == 7
    (tmp_path / "only_readme").mkdir()
    (tmp_path / "only_readme" / "README.md").write_text("x")
    with pytest.raises(DataError, match="data file not found"):
        prepare_local(config(tmp_path, [tmp_path / "only_readme"]), tok_path, tmp_path / "out2")


# ---- the CLI -----------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oikyo")
    add_data_commands(p.add_subparsers(dest="cmd", required=True))
    return p


def run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    return args.fn(args)


def test_inspect_prints_a_report_and_writes_a_png(mix, capsys):
    m, out = mix
    assert run(["data", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    for line in [
        f"  content hash {m['content_hash'][:16]}",
        "total                                                      34        18        16",
        "splits: train 14, val 0, test 4",
        "  role_order             3",
        "       3  duplicate of <source>:<row>",
        "duplicates removed: 3 exact, 1 near (threshold 0.9)",
        "leakage (remove, threshold 0.8): 2 exact, 1 near, 3 removed; pairs: train~test 2, val~test 1",
        "metadata kept: tools 2, preference pairs 0, labels true 1 / false 2",
        f"token-length histogram: {out / 'token_hist.png'}",
    ]:
        assert line in text, line
    png = (out / "token_hist.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_inspect_png_path_and_missing_manifest(mix, tmp_path):
    _, out = mix
    assert run(["data", "inspect", str(out), "--png", str(tmp_path / "figs" / "h.png")]) == 0
    assert (tmp_path / "figs" / "h.png").stat().st_size > 5000
    with pytest.raises(DataError, match="no manifest.json in"):
        run(["data", "inspect", str(tmp_path)])


def test_prepare_command_without_ray(tmp_path, tiny_model, cache_dir, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{cache_dir: {cache_dir}}}\ndata: {{paths: [{FIXTURES / 'dups.jsonl'}], leakage: 'off'}}\n")
    assert (
        run(
            [
                "data",
                "prepare",
                str(cfg),
                "data.cache=false",
                "data.max_length=1024",
                "--no-ray",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    assert "splits: train 7, val 0, test 0" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["counts"]["accepted"] == 7
    # without --out: <run.root>/data/<data config hash>
    assert run(["data", "prepare", str(cfg), f"run.root={tmp_path / 'runs'}", "--no-ray"]) == 0
    loaded = load_config(cfg)
    assert (tmp_path / "runs" / "data" / data_config_hash(loaded.data) / "manifest.json").is_file()


def test_reason_patterns_group_alike_reasons():
    assert (
        reason_pattern("duplicate of /a/b.jsonl:12")
        == reason_pattern("duplicate of c.json:3")
        == "duplicate of <source>:<row>"
    )
    assert reason_pattern("messages[3]: empty assistant message") == "messages[<n>]: empty assistant message"
    report = format_report(
        {"counts": {"read": 1, "accepted": 0, "rejected": 1}, "content_hash": "0" * 64},
        [{"source": "x.jsonl", "row": 1, "reason": "invalid JSON at column 3: Expecting value"}],
        Path("d"),
    )
    assert "       1  invalid JSON at column <n>: Expecting value" in report
