"""`ray_data.prepare` through real Ray Data: the same result as the in-process stage, file errors
surfaced from the workers, the written splits readable by `read_split`, and the cache reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oikyo_ray.config import load_config
from oikyo_ray.data.manifest import SPLITS
from oikyo_ray.data.prepare import prepare as prepare_local
from oikyo_ray.data.prepared import TRAIN_COLUMNS, load_split_rows
from oikyo_ray.data.ray_data import prepare, read_split
from oikyo_ray.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures" / "data"
MIX = ["dups.jsonl", "leak.jsonl", "messages_rows.jsonl", "alpaca_mixed.csv", "sharegpt_tools.json"]


def config(tmp_path: Path, files: list[str], *overrides: str):
    paths = ", ".join(str(FIXTURES / f) for f in files)
    # max_length 1024: the tiny tokenizer spends ~300 tokens on a fixture's tool schemas
    return load_config(
        None, [f"data.paths=[{paths}]", f"model.cache_dir={tmp_path / 'cache'}", "data.max_length=1024", *overrides]
    )


def lines(p: Path) -> list[str]:
    return p.read_text(encoding="utf-8").splitlines()


@pytest.mark.slow
@pytest.mark.ray
def test_prepare_on_ray_matches_the_local_stage(ray_session, tiny_model, tmp_path):
    out = tmp_path / "ray"
    m = prepare(config(tmp_path, MIX), str(tiny_model), out)
    local = prepare_local(config(tmp_path, MIX, "data.cache=false"), str(tiny_model), tmp_path / "local")

    assert m["counts"] == {"read": 46, "accepted": 20, "rejected": 26, "train": 16, "val": 0, "test": 4}
    assert m["counts"]["accepted"] + m["counts"]["rejected"] == m["counts"]["read"]
    for key in ("counts", "filters", "content_hash", "dedupe", "leakage", "meta", "tokens", "data_config_hash"):
        assert m[key] == local[key], key
    assert [(i["path"], i["sha256"], i["read"], i["accepted"]) for i in m["inputs"]] == [
        (i["path"], i["sha256"], i["read"], i["accepted"]) for i in local["inputs"]
    ]
    assert lines(out / "rejects.jsonl") == lines(tmp_path / "local" / "rejects.jsonl")
    for split in SPLITS:
        assert load_split_rows(out, split) == load_split_rows(tmp_path / "local", split), split
        assert (out / split).is_dir()
    assert json.loads((out / "manifest.json").read_text()) == m
    assert m["outputs"] == local["outputs"]  # the same files, byte for byte, whoever wrote them

    train = read_split(out, "train")
    assert train.count() == m["counts"]["train"] and train.columns() == TRAIN_COLUMNS

    again = prepare(config(tmp_path, MIX), str(tiny_model), tmp_path / "again")  # no Ray work: cache hit
    assert again["cache"]["hit"] is True and again["content_hash"] == m["content_hash"]

    with pytest.raises(DataError) as e:
        prepare(config(tmp_path, ["dups.jsonl", "truncated.json"]), str(tiny_model), tmp_path / "bad")
    assert "truncated.json: invalid JSON at line 2 column 23 (byte 60)" in str(e.value)


@pytest.mark.ray
def test_packing_on_ray_matches_the_local_stage(ray_session, tiny_model, tmp_path):
    """Ray packs each curated block where it lies; blocks equal the in-process stage's for one file."""
    import pyarrow.parquet as pq

    from oikyo_ray.data.cli import format_report
    from oikyo_ray.data.packing import PACKED_COLUMNS

    files = ["sharegpt_tools.json"]
    m = prepare(config(tmp_path, files, "data.packing=true", "data.pack_length=1024"), str(tiny_model), tmp_path / "r")
    local = prepare_local(
        config(tmp_path, files, "data.packing=true", "data.pack_length=1024", "data.cache=false"),
        str(tiny_model),
        tmp_path / "l",
    )
    assert m["packing"] == local["packing"] and m["packing"]["rows"] == m["counts"]["train"]

    def blocks(d):
        return sorted(map(str, pq.read_table(d / "train_packed").to_pylist()))

    assert blocks(tmp_path / "r") == blocks(tmp_path / "l")
    ds = read_split(tmp_path / "r", "train", packed=True)
    assert ds.columns() == PACKED_COLUMNS and ds.count() == m["packing"]["blocks"]
    assert "packing:" in format_report(m, [], tmp_path / "r")


@pytest.mark.ray
def test_a_multi_megabyte_text_corpus_is_cut_into_pieces_on_ray(ray_session, tiny_model, tmp_path):
    """A plain-text corpus larger than a piece: curated by several Ray Data tasks, every paragraph
    a row numbered by its line, as the in-process stage numbers it."""
    import random

    from oikyo_ray.data.pieces import PIECE_BYTES, plan

    rng = random.Random(0)
    words = [f"w{i}" for i in range(500)]
    paragraphs = [" ".join(rng.choices(words, k=4000)) for _ in range(300)]  # ~6 MB, 300 documents
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    assert corpus.stat().st_size > PIECE_BYTES and len(plan({"local": [str(corpus)]})[1]) == 2
    overrides = [
        f"data.paths=[{corpus}]",
        f"model.cache_dir={tmp_path / 'cache'}",
        "data.max_length=64",
        "data.max_chars=100000",
        "data.near_dup_threshold=null",
        "data.leakage_threshold=null",
        "data.cache=false",
    ]
    m = prepare(load_config(None, overrides), str(tiny_model), tmp_path / "ray")
    assert m["counts"]["read"] == m["counts"]["accepted"] == 300
    assert m["tokens"]["truncated"] == 300 and m["tokens"]["max"] == 64  # each document cut at max_length
    rows = [r for s in SPLITS for r in load_split_rows(tmp_path / "ray", s)]
    assert all(r["labels"] == r["input_ids"] for r in rows)
