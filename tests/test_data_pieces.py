"""Big jsonl files are cut into line-aligned pieces: row numbers, rejects and hashes are those of
the whole file, and the Ray stage curates the pieces in parallel with the same result."""

from __future__ import annotations

import hashlib
import io
import json

import pytest

from oikyo_ray.config import load_config
from oikyo_ray.data.curate import _tokenizer, curate_file
from oikyo_ray.data.pieces import plan, scan_file


def _file() -> bytes:
    rows = [
        json.dumps({"instruction": f"What is {i} plus {i}?", "output": f"It is {2 * i}."}).encode() for i in range(40)
    ]
    rows[3] = b'{"instruction": "truncated'  # invalid JSON -> a reject on its own line
    rows[7] = b""  # blank lines count, as in an editor
    rows[11] = b'{"instruction": "caf\xe9", "output": "x"}'  # not UTF-8
    rows[20] = json.dumps({"instruction": "long " * 400, "output": "ok"}).encode()  # longer than a piece
    return b"\xef\xbb\xbf" + b"\r\n".join(rows[:30]) + b"\n" + b"\n".join(rows[30:]) + b"\n"


def _summary(recs):
    return [(r["row"], r["status"], r["reason"], r["hash"]) for r in recs]


@pytest.mark.parametrize("piece_bytes", [64, 300, 10**6])
def test_pieces_curate_to_the_same_records_as_the_whole_file(tiny_model, piece_bytes):
    data = _file()
    digest, size, cuts = scan_file(io.BytesIO(data).read, b"\n", piece_bytes)
    assert digest == hashlib.sha256(data).hexdigest() and size == len(data)
    assert cuts[0][0] == 0 and cuts[-1][1] == size and all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))
    assert (len(cuts) == 1) == (piece_bytes >= size)
    assert all(data[e - 1 : e] == b"\n" for _, e, _ in cuts)
    cfg = load_config(None, [])
    tok = _tokenizer(str(tiny_model), False)
    whole = curate_file("f.jsonl", data, cfg.data, tok)
    parts = [r for s, e, first in cuts for r in curate_file("f.jsonl", data[s:e], cfg.data, tok, first, len(cuts) == 1)]
    assert _summary(parts) == _summary(whole)
    assert len(whole) == 39 and {r["row"] for r in whole if r["status"] == "reject"} >= {4, 12}


def test_plan_cuts_only_jsonl_and_keeps_empty_files_an_error(tmp_path, tiny_model):
    (tmp_path / "a.jsonl").write_bytes(_file())
    (tmp_path / "b.json").write_text(json.dumps([{"text": "x" * 50}] * 20))
    (tmp_path / "empty.jsonl").write_bytes(b"")
    files = [str(tmp_path / n) for n in ("a.jsonl", "b.json", "empty.jsonl")]
    inputs, pieces = plan({"local": files}, piece_bytes=256)
    assert [i["path"] for i in inputs] == files
    by_file = {f: [p for p in pieces if p["path"] == f] for f in files}
    assert len(by_file[files[0]]) > 3 and not any(p["whole"] for p in by_file[files[0]])
    assert len(by_file[files[1]]) == 1 and by_file[files[1]][0]["whole"]
    empty = by_file[files[2]]
    cfg = load_config(None, [])
    tok = _tokenizer(str(tiny_model), False)
    recs = curate_file(files[2], b"", cfg.data, tok, empty[0]["first_row"], empty[0]["whole"])
    assert recs[0]["status"] == "file_error" and "empty file" in recs[0]["reason"]


@pytest.mark.ray
def test_ray_stage_curates_pieces_like_the_local_stage(ray_session, tiny_model, tmp_path, monkeypatch):
    from oikyo_ray.data import pieces
    from oikyo_ray.data.prepare import prepare as prepare_local
    from oikyo_ray.data.prepared import load_split_rows
    from oikyo_ray.data.ray_data import prepare

    (tmp_path / "a.jsonl").write_bytes(_file())
    monkeypatch.setattr(pieces, "PIECE_BYTES", 512)
    over = [f"data.paths=[{tmp_path / 'a.jsonl'}]", f"model.cache_dir={tmp_path / 'c'}", "data.cache=false"]
    m = prepare(load_config(None, over), str(tiny_model), tmp_path / "ray")
    local = prepare_local(load_config(None, over), str(tiny_model), tmp_path / "local")
    assert m["counts"] == local["counts"] and m["counts"]["read"] == 39
    assert (tmp_path / "ray" / "rejects.jsonl").read_text() == (tmp_path / "local" / "rejects.jsonl").read_text()
    assert load_split_rows(tmp_path / "ray", "train") == load_split_rows(tmp_path / "local", "train")
