"""One conversation, three paths, the same tokens: what training learns to answer after (the masked
encoding's ids before the final answer), what eval generates from (its task prompt on a data-stage
row) and what the serving API asks (an OpenAI chat request: typed parts, tools, tool calls, tool
results) must be token for token identical."""

import json

import pytest

from oikyo_ray.config import load_config
from oikyo_ray.data.formats import normalise
from oikyo_ray.data.tokenize import IGNORE, encode_messages
from oikyo_ray.eval.items import task_items
from oikyo_ray.model.load import load_tokenizer
from oikyo_ray.serve.prompts import chat_prompt
from oikyo_ray.serve.protocol import ChatRequest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def _call(id_, name, args):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


# OpenAI-shaped conversations; the last message is the answer training learns and eval scores
CONVERSATIONS = {
    "system_multi_turn": (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of Peru?"},
            {"role": "assistant", "content": "Lima"},
            {"role": "user", "content": [{"type": "text", "text": "And of "}, {"type": "text", "text": "Chile?"}]},
            {"role": "assistant", "content": "Santiago"},
        ],
        None,
    ),
    "tool_call_and_result": (
        [
            {"role": "system", "content": "You help with weather."},
            {"role": "user", "content": "Is it warm in Lima?"},
            {"role": "assistant", "content": None, "tool_calls": [_call("call_1", "get_weather", {"city": "Lima"})]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 24}'},
            {"role": "assistant", "content": "Yes, 24 degrees."},
        ],
        [WEATHER],
    ),
    "tools_without_system_parallel_calls": (
        [
            {"role": "user", "content": "Weather in Quito and the time?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [_call("a", "get_weather", {"city": "Quito"}), _call("b", "get_time", {})],
            },
            {"role": "tool", "tool_call_id": "a", "content": '{"temp_c": 15}'},
            {"role": "tool", "tool_call_id": "b", "content": "10:00"},
            {"role": "assistant", "content": "15 degrees in Quito; it is 10:00."},
            {"role": "user", "content": "Warm, then?"},
            {"role": "assistant", "content": "Mild."},
        ],
        [WEATHER, TIME],
    ),
    "answer_is_a_tool_call": (
        [
            {"role": "user", "content": "Weather in Cusco?"},
            {"role": "assistant", "content": None, "tool_calls": [_call("c", "get_weather", {"city": "Cusco"})]},
        ],
        [WEATHER],
    ),
}


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(load_config(None).model, str(tiny_model))


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]  # as generation tokenises prompts


def _data_row(conv, tools, tok) -> tuple[dict, dict]:
    """A data-stage output row (serialised as `data.curate.curate_row` does) and its masked encoding."""
    msgs, meta = normalise({"messages": conv, **({"tools": tools} if tools else {})})
    enc = encode_messages(tok, msgs, max_length=2048, tools=meta.get("tools"))
    row = {
        "messages": json.dumps(msgs, ensure_ascii=False),
        "meta": json.dumps(meta, ensure_ascii=False, sort_keys=True),
        "input_ids": enc["input_ids"],
        "labels": enc["labels"],
    }
    return row, enc


def _before_final_answer(enc: dict) -> list[int]:
    """Training's ids up to where the final answer's learned tokens start."""
    labels = enc["labels"]
    start = len(labels)
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    assert 0 < start < len(labels), "the final answer must be learned and follow a prompt"
    return enc["input_ids"][:start]


def _served(tok, conv, tools) -> list[int]:
    body = {"model": "base", "messages": conv[:-1], "max_tokens": 8, "user": "ignored-field"}
    if tools:
        body |= {"tools": tools, "tool_choice": "auto"}
    return _ids(tok, chat_prompt(tok, ChatRequest.model_validate(body)))


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_serving_asks_what_training_taught(tok, name):
    conv, tools = CONVERSATIONS[name]
    _, enc = _data_row(conv, tools, tok)
    served = _served(tok, conv, tools)
    assert _before_final_answer(enc) == served
    if tools:  # the tools really were rendered (three tool-less prompts would agree too)
        assert all(t["function"]["name"] in tok.decode(served) for t in tools)
    if any(m.get("tool_calls") for m in conv[:-1]):
        assert "<tool_call>" in tok.decode(served)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_eval_asks_what_training_taught(tok, name):
    conv, tools = CONVERSATIONS[name]
    row, enc = _data_row(conv, tools, tok)
    item = task_items([row], tok, load_config(None))[0]
    assert _before_final_answer(enc) == _ids(tok, item.prompt) == _served(tok, conv, tools)
