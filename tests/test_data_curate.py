"""`curate_file` (Ray-free) on every shared dataset and on small broken/odd fixtures.

Each case asserts exact counts and reasons, and that every row read gives exactly one record
(accepted + rejected == read)."""

from __future__ import annotations

import io
import json
import tracemalloc
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from oikyo_ray.config import DataConfig, ModelConfig
from oikyo_ray.data.curate import SCHEMA, Status, curate_file, to_table

FIXTURES = Path(__file__).parent / "fixtures" / "data"
BIG = DataConfig(max_length=8192)  # long enough that no shared row loses its answer to truncation


@pytest.fixture(scope="module")
def tok(tiny_model):
    from oikyo_ray.model.load import load_tokenizer

    return load_tokenizer(ModelConfig(), str(tiny_model))


def curate(path: Path, tok, data: DataConfig = BIG, data_bytes: bytes | None = None) -> list[dict]:
    recs = curate_file(path.name, path.read_bytes() if data_bytes is None else data_bytes, data, tok)
    to_table(recs)  # every record fits the Arrow schema Ray writes
    return recs


def summary(recs: list[dict]) -> list[tuple]:
    return [(r["row"], r["status"], r["filter"], r["reason"]) for r in recs]


def assert_complete(recs: list[dict], read: int) -> None:
    ok = sum(r["status"] == "ok" for r in recs)
    rejected = sum(r["status"] == "reject" for r in recs)
    assert (len(recs), ok + rejected) == (read, read)
    assert len({r["row"] for r in recs}) == read


# ---- the shared datasets -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(shared_dir, tok) -> dict[str, tuple[list, list[dict]]]:
    """name -> (raw rows, records) for every shared dataset, curated once."""
    out = {}
    for f in sorted((shared_dir / "datasets").glob("*.json*")):
        text = f.read_text(encoding="utf-8")
        raw = (
            [json.loads(line) for line in text.splitlines() if line.strip()]
            if f.suffix == ".jsonl"
            else json.loads(text)
        )
        out[f.name] = (raw, curate(f, tok))
    return out


@pytest.mark.parametrize(
    "name, read, accepted",
    [
        ("alpaca_en_demo.json", 999, 999),
        ("glaive_toolcall_en_demo.json", 300, 300),
        ("kto_en_demo.json", 300, 299),
        ("dpo_en_demo.json", 300, 300),
        ("c4_demo.jsonl", 300, 300),
    ],
)
def test_shared_counts(shared, name, read, accepted):
    raw, recs = shared[name]
    assert len(raw) == read
    assert_complete(recs, read)
    assert sum(r["status"] == "ok" for r in recs) == accepted
    assert {r["split"] for r in recs if r["status"] == "ok"} == {"train", "val", "test"}


def test_shared_kto_rejects_only_the_degenerate_row_and_keeps_labels(shared):
    raw, recs = shared["kto_en_demo.json"]
    assert [summary([r]) for r in recs if r["status"] != "ok"] == [
        [(66, "reject", "repetitive", "assistant text repeats 99% of its word 3-grams > data.max_repetition=0.5")]
    ]
    assert raw[65]["messages"][1]["content"].startswith("Ooh ooh ah ah! *giggle* Ooh ooh ah ah!")
    for r in recs:
        if r["status"] == "ok":
            assert json.loads(r["meta"]) == {"label": raw[r["row"] - 1]["label"]}
            assert r["meta_tags"] == f"label:{str(raw[r['row'] - 1]['label']).lower()}"
    labels = Counter(json.loads(r["meta"])["label"] for r in recs if r["status"] == "ok")
    assert labels == {True: 150, False: 149}


def test_shared_glaive_keeps_tools_and_marks_calls(shared):
    raw, recs = shared["glaive_toolcall_en_demo.json"]
    with_tools = 0
    calls = results = 0
    for r in recs:
        src = raw[r["row"] - 1]
        msgs, meta = json.loads(r["messages"]), json.loads(r["meta"])
        tools = json.loads(src["tools"]) if src["tools"] else []
        assert meta.get("tools", []) == [{"type": "function", "function": t} for t in tools]  # OpenAI's shape
        with_tools += bool(tools)
        assert [m["content"] for m in msgs] == [t["value"] for t in src["conversations"]]
        for m, t in zip(msgs, src["conversations"]):
            assert m.get("tool_call", False) == (t["from"] == "function_call")
            assert (
                m["role"]
                == {"human": "user", "gpt": "assistant", "function_call": "assistant", "observation": "tool"}[t["from"]]
            )
        calls += sum(bool(m.get("tool_call")) for m in msgs)
        results += sum(m["role"] == "tool" for m in msgs)
    assert (with_tools, calls, results) == (191, 211, 211)


def test_shared_dpo_keeps_the_pair(shared):
    raw, recs = shared["dpo_en_demo.json"]
    for r in recs:
        src = raw[r["row"] - 1]
        msgs, meta = json.loads(r["messages"]), json.loads(r["meta"])
        assert msgs[-1] == {"role": "assistant", "content": src["chosen"]["value"]}
        assert meta == {"rejected": {"role": "assistant", "content": src["rejected"]["value"]}}
        assert len(msgs) == len(src["conversations"]) + 1
    assert sum(r["meta_tags"] == "preference" for r in recs) == 300


def test_shared_alpaca_and_c4_shapes(shared):
    raw, recs = shared["alpaca_en_demo.json"]
    for r in recs[:50]:
        src = raw[r["row"] - 1]
        prompt = src["instruction"] + (f"\n\n{src['input']}" if src["input"] else "")
        assert json.loads(r["messages"]) == [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": src["output"]},
        ]
    raw, recs = shared["c4_demo.jsonl"]
    assert all(json.loads(r["messages"]) == [{"role": "assistant", "content": raw[r["row"] - 1]["text"]}] for r in recs)
    assert all(all(x != -100 for x in r["labels"]) for r in recs)  # raw text is learned in full


def test_shared_prompt_longer_than_max_length_is_rejected_with_its_size(shared_dir, tok):
    recs = curate(shared_dir / "datasets" / "dpo_en_demo.json", tok, DataConfig(max_length=64))
    rejected = [r for r in recs if r["status"] == "reject"]
    assert rejected and all(r["filter"] == "tokenize" for r in rejected)
    assert all(r["reason"].startswith("no answer tokens within data.max_length=64: the prompt is ") for r in rejected)
    assert all(r["num_tokens"] <= 64 for r in recs)
    assert_complete(recs, 300)


# ---- fixtures ----------------------------------------------------------------------------------


def test_csv_fixture(tok):
    recs = curate(FIXTURES / "alpaca_mixed.csv", tok)
    assert summary(recs) == [
        (1, "ok", "", ""),
        (2, "ok", "", ""),
        (3, "reject", "empty_turn", "messages[1]: empty assistant message"),
        (4, "ok", "", ""),
        (5, "ok", "", ""),
    ]
    assert json.loads(recs[0]["messages"])[1]["content"] == "42"  # text, not the int 42
    assert json.loads(recs[3]["messages"])[1]["content"] == "line one\nline two"


def test_parquet_rows_and_truncated_parquet(tok, tmp_path):
    rows = [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], "tools": ""},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "human", "value": "Again"}], "tools": ""},
    ]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    f = tmp_path / "rows.parquet"
    f.write_bytes(buf.getvalue())
    assert summary(curate(f, tok)) == [
        (1, "ok", "", ""),
        (2, "reject", "role_order", "messages[1]: two user turns in a row (roles must alternate)"),
    ]
    broken = curate(f, tok, data_bytes=buf.getvalue()[: len(buf.getvalue()) // 2])
    assert len(broken) == 1 and broken[0]["status"] == Status.FILE_ERROR
    assert broken[0]["reason"].startswith("rows.parquet: unreadable parquet: ")


def test_sharegpt_tools_fixture(tok):
    recs = curate(FIXTURES / "sharegpt_tools.json", tok)
    assert summary(recs) == [
        (1, "ok", "", ""),
        (2, "reject", "role_order", "messages[1]: tool result without a preceding assistant function call"),
        (3, "reject", "tool_call", "messages[1]: function call is not valid JSON (Expecting value at column 1)"),
        (
            4,
            "reject",
            "tool_call",
            "messages[1]: calls function 'book_flight', not one of the row's tools ['get_weather']",
        ),
        (5, "reject", "tools", "tools: invalid JSON at column 24: Expecting ',' delimiter"),
        (6, "reject", "format", "conversations[1]: unknown role tag 'bot' (map it with data.sharegpt_roles)"),
        (7, "reject", "role_order", "last message must be from the assistant (nothing to learn otherwise)"),
        (
            8,
            "reject",
            "role_order",
            "messages[2]: the function call at messages[1] needs 1 more tool result(s) before this assistant turn",
        ),
        (9, "reject", "empty_turn", "messages[1]: empty assistant message"),
        (10, "ok", "", ""),
        (11, "reject", "preference", "chosen and rejected answers are identical"),
        (12, "reject", "format", "chosen must be an assistant turn, got role 'user'"),
    ]
    assert json.loads(recs[9]["meta"]) == {"rejected": {"role": "assistant", "content": "9.11 is larger."}}
    mapped = curate(
        FIXTURES / "sharegpt_tools.json", tok, DataConfig(max_length=8192, sharegpt_roles={"bot": "assistant"})
    )
    assert mapped[5]["status"] == "ok"


def test_messages_fixture(tok):
    recs = curate(FIXTURES / "messages_rows.jsonl", tok)
    assert summary(recs) == [
        (1, "ok", "", ""),
        (2, "reject", "label", "label must be true or false, got 'yes'"),
        (3, "ok", "", ""),
        (
            4,
            "reject",
            "unicode",
            "messages[1].content: invalid Unicode: unpaired surrogate U+D800 at character 4 "
            "(cannot be stored as UTF-8)",
        ),
        (5, "reject", "role_order", "messages[1]: system message only allowed first"),
        (6, "reject", "role_order", "messages[1]: two user turns in a row (roles must alternate)"),
        (
            7,
            "reject",
            "role_order",
            "messages[0]: the conversation must start with a user turn (after an optional "
            "system message), got 'assistant'",
        ),
        (8, "reject", "invalid_json", "invalid JSON at column 60: Expecting ',' delimiter"),
        (9, "reject", "format", "row must be a JSON object, got list"),
        (10, "reject", "format", "messages: not a list and not valid JSON (Expecting value at column 1)"),
        (12, "ok", "", ""),  # line 11 is blank
    ]
    msgs = json.loads(recs[0]["messages"])
    assert msgs[1] == {
        "role": "assistant",
        "content": '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        "tool_call": True,
    }
    assert json.loads(recs[2]["meta"]) == {"label": False}
    assert json.loads(recs[10]["messages"])[0]["content"] == "Two parts"


def test_renamed_columns_fixture(tok):
    plain = curate(FIXTURES / "renamed.jsonl", tok)
    assert {r["reason"] for r in plain} == {
        "unknown row format (keys: ['answer', 'context', 'question']); set data.format or data.columns"
    }
    mapped = curate(
        FIXTURES / "renamed.jsonl",
        tok,
        DataConfig(max_length=8192, columns={"instruction": "question", "input": "context", "output": "answer"}),
    )
    assert [json.loads(r["messages"]) for r in mapped] == [
        [{"role": "user", "content": "What colour is grass?"}, {"role": "assistant", "content": "Green."}],
        [
            {"role": "user", "content": "Translate to German:\n\ngood morning"},
            {"role": "assistant", "content": "Guten Morgen."},
        ],
    ]


def test_non_utf8_bytes(tok):
    recs = curate(FIXTURES / "not_utf8.jsonl", tok)
    assert summary(recs) == [
        (1, "ok", "", ""),
        (2, "reject", "not_utf8", "not UTF-8 at byte 24 of the line (b'\\xe9.\",'...)"),
        (3, "ok", "", ""),
    ]
    recs = curate(FIXTURES / "not_utf8.json", tok)
    err = Status.FILE_ERROR
    assert summary(recs) == [
        (0, err, err, "not_utf8.json: not UTF-8 at byte 25 (b'\\xe9.\",'...) (re-encode the file as UTF-8)")
    ]


@pytest.mark.parametrize(
    "name, reason",
    [
        (
            "truncated.json",
            "truncated.json: invalid JSON at line 2 column 23 (byte 60): Unterminated string starting at "
            "(a truncated or hand-edited file? one object per line belongs in .jsonl)",
        ),
        (
            "top_level_object.json",
            "top_level_object.json: top level must be a JSON array of rows, got dict "
            "(one object per line belongs in .jsonl)",
        ),
        ("empty.jsonl", "empty.jsonl: empty file (no rows) (remove it from data.paths or fill it)"),
    ],
)
def test_broken_files_give_one_file_error(tok, name, reason):
    assert summary(curate(FIXTURES / name, tok)) == [(0, Status.FILE_ERROR, Status.FILE_ERROR, reason)]


def test_every_row_rejected_gives_only_rejects(tok, tmp_path):
    f = tmp_path / "all_bad.jsonl"
    f.write_text('{"text": ""}\n{"nope": 1}\n', encoding="utf-8")
    assert summary(curate(f, tok)) == [
        (1, "reject", "empty_turn", "messages[0]: empty assistant message"),
        (2, "reject", "format", "unknown row format (keys: ['nope']); set data.format or data.columns"),
    ]


# ---- a 10 MB row -------------------------------------------------------------------------------

TEN_MB = 10 * 1024 * 1024


def _peak(fn):
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_ten_mb_jsonl_row_is_rejected_unparsed(tok, tmp_path):
    line = json.dumps({"text": "a" * TEN_MB}).encode()
    data = line + b"\n" + b'{"instruction": "Hi", "output": "Hello"}\n'
    recs, peak = _peak(lambda: curate_file("big.jsonl", data, BIG, tok))
    assert summary(recs) == [
        (
            1,
            "reject",
            "too_long",
            f"row is {len(line)} bytes, more than any row within data.max_chars can take (3448576 bytes); not parsed",
        ),
        (2, "ok", "", ""),
    ]
    assert peak < 2.5 * TEN_MB, peak  # the line is copied once, never decoded into Python objects


def test_ten_mb_row_is_rejected_by_max_chars_before_tokenising(tok):
    big_json = json.dumps(
        [
            {"instruction": "Summarise:", "input": "b" * TEN_MB, "output": "short"},
            {"instruction": "Hi", "output": "Hello"},
        ]
    ).encode()
    recs, peak = _peak(lambda: curate_file("big.json", big_json, BIG, tok))
    size = len("Summarise:\n\n") + TEN_MB + len("short")
    assert summary(recs) == [(1, "reject", "too_long", f"{size} characters > data.max_chars=200000"), (2, "ok", "", "")]
    assert peak < 6 * TEN_MB, peak  # decode + parse + one prompt string; tokenising it would be far more
    wide = DataConfig(
        max_length=8192, max_chars=5_000_000
    )  # a jsonl line within the byte bound is parsed, then rejected
    line = json.dumps({"text": "c" * TEN_MB}).encode()
    assert summary(curate_file("big.jsonl", line, wide, tok)) == [
        (1, "reject", "too_long", f"{TEN_MB} characters > data.max_chars=5000000")
    ]


def test_records_match_the_arrow_schema(tok):
    recs = curate(FIXTURES / "sharegpt_tools.json", tok)
    table = to_table(recs)
    assert table.schema == SCHEMA and table.num_rows == len(recs)
    assert table.column("input_ids").type == pa.list_(pa.int64())
