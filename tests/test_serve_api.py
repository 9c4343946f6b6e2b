"""The OpenAI-compatible FastAPI app without Ray: a fake backend stands in for the model replicas.
Auth (case-insensitive Bearer), error bodies (OpenAI-shaped, no paths, no exception text), chat
messages with tools, streaming, per-status metrics."""

import asyncio
import json

import pytest
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

    async def generate(self, adapter, prompt, sampling):
        self.prompts.append((adapter, prompt))
        await asyncio.sleep(self.delay)
        if self.fail:
            raise self.fail
        return self.reply or OUT

    async def stream(self, adapter, prompt, sampling):
        self.prompts.append((adapter, prompt))
        if self.reply:
            yield self.reply
            return
        for piece in ("Li", "ma"):
            yield piece


class FakeMetrics:
    def __init__(self):
        self.requests: list[tuple[str, int]] = []
        self.completion_tokens = 0

    def request(self, model, status, seconds):
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
            "messages[0].content: only text parts are supported",
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
        json={"model": "base", "messages": [{"role": "user", "content": "Capital of Peru?"}], "stream": True},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Lima"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    _chat(client, headers={})
    _chat(client, max_tokens=100000)
    _chat(client)
    assert svc.metrics.requests == [("base", 200), ("?", 401), ("?", 400), ("base", 200)]
    assert svc.metrics.completion_tokens == 2 + 1  # two streamed pieces, one answer
