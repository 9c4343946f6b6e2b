"""The row shapes people bring from other tools (Ray-free): typed parts with per-turn loss weights
(LLaMA-Factory v1, axolotl), reasoning traces, plain-text corpora, and rows the stage cannot use
(images), which are rejected with a reason, never read as text with the media dropped."""

from __future__ import annotations

import gzip
import io
import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from oikyo_ray.config import load_config
from oikyo_ray.data.formats import RowError, normaliser
from oikyo_ray.data.pieces import scan_file
from oikyo_ray.data.prepare import prepare as prepare_local
from oikyo_ray.data.prepared import load_split_rows
from oikyo_ray.data.readers import BAD, iter_rows
from oikyo_ray.data.tokenize import IGNORE, encode_messages
from oikyo_ray.data.validate import validate_messages

TEXT = lambda v: {"type": "text", "value": v}  # noqa: E731  LLaMA-Factory v1's typed part
THINK = lambda v: {"type": "reasoning", "value": v}  # noqa: E731
TOOLS = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]


def v1_row(first_weight: float = 1.0) -> dict:
    """A row as in LLaMA-Factory's v1_sft_demo.jsonl: typed parts, a loss_weight per message."""
    return {
        "messages": [
            {"role": "user", "content": [TEXT("Capital of Peru?")], "loss_weight": 0.0},
            {"role": "assistant", "content": [TEXT("Lima")], "loss_weight": first_weight},
            {"role": "user", "content": [TEXT("And of "), TEXT("Chile?")], "loss_weight": 0.0},
            {"role": "assistant", "content": [TEXT("Santiago")], "loss_weight": 1.0},
        ]
    }


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def learned(tok, enc: dict) -> str:
    return tok.decode([i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE])


def read(row: dict, fmt: str = "auto"):
    return normaliser().read(row, fmt)


# ---- typed parts and per-turn weights ------------------------------------------------------------


def test_typed_parts_with_value_are_joined():
    msgs, meta, ignored = read(v1_row())
    assert [m["content"] for m in msgs] == ["Capital of Peru?", "Lima", "And of Chile?", "Santiago"]
    assert all("train" not in m for m in msgs) and meta == {} and ignored == []


@pytest.mark.parametrize(
    "weight",
    [{"loss_weight": 0.0}, {"weight": 0}, {"train": False}],  # LLaMA-Factory v1, axolotl, axolotl
)
def test_a_zero_weight_masks_that_answer(tok, weight):
    row = v1_row()
    first = {k: v for k, v in row["messages"][1].items() if k != "loss_weight"}
    row["messages"][1] = {**first, **weight}
    masked, _, _ = read(row)
    assert masked[1]["train"] is False
    trained = encode_messages(tok, read(v1_row())[0], 256)
    enc = encode_messages(tok, masked, 256)
    assert enc["input_ids"] == trained["input_ids"]  # the same text, other labels
    assert learned(tok, trained) == "Lima<|im_end|>\nSantiago<|im_end|>\n"
    assert learned(tok, enc) == "Santiago<|im_end|>\n"
    # with train_on_prompt the prompts are learned, the masked answer still is not
    everything = encode_messages(tok, masked, 256, train_on_prompt=True)
    assert "Lima" not in learned(tok, everything) and "Peru" in learned(tok, everything)


def test_sharegpt_turns_take_weights_too(tok):
    row = {
        "conversations": [
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello", "weight": 0},
            {"from": "human", "value": "bye"},
            {"from": "gpt", "value": "ciao", "train": True},
        ]
    }
    msgs, _, _ = read(row)
    assert learned(tok, encode_messages(tok, msgs, 256)) == "ciao<|im_end|>\n"


@pytest.mark.parametrize(
    "turn, message",
    [
        ({"role": "assistant", "content": "Lima", "loss_weight": 0.5}, "loss_weight=0.5: only 0 (masked) and 1"),
        ({"role": "assistant", "content": "Lima", "train": "no"}, "messages[1].train must be true or false"),
        ({"role": "user", "content": "x", "loss_weight": 1}, "messages[1]: only assistant turns can be trained"),
    ],
)
def test_weights_the_loss_cannot_take_are_rejected(turn, message):
    row = {"messages": [{"role": "user", "content": "Capital of Peru?"}, turn]}
    with pytest.raises(RowError, match=re.escape(message)) as e:
        read(row)
    assert e.value.kind == "loss_weight"


# ---- reasoning traces ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        {"role": "assistant", "content": [THINK("Peru's capital is Lima."), TEXT("Lima")]},
        {"role": "assistant", "content": "Lima", "reasoning_content": "Peru's capital is Lima."},
        {"role": "assistant", "content": "<think>\nPeru's capital is Lima.\n</think>\n\nLima"},
    ],
)
def test_reasoning_shapes_normalise_to_one(answer):
    msgs, _, _ = read({"messages": [{"role": "user", "content": "Capital of Peru?"}, answer]})
    assert msgs[1] == {"role": "assistant", "content": "Lima", "reasoning": "Peru's capital is Lima."}


def test_reasoning_is_rendered_and_trained_or_masked(tok):
    msgs, _, _ = read(
        {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": [THINK("hmm"), TEXT("A")]}]}
    )
    assert tok.apply_chat_template(msgs, tokenize=False).endswith(
        "<|im_start|>assistant\n<think>\nhmm\n</think>\n\nA<|im_end|>\n"
    )
    trained = encode_messages(tok, msgs, 256)
    masked = encode_messages(tok, msgs, 256, train_on_reasoning=False)
    assert trained["input_ids"] == masked["input_ids"]
    assert learned(tok, trained) == "<think>\nhmm\n</think>\n\nA<|im_end|>\n"
    assert learned(tok, masked) == "A<|im_end|>\n"


def test_reasoning_beside_a_tool_call(tok):
    """reason_tool_use_demo's shape: a reasoning part and a tool_call part in one assistant turn."""
    call = json.dumps({"name": "get_weather", "arguments": {"city": "Lima"}})
    row = {
        "messages": [
            {"role": "user", "content": [TEXT("Weather in Lima?")]},
            {"role": "assistant", "content": [THINK("I should look it up."), {"type": "tool_call", "value": call}]},
            {"role": "tool", "content": [TEXT('{"temp": 19}')]},
            {"role": "assistant", "content": [THINK("19 degrees."), TEXT("It is 19 C.")]},
        ],
        "tools": json.dumps(TOOLS),
    }
    msgs, meta, _ = read(row)
    assert msgs[1]["tool_call"] is True and msgs[1]["reasoning"] == "I should look it up."
    validate_messages(msgs, 10_000, meta)
    text = learned(tok, encode_messages(tok, msgs, 1024, tools=meta["tools"], train_on_reasoning=False))
    assert text == f"<tool_call>\n{json.loads(json.dumps(call))}\n</tool_call><|im_end|>\nIt is 19 C.<|im_end|>\n"


def test_a_template_that_drops_reasoning_is_an_error(tok):
    plain = AutoTokenizer.from_pretrained(tok.name_or_path)
    plain.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "reasoning": "r"}]
    with pytest.raises(ValueError, match=r"messages\[1\] has a reasoning trace the chat template does not render"):
        encode_messages(plain, msgs, 64)


# ---- every key is read, reported or rejected -----------------------------------------------------

ROWS = {  # one row of each format, every key it reads
    "alpaca": {"instruction": "i", "input": "x", "output": "o", "system": "s", "history": [["u", "a"]]},
    "sharegpt": {"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}], "system": "s"},
    "messages": {**v1_row(), "tools": json.dumps(TOOLS), "system": "s"},
    "trl": {"prompt": "p", "chosen": "c", "rejected": "r"},
    "text": {"text": "t", "label": True},
}


@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_every_key_of_a_row_is_read_or_reported(fmt):
    assert read(ROWS[fmt])[2] == []
    extra = {**ROWS[fmt], "id": 7, "images": []}  # an empty media list is no media
    assert read(extra)[2] == ["id"]


def test_unread_turn_keys_are_reported():
    row = {"messages": [{"role": "user", "content": "u", "name": "ann"}, {"role": "assistant", "content": "a"}]}
    assert read(row)[2] == ["messages[].name"]


@pytest.mark.parametrize(
    "row, message",
    [
        (  # LLaMA-Factory's mllm_demo.json
            {
                "messages": [{"role": "user", "content": "<image>Who is this?"}, {"role": "assistant", "content": "A"}],
                "images": ["mllm_demo_data/1.jpg"],
            },
            r"'images': a row with images needs a vision \(or audio\) model",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]},
                    {"role": "assistant", "content": "A"},
                ]
            },
            r"messages\[0\].content\[0\]: a image_url part needs a vision",
        ),
    ],
)
def test_image_rows_are_rejected_not_read_as_text(row, message):
    with pytest.raises(RowError, match=message) as e:
        read(row)
    assert e.value.kind == "media"


# ---- plain-text corpora --------------------------------------------------------------------------

CORPUS = b"First paragraph,\nstill first.\n\n\nSecond one.\n\xff broken\n\nThird."


@pytest.mark.parametrize(
    "split, rows",
    [
        ("file", [(1, BAD)]),
        ("blank_lines", [(1, "First paragraph,\nstill first."), (5, BAD), (8, "Third.")]),
        ("lines", [(1, "First paragraph,"), (2, "still first."), (5, "Second one."), (6, BAD), (8, "Third.")]),
    ],
)
def test_text_files_split_into_documents(split, rows):
    got = list(iter_rows("c.txt", CORPUS, text_split=(split, "")))
    assert [(n, r if r is BAD else r["text"]) for n, r, _ in got] == rows
    assert [why for _, r, why in got if r is BAD] == ["not UTF-8 at line 6 (b'\\xff br'...)"]


def test_separator_and_gzip():
    data = gzip.compress(b"one\n<s>\ntwo\nlines<s>three")
    rows = list(iter_rows("c.txt.gz", data, text_split=("separator", "<s>")))
    assert rows == [(1, {"text": "one"}, None), (3, {"text": "two\nlines"}, None), (4, {"text": "three"}, None)]


def test_text_pieces_are_cut_between_paragraphs():
    data = b"".join(f"paragraph {i}\nline two\n\n".encode() for i in range(200))
    _, _, cuts = scan_file(io.BytesIO(data).read, b"\n\n", 256)
    assert len(cuts) > 5
    pieced = [r for s, e, first in cuts for r in iter_rows("c.txt", data[s:e], None, first, False)]
    assert pieced == list(iter_rows("c.txt", data))


def test_text_corpus_prepared(tmp_path, tiny_model):
    """.txt and .md documents: deduplicated, rejects naming file and line, every token learned."""
    txt, md, img = tmp_path / "wiki.txt", tmp_path / "notes.md", tmp_path / "mllm.json"
    txt.write_bytes(b"Lima is the capital of Peru.\n\nLima is the capital of Peru.\n\n\xff\n\nQuito is in Ecuador.\n")
    md.write_text("# Notes\n\nSantiago is the capital of Chile, a long and narrow country.\n", encoding="utf-8")
    img.write_text(
        json.dumps(
            [
                {
                    "messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "a"}],
                    "images": ["1.jpg"],
                }
            ]
        )
    )
    cfg = load_config(
        None,
        [
            f"data.paths=[{txt}, {md}, {img}]",
            f"model.cache_dir={tmp_path / 'cache'}",
            "data.val_fraction=0",
            "data.test_fraction=0",
            "data.cache=false",
        ],
    )
    m = prepare_local(cfg, str(tiny_model), tmp_path / "out")
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(Path(r["source"]).name, r["row"], r["filter"]) for r in rejects] == [
        ("mllm.json", 1, "media"),
        ("wiki.txt", 3, "duplicate"),
        ("wiki.txt", 5, "not_utf8"),
    ]
    assert "line 5" in rejects[2]["reason"]
    rows = load_split_rows(tmp_path / "out", "train")
    assert m["counts"]["accepted"] == len(rows) == 4
    assert all(r["labels"] == r["input_ids"] for r in rows)  # continued pre-training: every token
