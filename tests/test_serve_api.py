"""The OpenAI-compatible FastAPI app without Ray: a fake backend stands in for the model replicas.
Auth (case-insensitive Bearer), error bodies (OpenAI-shaped, no paths, no exception text), chat
messages with tools, streaming, per-status metrics."""

import asyncio
import json
import re

import pytest
import yaml
from fastapi.testclient import TestClient

from oikyo_ray.config import load_config
from oikyo_ray.model.load import load_tokenizer
from oikyo_ray.model.prompt import render_prompt
from oikyo_ray.serve.adapters import AdapterNotFound
from oikyo_ray.serve.app import Service, create_app
from oikyo_ray.serve.http_errors import adapter_error_dict, internal_error_dict

TOKEN = "api-test-token-0123456789"
H = {"Authorization": f"Bearer {TOKEN}"}
OUT = {"text": "Lima", "prompt_tokens": 5, "completion_tokens": 1, "finish_reason": "stop"}


class FakeBackend:
    """Answers "Lima"; records the prompts; `fail` makes it raise, `reply` replaces its answer."""

    def __init__(self):
        self.prompts: list[tuple[str, str]] = []
        self.fail: Exception | None = None
        self.reply: dict | None = None
        self.delay = 0.0
        self.stalled = False
        self.samplings: list[dict] = []
        self.pieces: list = ["Li", "ma", {"finish_reason": "length", "completion_tokens": 2}]  # as the engine ends

    async def generate(self, adapter, prompt, sampling):
        self.prompts.append((adapter, prompt))
        self.samplings.append(sampling)
        await asyncio.sleep(self.delay)
        if self.fail:
            raise self.fail
        return self.reply or OUT

    async def health(self):
        if self.fail:
            raise self.fail
        return {"ok": not self.stalled}

    async def stream(self, adapter, prompt, sampling):
        self.prompts.append((adapter, prompt))
        if self.reply:
            yield self.reply
            return
        for piece in self.pieces:
            yield piece


class FakeMetrics:
    def __init__(self):
        self.requests: list[tuple[str, int]] = []
        self.completion_tokens = 0

    def request(self, model, status, seconds, route="-", role="-"):
        assert seconds >= 0
        self.requests.append((model, status))

    def tokens(self, model, outs):
        self.completion_tokens += sum(o["completion_tokens"] for o in outs)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(load_config(None).model, str(tiny_model))


@pytest.fixture
def api(tokenizer, tmp_path):
    cfg = load_config(None, [f"serve.adapter_root={tmp_path}", "serve.request_timeout_s=0.5"]).serve
    svc = Service(cfg, tokenizer, TOKEN, FakeBackend(), FakeMetrics())
    # raise_server_exceptions=False: answer unexpected errors as a server would, not re-raise them here
    with TestClient(create_app(svc), raise_server_exceptions=False) as client:
        yield client, svc


def _chat(client, headers=H, **body):
    return client.post(
        "/v1/chat/completions",
        headers=headers,
        json={"model": "base", "messages": [{"role": "user", "content": "Capital of Peru?"}], **body},
    )


@pytest.mark.parametrize("header", [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER {TOKEN}", f"bEaReR  {TOKEN} "])
def test_bearer_scheme_is_case_insensitive(api, header):
    client, _ = api
    r = client.post("/v1/completions", headers={"authorization": header}, json={"model": "base", "prompt": "hi"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer"},
    ],
)
def test_missing_or_wrong_token_is_401_on_every_v1_route(api, headers):
    client, svc = api
    for r in (
        client.post("/v1/completions", headers=headers, json={"model": "base", "prompt": "hi"}),
        _chat(client, headers),
        client.get("/v1/models", headers=headers),
    ):
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert r.json()["error"] == {
            "message": "missing or invalid bearer token",
            "type": "authentication_error",
            "param": None,
            "code": None,
        }
    assert svc.backend.prompts == []
    assert client.get("/healthz").json() == {"status": "ok"}  # no token needed


def test_auth_off_lets_requests_through(tokenizer):
    cfg = load_config(None, ["serve.auth=false"]).serve
    with TestClient(create_app(Service(cfg, tokenizer, None, FakeBackend(), FakeMetrics()))) as client:
        assert client.post("/v1/completions", json={"model": "base", "prompt": "hi"}).status_code == 200


def test_chat_with_tools_renders_training_prompt(api, tokenizer):
    client, svc = api
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Lima?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lima"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "24C"},
    ]
    r = _chat(client, messages=messages, tools=tools, tool_choice="auto", logprobs=False, user="u-1")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": "Lima"}
    want = render_prompt(
        tokenizer,
        [
            {"role": "user", "content": "Weather in Lima?"},
            {
                "role": "assistant",
                "content": json.dumps({"name": "get_weather", "arguments": {"city": "Lima"}}),
                "tool_call": True,
            },
            {"role": "tool", "content": "24C"},
        ],
        # keys sorted, as training stores a row's tools (data/formats): the client's order is not kept
        [{"function": {"name": "get_weather", "parameters": {"type": "object"}}, "type": "function"}],
    )
    assert svc.backend.prompts == [("", want)]


@pytest.mark.parametrize(
    "messages, tools, words",
    [
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
            None,
            "messages[0].content[0]: a image_url part needs a vision (or audio) model",
        ),
        (
            [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{not json"}}],
                },
            ],
            None,
            "messages[1].tool_calls[0].function.arguments is not valid JSON",
        ),
        (
            [{"role": "user", "tool_calls": [{"function": {"name": "f"}}]}],
            None,
            "only assistant messages may carry tool_calls",
        ),
        ([{"role": "user"}], None, "messages[0].content is missing"),
        ([{"role": "wizard", "content": "hi"}], None, "messages[0]: unknown role"),
        ([{"content": "hi"}], None, "messages.0.role: Field required"),
        ([{"role": "user", "content": "hi"}], [{"type": "function", "function": {}}], "tools[0] has no function name"),
        ([], None, "messages: List should have at least 1 item"),
    ],
)
def test_invalid_chat_messages_get_400_naming_the_field(api, messages, tools, words):
    client, svc = api
    r = _chat(client, messages=messages, **({"tools": tools} if tools else {}))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error" and words in r.json()["error"]["message"]
    assert svc.backend.prompts == []


@pytest.mark.parametrize(
    "body, words",
    [
        ({"max_tokens": 0}, "max_tokens: at least 1"),
        ({"max_tokens": 0, "logprobs": True}, "max_tokens: at least 1"),
        ({"top_logprobs": 3}, "top_logprobs: needs logprobs"),
        ({"n": 9}, "n: Input should be less than or equal to 8"),
    ],
)
def test_bad_chat_sampling_gets_400_naming_the_field(api, body, words):
    client, svc = api
    r = _chat(client, **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["param"] == words.split(":")[0]
    assert svc.backend.prompts == []
    _ok(client)


@pytest.mark.parametrize(
    "content, content_type, words",
    [
        ("{not json", "application/json", "request body is not valid JSON"),
        (
            '{"model": "base", "prompt": "hi"}',
            "text/plain",
            "must be a JSON object sent as Content-Type: application/json",
        ),
        ("", "application/json", "must be a JSON object"),
        ('{"model": "base", "prompt": "hi", "temperature": 3}', "application/json", "temperature: Input should be"),
    ],
)
def test_bad_bodies_get_400_naming_the_problem(api, content, content_type, words):
    client, _ = api
    r = client.post("/v1/completions", headers={**H, "Content-Type": content_type}, content=content)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]


def test_error_bodies_show_no_paths_or_exception_text(api, tmp_path):
    client, svc = api
    svc.backend.fail = RuntimeError(f"boom at {tmp_path}/secret.py line 3")
    r = client.post("/v1/completions", headers=H, json={"model": "base", "prompt": "hi"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "boom" not in r.text and str(tmp_path) not in r.text and "RuntimeError" not in r.text
    # a replica's adapter failure answers with its public message (the full one, with paths, is logged)
    missing = AdapterNotFound(f"{tmp_path}/x missing", "model 'x' not found")
    svc.backend.fail, svc.backend.reply = None, adapter_error_dict(missing)
    r = client.post("/v1/completions", headers=H, json={"model": "x", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"] == {
        "message": "model 'x' not found",
        "type": "model_not_found",
        "param": None,
        "code": None,
    }
    svc.backend.reply = internal_error_dict()
    r = client.post("/v1/completions", headers=H, json={"model": "x", "prompt": "hi", "stream": True})
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"  # not an event stream
    r = client.get("/v1/nope", headers=H)
    assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"  # FastAPI's own errors too


def test_limits_and_timeout(api):
    client, svc = api
    assert "max_tokens 100000 > limit" in _chat(client, max_tokens=100000).json()["error"]["message"]
    long = [{"role": "user", "content": "word " * 5000}]
    assert "tokens > limit" in _chat(client, messages=long).json()["error"]["message"]
    assert "invalid adapter name" in _chat(client, model="../etc").json()["error"]["message"]
    svc.backend.delay = 2.0  # > serve.request_timeout_s
    r = _chat(client)
    assert r.status_code == 504 and r.json()["error"]["message"] == "request timed out"


def test_stream_events_and_metrics_per_status(api):
    client, svc = api
    with client.stream(
        "POST",
        "/v1/chat/completions",
        headers=H,
        json={
            "model": "base",
            "messages": [{"role": "user", "content": "Capital of Peru?"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Lima"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"  # max_tokens ended it
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2
    assert chunks[-1]["usage"]["prompt_tokens"] > 5  # the rendered prompt's real count
    _chat(client, headers={})
    _chat(client, max_tokens=100000)
    _chat(client)
    assert svc.metrics.requests == [("base", 200), ("?", 401), ("?", 400), ("base", 200)]
    assert svc.metrics.completion_tokens == 2 + 1  # two streamed pieces, one answer


# --- hostile traffic: every bad request is a 4xx naming the problem, and the next request works ---


def _ok(client):
    """A normal request still succeeds after a bad one."""
    r = client.post("/v1/completions", headers=H, json={"model": "base", "prompt": "hi"})
    assert r.status_code == 200, r.text
    r = _chat(client)
    assert r.status_code == 200, r.text


def _raw(client, content, path="/v1/completions", **headers):
    return client.post(path, headers={**H, "Content-Type": "application/json", **headers}, content=content)


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("temperature", 1e-3, "must be 0 (greedy) or at least 0.01"),
        ("temperature", -1, "greater than or equal to 0"),
        ("temperature", 2.5, "less than or equal to 2"),
        ("top_p", 0, "greater than 0"),
        ("top_p", 1.5, "less than or equal to 1"),
        ("max_tokens", -1, "greater than or equal to 0"),
        ("max_tokens", 0, "0 only with echo"),
        ("max_tokens", 10**18, "> limit 512"),
        ("max_tokens", "many", "valid integer"),
        ("seed", -1, "greater than or equal to 0"),
        ("seed", 2**63, "less than or equal to"),
        ("presence_penalty", 2.5, "less than or equal to 2"),
        ("frequency_penalty", -3, "greater than or equal to -2"),
        ("n", 9, "less than or equal to 8"),
        ("n", 0, "greater than or equal to 1"),
        ("logprobs", 6, "less than or equal to 5"),
        ("best_of", 3, "only best_of=1 is supported"),
        ("model", "m" * 300, "at most 256 characters"),
    ],
)
def test_out_of_range_fields_get_400_naming_the_field(api, field, value, words):
    client, svc = api
    r = client.post("/v1/completions", headers=H, json={"model": "base", "prompt": "hi", field: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"].startswith(field) and words in err["message"]
    assert err["param"] == field
    assert svc.backend.prompts == []
    _ok(client)


@pytest.mark.parametrize(
    "content, words",
    [
        ('{"model": "base", "prompt": "hi", "temperature": NaN}', "temperature: number is not finite"),
        ('{"model": "base", "prompt": "hi", "top_p": Infinity}', "top_p: number is not finite"),
        ('{"model": "base", "prompt": "hi", "temperature": -1e999}', "temperature: number is not finite"),
        ('{"model": "base", "prompt": "hi", "extra": {"a": [1, NaN]}}', "extra.a.1: number is not finite"),
        ('{"model": "base", "prompt": "hi", "seed": ' + "9" * 30 + "}", "seed: integer is too large"),
        ('{"model": "base", "prompt": "hi", "seed": ' + "9" * 5000 + "}", "holding a number too large"),
        ('{"model": "base", "prompt": "\\ud800"}', "prompt: string holds an unpaired surrogate"),
        ("[1, 2]", "must be a JSON object"),
        ('"hi"', "must be a JSON object"),
        ("null", "must be a JSON object"),
        ('{"model": "base", "prompt": "hi",}', "not valid JSON"),
    ],
)
def test_non_finite_huge_or_unencodable_values_get_400(api, content, words):
    client, svc = api
    r = _raw(client, content)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]
    assert svc.backend.prompts == []
    _ok(client)


@pytest.mark.parametrize("depth", [65, 1_000, 100_000])
def test_deeply_nested_bodies_get_400_not_500(api, depth):
    client, _ = api
    deep = "[" * depth + "]" * depth
    for body in (f'{{"model": "base", "prompt": "hi", "x": {deep}}}', '{"a": ' * depth + "1" + "}" * depth):
        r = _raw(client, body)
        assert r.status_code == 400, r.text
        assert "nested deeper than 64 levels" in r.json()["error"]["message"]
    _ok(client)


def test_nesting_up_to_the_limit_is_accepted(api):
    client, _ = api
    deep = "[" * 62 + "]" * 62  # the body object, its field and 62 lists: 64 levels
    assert _raw(client, f'{{"model": "base", "prompt": "hi", "x": {deep}}}').status_code == 200


@pytest.mark.parametrize(
    "content",
    [b'{"model": "base", "prompt": "\xff\xfe"}', b'{"model": "base", "prompt": "caf\xc3"}', b"\xef\xbb\xbf\x80"],
)
def test_invalid_utf8_gets_400(api, content):
    client, _ = api
    r = _raw(client, content)
    assert r.status_code == 400 and "not valid UTF-8" in r.json()["error"]["message"]
    _ok(client)


@pytest.fixture
def small_body_api(tokenizer):
    cfg = load_config(None, ["serve.max_body_bytes=2048"]).serve
    with TestClient(create_app(Service(cfg, tokenizer, TOKEN, FakeBackend(), FakeMetrics()))) as client:
        yield client


def test_bodies_over_the_limit_get_413_before_parsing(small_body_api):
    client = small_body_api
    big = json.dumps({"model": "base", "prompt": "x" * 4000})
    r = _raw(client, big)  # with Content-Length
    assert r.status_code == 413 and "larger than 2048 bytes" in r.json()["error"]["message"]
    # chunked (no Content-Length): counted while it arrives; the body is not even JSON
    r = _raw(client, iter([b"x" * 1000] * 5))
    assert r.status_code == 413
    r = _raw(client, "{" * 3000, path="/v1/chat/completions")  # not parsed: 413, not a JSON error
    assert r.status_code == 413
    r = _raw(client, big, **{"Content-Length": "99999999999999999999999"})
    assert r.status_code in (400, 413)
    # a chunked body under the limit is read whole
    r = _raw(client, iter([b'{"model": "base", ', b'"prompt": "hi"}']))
    assert r.status_code == 200, r.text
    _ok(client)


def test_body_is_not_read_without_a_token(small_body_api):
    r = small_body_api.post("/v1/completions", content="x" * 5000, headers={"Content-Type": "application/json"})
    assert r.status_code == 401  # auth first: an anonymous client cannot make the server read its body


@pytest.mark.parametrize(
    "path, body, words, param",
    [
        ("/v1/completions", {"prompt": ["hi"] * 17}, "between 1 and 16 prompts", "prompt"),
        ("/v1/completions", {"prompt": []}, "between 1 and 16 prompts", "prompt"),
        ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop strings", "stop"),
        ("/v1/completions", {"prompt": "hi", "stop": "s" * 257}, "1 to 256 characters", "stop"),
        ("/v1/completions", {"prompt": "hi", "stop": [""]}, "1 to 256 characters", "stop"),
        ("/v1/completions", {"prompt": "hi", "stop": ["a", 1]}, "stop.1: Input should be a valid string", "stop.1"),
        ("/v1/completions", {"prompt": [[1, -2]]}, "prompt.0", "prompt.0"),
        ("/v1/completions", {"prompt": [{"a": 1}]}, "prompt.0", "prompt.0"),
        ("/v1/completions", {"prompt": "hi", "n": 9}, "n: Input should be less than or equal to 8", "n"),
        ("/v1/completions", {"prompt": ["hi"] * 9, "n": 2}, "prompts x n", "prompt"),
        ("/v1/completions", {"prompt": "hi", "stream": True, "n": 2}, "n > 1 is answered whole", "n"),
        ("/v1/completions", {"prompt": "hi", "stream": True, "logprobs": 1}, "answered whole", "stream"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
            "tool_choice: needs tools",
            "tool_choice",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "maybe"},
            "tool_choice",
            "tool_choice",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}] * 257}, "256 messages", "messages"),
        ("/v1/chat/completions", {"messages": "hi"}, "messages: Input should be a valid list", "messages"),
    ],
)
def test_count_limits_get_400(api, path, body, words, param):
    client, svc = api
    r = client.post(path, headers=H, json={"model": "base", **body})
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"] and r.json()["error"]["param"] == param
    assert svc.backend.prompts == []
    _ok(client)


def test_over_long_prompts_are_refused_before_tokenising(api, monkeypatch):
    client, svc = api
    tokenised = []
    real = svc.tokenizer.__class__.__call__
    monkeypatch.setattr(
        svc.tokenizer.__class__, "__call__", lambda self, *a, **k: tokenised.append(1) or real(self, *a, **k)
    )
    too_long = "x" * (2048 * 16 + 1)  # serve.max_prompt_tokens x serve.max_prompt_bytes_per_token
    for r in (
        client.post("/v1/completions", headers=H, json={"model": "base", "prompt": too_long}),
        client.post("/v1/completions", headers=H, json={"model": "base", "prompt": ["hi", too_long]}),
        client.post("/v1/completions", headers=H, json={"model": "base", "prompt": "é" * 17_000}),  # 2 bytes each
        _chat(client, messages=[{"role": "user", "content": [{"type": "text", "text": too_long}]}]),
        _chat(client, messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": too_long}]),
    ):
        assert r.status_code == 400 and "prompt is too long" in r.json()["error"]["message"], r.text
    assert tokenised == [] and svc.backend.prompts == []
    _ok(client)
    assert tokenised  # a normal prompt is tokenised (counted against serve.max_prompt_tokens)


def test_edge_values_and_unknown_fields_are_accepted(api):
    client, svc = api
    body = {
        "model": "base",
        "prompt": ["hi"] * 16,
        "temperature": 0,
        "top_p": 1,
        "seed": 2**63 - 1,
        "max_tokens": 512,
        "stop": ["a", "b", "c", "d"],
        "best_of": 1,
        "n": 1,
        "presence_penalty": -2,
        "frequency_penalty": None,
        "logit_bias": {"50256": -100},
        "user": "u-1",
        "suffix": None,
        "stream_options": {"include_usage": True},
    }
    r = client.post("/v1/completions", headers=H, json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 16
    r = client.post("/v1/completions", headers=H, json={"model": "base", "prompt": "hi", "temperature": 0.01})
    assert r.status_code == 200, r.text


def test_rendering_and_tokenising_run_off_the_event_loop(api, monkeypatch):
    client, svc = api
    on_loop = []

    def running_loop() -> bool:
        try:
            asyncio.get_running_loop()
            return True
        except RuntimeError:
            return False

    cls = svc.tokenizer.__class__
    real_call, real_render = cls.__call__, cls.apply_chat_template
    monkeypatch.setattr(
        cls, "__call__", lambda self, *a, **k: on_loop.append(running_loop()) or real_call(self, *a, **k)
    )
    monkeypatch.setattr(
        cls, "apply_chat_template", lambda self, *a, **k: on_loop.append(running_loop()) or real_render(self, *a, **k)
    )
    _ok(client)
    assert on_loop and not any(on_loop)


WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>'


def _events(client, path, body):
    with client.stream("POST", path, headers=H, json={"model": "base", "stream": True, **body}) as r:
        assert r.status_code == 200, r.read()
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_n_choices_each_with_its_own_seed(api):
    client, svc = api
    r = client.post("/v1/completions", headers=H, json={"model": "base", "prompt": ["a", "b"], "n": 3, "seed": 7})
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == list(range(6))
    assert [p for _, p in svc.backend.prompts] == ["a"] * 3 + ["b"] * 3  # prompt-major, as OpenAI orders them
    assert [s["seed"] for s in svc.backend.samplings] == [7, 8, 9, 7, 8, 9]
    chat = _chat(client, n=2)
    assert [c["index"] for c in chat.json()["choices"]] == [0, 1]


def test_logprobs_echo_and_token_prompts_reach_the_engine_and_come_back(api):
    client, svc = api
    lp = {
        "tokens": ["a", "b"],
        "token_logprobs": [None, -0.5],
        "top_logprobs": [None, {"b": -0.5}],
        "text_offset": [0, 1],
    }
    svc.backend.reply = dict(OUT, text="ab", logprobs=lp)
    body = {"model": "base", "prompt": [3, 4], "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    r = client.post("/v1/completions", headers=H, json=body)
    assert r.status_code == 200, r.text
    assert svc.backend.prompts[-1] == ("", [3, 4])  # token ids go to the engine as ids
    assert svc.backend.samplings[-1]["logprobs"] == 1 and svc.backend.samplings[-1]["echo"] is True
    assert r.json()["choices"][0]["logprobs"] == lp
    chat = _chat(client, logprobs=True, top_logprobs=1).json()["choices"][0]["logprobs"]["content"]
    assert chat[1] == {
        "token": "b",
        "logprob": -0.5,
        "bytes": [98],
        "top_logprobs": [{"token": "b", "logprob": -0.5, "bytes": [98]}],
    }
    assert svc.backend.samplings[-1]["logprobs"] == 1
    _chat(client)
    assert "logprobs" not in svc.backend.samplings[-1]  # not asked: not computed


def test_tool_calls_come_back_as_tool_calls(api):
    client, svc = api
    svc.backend.reply = dict(OUT, text=CALL)
    r = _chat(client, tools=WEATHER)
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Lima"}'} and call["type"] == "function"
    none = _chat(client, tools=WEATHER, tool_choice="none").json()["choices"][0]
    assert none["message"] == {"role": "assistant", "content": CALL} and none["finish_reason"] == "stop"
    # a named tool: the prompt ends inside that call, the model writes only the arguments
    svc.backend.reply = dict(OUT, text='{"city": "Lima"}}\n</tool_call>')
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = _chat(client, tools=WEATHER, tool_choice=named)
    assert svc.backend.prompts[-1][1].endswith('<tool_call>\n{"name": "get_weather", "arguments": ')
    assert r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == '{"city": "Lima"}'
    bad = _chat(client, tools=WEATHER, tool_choice={"type": "function", "function": {"name": "rm"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_choice"


def test_streamed_tool_calls_usage_and_errors(api):
    client, svc = api
    svc.backend.pieces = ["Checking.", CALL[:15], CALL[15:], {"finish_reason": "stop", "completion_tokens": 9}]
    chunks = _events(
        client, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": WEATHER}
    )
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content") or "" for d in deltas) == "Checking."
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert len(calls) == 1 and calls[0]["index"] == 0 and calls[0]["function"]["name"] == "get_weather"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

    svc.backend.pieces = ["Li", {"error": {"status": 500, "message": "internal error", "type": "internal_error"}}]
    chunks = _events(client, "/v1/completions", {"prompt": "hi"})
    assert chunks[0]["choices"][0]["text"] == "Li" and chunks[-1]["error"]["message"] == "internal error"
    _ok(client)

    svc.backend.pieces = ["Li", "ma"]  # an engine that does not say how it ended: counted from the text
    chunks = _events(client, "/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}})
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == len(svc.tokenizer("Lima", add_special_tokens=False)["input_ids"])


def test_healthz_reflects_the_model_replicas(api):
    client, svc = api
    assert client.get("/healthz").status_code == 200  # no token needed: probes and load balancers
    svc.backend.stalled = True
    r = client.get("/healthz")
    assert r.status_code == 503 and r.json() == {"status": "unavailable"}
    svc.backend.stalled, svc.backend.fail = False, RuntimeError("no replica")
    assert client.get("/healthz").status_code == 503
    svc.backend.fail = None
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    "prompt, words",
    [
        ([3, 10**6], "token id 1000000 (position 1) is not in the vocabulary"),
        ([[3, 4], [5, 2**31 - 1]], "token id 2147483647 (position 1) is not in the vocabulary"),
        ("OOV", "is not in the vocabulary (ids 0.."),
    ],
)
def test_token_ids_outside_the_vocabulary_get_400(api, tokenizer, prompt, words):
    client, svc = api
    prompt = [len(tokenizer)] if prompt == "OOV" else prompt  # the first id past the tokenizer's last
    r = client.post("/v1/completions", headers=H, json={"model": "base", "prompt": prompt, "stream": False})
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"] and r.json()["error"]["param"] == "prompt"
    assert svc.backend.prompts == []
    _ok(client)


def _routed(tokenizer, weights):
    cfg = load_config(None, ["serve.adapters={}"]).serve.model_copy(update={"routes": {"bot": weights}})
    return Service(cfg, tokenizer, TOKEN, FakeBackend(), FakeMetrics())


def test_a_canary_splits_traffic_by_weight_and_keeps_each_user_on_one_variant(tokenizer):
    svc = _routed(tokenizer, {"bot-v3": 80, "bot-v4": 20})
    first: dict[str, str] = {}
    with TestClient(create_app(svc)) as client:

        def ask(user: str, i: int) -> str:
            # the user key from OpenAI's `user` field, or from the header for clients that cannot set it
            body, headers = {"model": "bot", "prompt": "hi"}, dict(H)
            if i % 2:
                body["user"] = user
            else:
                headers["X-Oikyo-User"] = user
            r = client.post("/v1/completions", headers=headers, json=body)
            assert r.status_code == 200, r.text
            assert r.headers["X-Oikyo-Model"] == r.json()["model"]  # the variant that answered, both ways
            return r.json()["model"]

        for i in range(1000):
            first[f"user-{i}"] = ask(f"user-{i}", i)
        for i in range(0, 1000, 7):  # again, the other way of sending the key: same variant
            assert ask(f"user-{i}", i + 1) == first[f"user-{i}"]
        chat = _chat(client, model="bot", user="user-7")
        assert chat.headers["X-Oikyo-Model"] == first["user-7"]  # one user, one variant, every endpoint
        models = {m["id"] for m in client.get("/v1/models", headers=H).json()["data"]}
    canary = sum(v == "bot-v4" for v in first.values()) / 1000
    assert abs(canary - 0.20) <= 0.05, canary
    assert {a for a, _ in svc.backend.prompts} == {"bot-v3", "bot-v4"}  # the engine ran the variants
    assert {m for m, _ in svc.metrics.requests} == {"bot-v3", "bot-v4"}  # counted per variant
    assert "bot" in models


def test_moving_weight_moves_only_the_users_in_the_changed_slice(tokenizer):
    def variant_of(weights, user):
        with TestClient(create_app(_routed(tokenizer, weights))) as client:
            r = client.post("/v1/completions", headers=H, json={"model": "bot", "prompt": "hi", "user": user})
            return r.json()["model"]

    users = [f"u{i}" for i in range(60)]
    before = {u: variant_of({"a": 90, "b": 10}, u) for u in users}
    after = {u: variant_of({"a": 70, "b": 30}, u) for u in users}
    assert all(after[u] == "b" for u in users if before[u] == "b")  # canary users stay on it
    assert any(before[u] == "a" and after[u] == "b" for u in users)


@pytest.mark.parametrize(
    "routes, words",
    [
        ({"base": {"a": 1}}, "routes.base: the name is already the base's"),
        ({"bot": {}}, "routes.bot: give at least one adapter"),
        ({"bot": {"a": 0}}, "routes.bot.a: weight must be a positive number"),
        ({"bot": {"a": -1, "b": 1}}, "routes.bot.a: weight must be a positive number"),
        ({"bot": {"a": float("inf")}}, "routes.bot.a: weight must be a positive number"),
        ({"bot": {"two": 1}, "two": {"a": 1}}, "routes.bot.two: routes cannot point at routes"),
    ],
)
def test_bad_routes_are_refused_before_serving(routes, words):
    from oikyo_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(None, [f"serve.routes={yaml.safe_dump(routes, default_flow_style=True).strip()}"])
