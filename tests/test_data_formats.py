"""Row-level data rules without a tokenizer or Ray: readers, normalisation, validation, filters."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from oikyo_ray.config import DataConfig, load_config
from oikyo_ray.data.formats import RowError, normalise
from oikyo_ray.data.quality import alnum_ratio, prompt_text, repetition, row_filters, signature
from oikyo_ray.data.readers import BAD, iter_rows
from oikyo_ray.data.validate import validate_messages
from oikyo_ray.errors import ConfigError, DataError

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
CALL = lambda name: {"role": "assistant", "content": json.dumps({"name": name, "arguments": {}}), "tool_call": True}  # noqa: E731
T = lambda c: {"role": "tool", "content": c}  # noqa: E731
TOOLS = [{"name": "get_weather", "parameters": {}}]


def reason(fn, *a, **kw) -> tuple[str, str]:
    with pytest.raises(RowError) as e:
        fn(*a, **kw)
    return str(e.value), e.value.kind


# ---- readers -----------------------------------------------------------------------------------


def test_jsonl_bom_blank_lines_and_bad_lines():
    data = b'\xef\xbb\xbf{"text": "a"}\n\n{"text": "b"\n{"text": "caf\xe9"}\n'
    rows = list(iter_rows("x.jsonl", data))
    assert [n for n, _, _ in rows] == [1, 3, 4]  # blank line 2 skipped, still counted
    assert rows[0] == (1, {"text": "a"}, None)  # the BOM does not break the first row
    assert rows[1][1] is BAD and rows[1][2].startswith("invalid JSON at column 13")
    assert rows[2][1] is BAD and rows[2][2].startswith("not UTF-8 at byte 13 of the line")


def test_jsonl_oversized_line_is_rejected_unparsed():
    big = b'{"text": "' + b"x" * 5000 + b'"}'
    rows = list(iter_rows("x.jsonl", big + b"\n" + b'{"text": "ok"}\n', max_row_bytes=1000))
    assert rows[0][1] is BAD and rows[0][2].startswith(f"row is {len(big)} bytes")
    assert rows[1] == (2, {"text": "ok"}, None)


def test_jsonl_deep_nesting_is_a_reject_not_a_crash():
    rows = list(iter_rows("x.jsonl", b"[" * 100_000 + b"\n"))
    assert rows[0][1] is BAD and rows[0][2] == "JSON nested too deeply to parse"


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("a.json", b"", "a.json: empty file (no rows)"),
        ("a.json", b"[]", "a.json: empty file (no rows)"),
        ("a.jsonl", b"\n \n", "a.jsonl: empty file (no rows)"),
        ("a.csv", b"", "a.csv: empty file (no rows)"),
        ("a.csv", b"instruction,output\n", "a.csv: empty file (no rows)"),
        ("a.parquet", b"", "a.parquet: empty file (no rows)"),
        ("a.json", b'{"text": "x"}', "a.json: top level must be a JSON array of rows, got dict"),
        ("a.json", b'[{"text": "x"}, {"te', "a.json: invalid JSON at line 1 column 18 (byte 17): Unterminated string"),
        ("a.json", b'[{"text": "\xff"}]', "a.json: not UTF-8 at byte 11"),
        ("a.json", b'\xef\xbb\xbf[{"text": "\xff"}]', "a.json: not UTF-8 at byte 14"),  # offset counts the BOM
        ("a.parquet", b"PAR1 not really", "a.parquet: unreadable parquet"),
        ("a.csv", b"a,b\n1,2,3\n", "a.csv: unreadable CSV"),
        ("a.pdf", b"hello", "a.pdf: unsupported file type"),
    ],
)
def test_file_errors_name_file_and_position(name, data, message):
    with pytest.raises(DataError) as e:
        list(iter_rows(name, data))
    assert str(e.value).startswith(message), str(e.value)


def test_csv_cells_stay_text_and_parquet_rows_read():
    rows = list(iter_rows("a.csv", b'instruction,output,label\n"6*7?",42,true\n'))
    assert rows == [(1, {"instruction": "6*7?", "output": "42", "label": "true"}, None)]
    table = pa.Table.from_pylist([{"text": "a", "extra": None}, {"text": "b", "extra": 1}])
    buf = io.BytesIO()
    pq.write_table(table, buf)
    assert list(iter_rows("a.parquet", buf.getvalue())) == [
        (1, {"text": "a"}, None),
        (2, {"text": "b", "extra": 1}, None),
    ]


# ---- normalisation -----------------------------------------------------------------------------


def test_alpaca_with_system_history_and_input():
    row = {
        "system": "Be brief.",
        "history": [["Hi", "Hello"]],
        "instruction": "Translate:",
        "input": "cat",
        "output": "chat",
    }
    msgs, meta = normalise(row)
    assert msgs == [{"role": "system", "content": "Be brief."}, U("Hi"), A("Hello"), U("Translate:\n\ncat"), A("chat")]
    assert meta == {}


def test_sharegpt_tools_become_calls_results_and_meta():
    row = {
        "conversations": [
            {"from": "human", "value": "Weather?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {}}'},
            {"from": "observation", "value": "{}"},
            {"from": "gpt", "value": "Sunny."},
        ],
        "tools": json.dumps(TOOLS),
    }
    msgs, meta = normalise(row)
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "assistant"]
    assert msgs[1] == {"role": "assistant", "content": '{"name": "get_weather", "arguments": {}}', "tool_call": True}
    # glaive-style bare schemas take OpenAI's shape, the one API clients send: served prompts match
    openai = [{"function": {"name": "get_weather", "parameters": {}}, "type": "function"}]
    assert meta == {"tools": openai}
    assert normalise({**row, "tools": openai})[1] == normalise({**row, "tools": [{"function": TOOLS[0]}]})[1] == meta
    assert normalise({**row, "tools": ""})[1] == {} and normalise({**row, "tools": "[]"})[1] == {}


def test_preference_pair_and_label():
    msgs, meta = normalise(
        {
            "conversations": [{"from": "human", "value": "Q"}],
            "chosen": {"from": "gpt", "value": "good"},
            "rejected": {"from": "gpt", "value": "bad"},
        }
    )
    assert msgs == [U("Q"), A("good")] and meta == {"rejected": A("bad")}
    msgs, meta = normalise({"messages": [U("Q")], "chosen": [A("good")], "rejected": "bad"})
    assert msgs == [U("Q"), A("good")] and meta == {"rejected": A("bad")}
    msgs, meta = normalise({"instruction": "Q", "chosen": "good", "rejected": "bad"})
    assert msgs == [U("Q"), A("good")] and meta == {"rejected": A("bad")}
    for raw, want in [(True, True), (False, False), ("false", False), ("TRUE", True), (1, True), (0, False)]:
        assert normalise({"messages": [U("Q"), A("a")], "label": raw})[1] == {"label": want}


def test_openai_tool_calls():
    row = {
        "messages": [
            U("Weather?"),
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    },
                    {
                        "id": "2",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Bergen"}'},
                    },
                ],
            },
            {"role": "tool", "content": "1"},
            {"role": "tool", "content": "2"},
            A("Both sunny."),
        ]
    }
    msgs, _ = normalise(row)
    assert json.loads(msgs[1]["content"]) == [
        {"name": "get_weather", "arguments": {"city": "Oslo"}},
        {"name": "get_weather", "arguments": {"city": "Bergen"}},
    ]
    validate_messages(msgs, 10_000, {"tools": [{"type": "function", "function": {"name": "get_weather"}}]})
    bad = {
        "messages": [
            U("x"),
            {"role": "assistant", "content": "Let me see", "tool_calls": row["messages"][1]["tool_calls"]},
        ]
    }
    assert reason(normalise, bad)[0] == "messages[1]: assistant text together with tool_calls is not supported"


def test_column_and_role_maps_from_config():
    cfg = load_config(
        None,
        [
            "data.columns={instruction: question, output: answer, input: context}",
            "data.sharegpt_roles={bot: assistant, customer: user}",
        ],
    ).data
    assert normalise({"question": "Q", "context": "ctx", "answer": "A"}, cfg)[0] == [U("Q\n\nctx"), A("A")]
    assert normalise({"conversations": [{"from": "customer", "value": "hi"}, {"from": "bot", "value": "hello"}]}, cfg)[
        0
    ] == [U("hi"), A("hello")]
    assert reason(normalise, {"question": "Q", "answer": "A"})[0].startswith(
        "unknown row format (keys: ['answer', 'question'])"
    )
    turn_keys = DataConfig(columns={"from": "speaker", "value": "text"})
    assert normalise(
        {"conversations": [{"speaker": "human", "text": "hi"}, {"speaker": "gpt", "text": "yo"}]}, turn_keys
    )[0] == [U("hi"), A("yo")]
    with pytest.raises(ConfigError, match="data.columns"):
        load_config(None, ["data.columns={question: instruction}"])  # keys are the canonical names
    with pytest.raises(ConfigError, match="data.sharegpt_roles"):
        load_config(None, ["data.sharegpt_roles={bot: robot}"])


def test_messages_with_a_top_level_system_prompt():
    assert normalise({"system": "Be brief.", "messages": [U("Q"), A("A")]})[0] == [
        {"role": "system", "content": "Be brief."},
        U("Q"),
        A("A"),
    ]


def test_nested_fields_as_json_text_from_csv_cells():
    msgs, meta = normalise({"messages": json.dumps([U("Q"), A("A")]), "label": "true"})
    assert msgs == [U("Q"), A("A")] and meta == {"label": True}


@pytest.mark.parametrize(
    "row, message, kind",
    [
        (
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}]},
            "conversations[1]: unknown role tag 'bot' (map it with data.sharegpt_roles)",
            "format",
        ),
        ({"instruction": "Q", "output": 42}, "output must be a string, got int", "format"),
        ({"instruction": "Q"}, "unknown row format (keys: ['instruction']); set data.format or data.columns", "format"),
        ({"messages": [U("Q"), A("a")], "label": "yes"}, "label must be true or false, got 'yes'", "label"),
        (
            {"conversations": [], "tools": "[{"},
            "tools: invalid JSON at column 3: Expecting property name enclosed in double quotes",
            "tools",
        ),
        (
            {"conversations": [], "tools": '{"name": "f"}'},
            "tools must be a JSON array of function schemas, got dict",
            "tools",
        ),
        ({"conversations": [], "tools": '[{"description": "no name"}]'}, "tools[0] has no function name", "tools"),
        ({"messages": [U("Q")], "chosen": "a"}, "a preference row needs both 'chosen' and 'rejected'", "format"),
        (
            {"messages": [U("Q")], "chosen": "same", "rejected": " same "},
            "chosen and rejected answers are identical",
            "preference",
        ),
        ({"messages": [U("Q")], "chosen": "a", "rejected": ""}, "rejected: empty answer", "empty_turn"),
        (
            {"messages": [U("Q")], "chosen": U("a"), "rejected": "b"},
            "chosen must be an assistant turn, got role 'user'",
            "format",
        ),
        ("just a string", "row must be a JSON object, got str", "format"),
    ],
)
def test_normalise_rejects_with_precise_reasons(row, message, kind):
    assert reason(normalise, row) == (message, kind)


def test_an_explicit_format_overrides_detection():
    row = {"instruction": "Q", "output": "A", "messages": [U("M"), A("N")], "text": "raw"}
    assert normalise(row)[0] == [U("M"), A("N")]  # auto: messages win
    assert normalise(row, DataConfig(format="alpaca"))[0] == [U("Q"), A("A")]
    assert normalise(row, DataConfig(format="text"))[0] == [A("raw")]


# ---- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "msgs",
    [
        [U("Q"), A("A")],
        [{"role": "system", "content": "S"}, U("Q"), A("A"), U("Q2"), A("A2")],
        [U("Q"), CALL("get_weather"), T("{}"), A("A")],
        [U("Q"), CALL("get_weather"), T("{}"), CALL("get_weather"), T("{}"), A("A")],
        [U("Q"), CALL("get_weather")],  # learning to call is an answer
        [A("raw text for continued pre-training")],
    ],
)
def test_legal_conversations(msgs):
    validate_messages(msgs, 10_000, {"tools": TOOLS})


@pytest.mark.parametrize(
    "msgs, message, kind",
    [
        ([], "no messages", "role_order"),
        ([{"role": "system", "content": "S"}], "only a system message", "role_order"),
        (
            [U("Q"), {"role": "system", "content": "S"}, A("A")],
            "messages[1]: system message only allowed first",
            "role_order",
        ),
        (
            [U("Q"), {"role": "critic", "content": "x"}, A("A")],
            "messages[1]: role 'critic' is not one of ['assistant', 'system', 'tool', 'user']",
            "role_order",
        ),
        (
            [A("hello"), U("Q"), A("A")],
            "messages[0]: the conversation must start with a user turn (after an optional "
            "system message), got 'assistant'",
            "role_order",
        ),
        ([U("Q"), U("Q again"), A("A")], "messages[1]: two user turns in a row (roles must alternate)", "role_order"),
        ([U("Q"), A("A"), A("more")], "messages[2]: two assistant turns in a row (roles must alternate)", "role_order"),
        (
            [U("Q"), A("A"), U("Q2")],
            "last message must be from the assistant (nothing to learn otherwise)",
            "role_order",
        ),
        (
            [U("Q"), T("{}"), A("A")],
            "messages[1]: tool result without a preceding assistant function call",
            "role_order",
        ),
        (
            [U("Q"), CALL("get_weather"), A("A")],
            "messages[2]: the function call at messages[1] needs 1 more tool result(s) before this assistant turn",
            "role_order",
        ),
        (
            [U("Q"), CALL("get_weather"), T("1"), T("2"), A("A")],
            "messages[3]: more tool results than calls made",
            "role_order",
        ),
        (
            [U("Q"), CALL("get_weather"), T("1"), U("Q2"), A("A")],
            "messages[3]: a user turn right after tool results (the assistant must answer them first)",
            "role_order",
        ),
        (
            [U("Q"), A("A"), CALL("get_weather"), T("1"), A("A")],
            "messages[2]: two assistant turns in a row (roles must alternate)",
            "role_order",
        ),
        (
            [U("Q"), CALL("book_flight"), T("1"), A("A")],
            "messages[1]: calls function 'book_flight', not one of the row's tools ['get_weather']",
            "tool_call",
        ),
        (
            [U("Q"), {"role": "assistant", "content": "f(x)", "tool_call": True}, T("1"), A("A")],
            "messages[1]: function call is not valid JSON (Expecting value at column 1)",
            "tool_call",
        ),
        (
            [U("Q"), {"role": "assistant", "content": '{"arguments": {}}', "tool_call": True}, T("1"), A("A")],
            "messages[1]: function call needs a 'name'",
            "tool_call",
        ),
        ([U("Q"), A("  \n")], "messages[1]: empty assistant message", "empty_turn"),
        ([U(""), A("A")], "messages[0]: empty user message", "empty_turn"),
        ([A("")], "messages[0]: empty assistant message", "empty_turn"),
        (
            [U("Q"), A("bad \ud83d")],
            "messages[1].content: invalid Unicode: unpaired surrogate U+D83D at character 4 "
            "(cannot be stored as UTF-8)",
            "unicode",
        ),
        ([U("Q"), A("x" * 101)], "102 characters > data.max_chars=100", "too_long"),
    ],
)
def test_illegal_conversations(msgs, message, kind):
    assert reason(validate_messages, msgs, 100, {"tools": TOOLS}) == (message, kind)


def test_rejected_answer_counts_toward_length_and_unicode():
    assert reason(validate_messages, [U("Q"), A("A")], 10, {"rejected": A("x" * 10)}) == (
        "12 characters > data.max_chars=10",
        "too_long",
    )
    msg, kind = reason(validate_messages, [U("Q"), A("A")], 100, {"rejected": A("\udc00")})
    assert kind == "unicode" and msg.startswith("meta: invalid Unicode: unpaired surrogate U+DC00")


# ---- per-row quality filters -------------------------------------------------------------------


def test_ratio_measures():
    assert alnum_ratio("ab !!") == (0.5, 4)
    assert repetition("ha ha ha ha ha ha") == (0.75, 6)  # 4 trigrams, 1 distinct
    assert repetition("one two three four")[0] == 0.0


@pytest.mark.parametrize(
    "msgs, meta, overrides, message, kind",
    [
        (
            [U("Q"), A("ok")],
            {},
            {"min_response_chars": 3},
            "assistant text is 2 characters < data.min_response_chars=3",
            "too_short",
        ),
        (
            [U("Q"), A("|---|---|---|---|---|---|---|--- x")],
            {},
            {},
            "assistant text is 3% letters/digits < data.min_alnum_ratio=0.25",
            "low_alnum",
        ),
        (
            [U("Q"), A("Ooh ah! " * 30)],
            {},
            {},
            "assistant text repeats 97% of its word 3-grams > data.max_repetition=0.5",
            "repetitive",
        ),
        (
            [U("Q"), A("no")],
            {"label": False},
            {"reject_undesired": True},
            "labelled undesired (label=false) and data.reject_undesired is set",
            "undesired",
        ),
    ],
)
def test_row_filters_reject(msgs, meta, overrides, message, kind):
    assert reason(row_filters, msgs, meta, DataConfig(**overrides)) == (message, kind)


def test_row_filters_pass_short_and_tool_rows():
    row_filters(
        [U("Q"), A("up")], {"label": False}, DataConfig()
    )  # short answers and KTO negatives are kept by default
    row_filters([U("Q"), CALL("get_weather")], {}, DataConfig())  # a call is an answer
    row_filters([U("Q"), A("Ooh ah! " * 30)], {}, DataConfig(max_repetition=1.0))  # off


def test_prompt_text_drops_system_and_final_answer():
    msgs = [{"role": "system", "content": "S"}, U("Q1"), A("A1"), U("Q2"), A("A2")]
    assert prompt_text(msgs) == "Q1\nA1\nQ2"
    assert prompt_text([A("raw text")]) == "raw text"


def test_signature_is_deterministic_and_similarity_tracks_jaccard():
    import numpy as np

    a = " ".join(f"w{i}" for i in range(200))
    b = a.replace("w100", "changed")
    sa, sb = signature(a, 128), signature(b, 128)
    assert sa == signature(a.upper(), 128)  # normalised: case and spacing do not matter
    est = float(np.mean(np.frombuffer(sa, "<u4") == np.frombuffer(sb, "<u4")))
    true = 195 / 201  # 198 shingles each, 3 differ
    assert abs(est - true) < 0.08
    assert (
        float(np.mean(np.frombuffer(sa, "<u4") == np.frombuffer(signature("something else entirely", 128), "<u4")))
        < 0.1
    )
