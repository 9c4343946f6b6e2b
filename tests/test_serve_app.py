"""Ray Serve app on a real local Ray with real HTTP: adapters from a root (local and s3://),
mixed-adapter batches, streaming, the openai client, errors, backpressure, recovery, metrics."""

import asyncio
import http.server
import json
import os
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from oikyo_ray.config import load_config
from oikyo_ray.model.prompt import render_prompt

pytestmark = [pytest.mark.slow, pytest.mark.ray]
TOKEN = "serve-test-token-0123456789"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompt(q: str) -> str:
    return f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def adapter_root(tiny_model, cache_dir, tmp_path_factory):
    """alpha: LoRA trained briefly on the demo tasks; beta: a random LoRA (answers differently);
    plus traps: a symlink out of the root and an adapter with pickled weights only."""
    from peft import LoraConfig, get_peft_model

    from oikyo_ray.data.curate import curate_file
    from oikyo_ray.demo.tasks import ASSET
    from oikyo_ray.model.load import load_model, load_tokenizer
    from oikyo_ray.model.methods import apply_method
    from oikyo_ray.train.loop import LoopHooks, collate, shuffled_batches, train_loop

    root = tmp_path_factory.mktemp("adapters")
    cfg = load_config(None, [f"model.cache_dir={cache_dir}", "train.lr=3e-3", "train.log_every=1000"])
    tok = load_tokenizer(cfg.model, str(tiny_model))
    recs = [r for r in curate_file(str(ASSET), ASSET.read_bytes(), cfg.data, tok) if r["status"] == "ok"]
    torch.manual_seed(0)
    alpha = apply_method(load_model(cfg.model, str(tiny_model)), cfg.method)
    train_loop(
        alpha,
        lambda e: (collate(b, tok.pad_token_id) for b in shuffled_batches(recs, 16, e)),
        cfg.train,
        300,
        LoopHooks(),
    )
    alpha.save_pretrained(root / "alpha")
    _train_tool_caller(cfg, tok, tiny_model, root / "toolcaller", tmp_path_factory.mktemp("glaive"))
    torch.manual_seed(1)
    beta = get_peft_model(
        load_model(cfg.model, str(tiny_model)), LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)
    )
    beta.save_pretrained(root / "beta")
    outside = tmp_path_factory.mktemp("outside")
    beta.save_pretrained(outside / "gamma")
    (root / "escape").symlink_to(outside / "gamma")
    _nan_copy(root / "beta", root / "broken")
    (root / "pickled").mkdir()
    (root / "pickled" / "adapter_config.json").write_text((root / "beta" / "adapter_config.json").read_text())
    (root / "pickled" / "adapter_model.bin").write_bytes(b"not really a pickle")
    return root


def _nan_copy(src: Path, dst: Path) -> None:
    """An adapter whose weights are NaN: sampling from it raises inside `generate` ("probability
    tensor contains either inf, nan or element < 0"), the error that once wedged a replica."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    weights = load_file(src / "adapter_model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, dst / "adapter_model.safetensors")


# two conversations of the shared glaive tool-call file (user asks, assistant calls, tool answers,
# assistant replies), learned by heart, so greedy decoding must give back their exact calls
GLAIVE_ROWS = (11, 77)


def _glaive_rows() -> list[dict]:
    rows = json.loads((Path(os.environ["OIKYO_SHARED_DIR"]) / "datasets/glaive_toolcall_en_demo.json").read_text())
    return [{**rows[i], "conversations": rows[i]["conversations"][:4]} for i in GLAIVE_ROWS]


# a conversation whose answer opens with a thinking trace (OpenAI/DeepSeek's reasoning_content),
# learned by heart beside the tool calls: the served answer must split it back out
REASONING_ROW = {
    "messages": [
        {"role": "user", "content": "Think first: what is two plus three?"},
        {"role": "assistant", "reasoning_content": "two and three make five", "content": "Five."},
    ]
}


def _train_tool_caller(cfg, tok, tiny_model, out: Path, tmp: Path) -> None:
    """A LoRA trained by oikyo's data stage and loop on shared tool-call rows (sharegpt + tools),
    and on REASONING_ROW."""
    from oikyo_ray.data.curate import curate_file
    from oikyo_ray.model.load import load_model
    from oikyo_ray.model.methods import apply_method
    from oikyo_ray.train.loop import LoopHooks, collate, shuffled_batches, train_loop

    path = tmp / "glaive.json"
    path.write_text(json.dumps([*_glaive_rows(), REASONING_ROW]))
    data = cfg.data.model_copy(update={"max_length": 1024})  # the tools block alone is long in the tiny vocab
    recs = [r for r in curate_file(str(path), path.read_bytes(), data, tok) if r["status"] == "ok"]
    assert len(recs) == len(GLAIVE_ROWS) + 1
    torch.manual_seed(0)
    model = apply_method(load_model(cfg.model, str(tiny_model)), cfg.method)
    train = cfg.train.model_copy(update={"lr": 1e-2})
    epochs = lambda e: (collate(b, tok.pad_token_id) for b in shuffled_batches(recs, len(recs), e))  # noqa: E731
    train_loop(model, epochs, train, 150, LoopHooks())
    model.save_pretrained(out)


@pytest.fixture(scope="module")
def capture_root(tmp_path_factory) -> Path:
    """Where the app captures its traffic and feedback: every test's requests go through capture."""
    return tmp_path_factory.mktemp("capture")


@pytest.fixture(scope="module")
def server(ray_session, adapter_root, cache_dir, capture_root, tmp_path_factory):
    from ray import serve

    from oikyo_ray.model.load import resolve_model_path
    from oikyo_ray.serve.ray_serve import start

    tfile = tmp_path_factory.mktemp("tok") / "token"
    tfile.write_text(TOKEN)
    cfg = load_config(
        None,
        [
            f"model.cache_dir={cache_dir}",
            f"serve.port={_port()}",
            f"serve.token_file={tfile}",
            f"serve.adapter_root={adapter_root}",
            "serve.max_adapters_per_replica=2",
            "serve.max_batch_size=8",
            "serve.batch_wait_timeout_s=0.2",
            "serve.cpus_per_replica=0.5",
            "serve.capture.enabled=true",
            f"serve.capture.root={capture_root}",
            "serve.capture.flush_s=0.5",
            "serve.capture.drift_poll_s=1",
            "serve.feedback.enabled=true",
        ],
    )
    url = start(cfg, resolve_model_path(cfg.model))
    yield url
    serve.shutdown()


H = {"Authorization": f"Bearer {TOKEN}"}


def _complete(url, model, q, **kw):
    r = httpx.post(
        f"{url}/v1/completions",
        headers=H,
        timeout=120,
        json={"model": model, "prompt": _prompt(q), "max_tokens": 6, "temperature": 0, **kw},
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_adapters_load_from_root_and_list(server):
    assert _complete(server, "alpha", "What is the capital of Peru?") == "Lima"
    ids = {m["id"] for m in httpx.get(f"{server}/v1/models", headers=H, timeout=30).json()["data"]}
    assert {"base", "alpha", "beta", "escape", "pickled"} <= ids or {"base", "alpha", "beta"} <= ids


def _samples(metrics_url: str, family: str, app: str = "oikyo") -> list:
    """The Prometheus samples of one metric family exported for one Serve application."""
    text = httpx.get(metrics_url, timeout=10).text
    return [
        s
        for f in text_string_to_metric_families(text)
        if f.name == family
        for s in f.samples
        if s.labels.get("application") == app
    ]


def _eventually(check, timeout_s: float = 60):
    """Poll `check` until it returns something true (Ray exports metrics every few seconds)."""
    deadline = time.time() + timeout_s
    while not (got := check()) and time.time() < deadline:
        time.sleep(2)
    return got


def test_mixed_adapters_batch_together_and_answer_differently(server, ray_session):
    q = "Opposite of hot?"
    alone = {m: _complete(server, m, q) for m in ("alpha", "beta", "base")}
    assert alone["alpha"] == "cold" and len(set(alone.values())) == 3

    async def burst():
        async with httpx.AsyncClient(timeout=120) as c:
            reqs = [
                c.post(
                    f"{server}/v1/completions",
                    headers=H,
                    json={"model": m, "prompt": _prompt(q), "max_tokens": 6, "temperature": 0},
                )
                for m in ("alpha", "beta", "base") * 2
            ]
            return await asyncio.gather(*reqs)

    rs = asyncio.run(burst())
    texts = [r.json()["choices"][0]["text"] for r in rs]
    assert texts == [alone[m] for m in ("alpha", "beta", "base") * 2]  # batching changes no answer

    def mixed_batches() -> float:  # engine calls that held more than one model (adapters, the base)
        samples = _samples(ray_session["metrics"], "ray_oikyo_batch_models")
        calls = sum(s.value for s in samples if s.name.endswith("_count"))
        single = sum(s.value for s in samples if s.name.endswith("_bucket") and float(s.labels["le"]) == 1)
        return calls - single

    # the burst's adapters shared generate() calls: some engine call held more than one model
    assert _eventually(lambda: mixed_batches() >= 1), "no engine call mixed adapters"


def test_streaming_completions_and_chat(server):
    full = _complete(server, "alpha", "Capital of Spain?")
    with httpx.stream(
        "POST",
        f"{server}/v1/completions",
        headers=H,
        timeout=120,
        json={
            "model": "alpha",
            "prompt": _prompt("Capital of Spain?"),
            "max_tokens": 6,
            "temperature": 0,
            "stream": True,
        },
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full == "Madrid"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_openai_client_chat_and_stream(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=TOKEN)
    msgs = [{"role": "user", "content": "What is the capital of Peru?"}]
    out = client.chat.completions.create(model="alpha", messages=msgs, max_tokens=6, temperature=0)
    assert out.choices[0].message.content == "Lima" and out.usage.completion_tokens > 0
    stream = client.chat.completions.create(model="alpha", messages=msgs, max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "Lima"
    assert {m.id for m in client.models.list()} >= {"base", "alpha"}


def _streamed_message(stream) -> tuple[str, dict, str]:
    """(content, {index: {"name", "arguments"}}, finish_reason) put together from chunks' deltas."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            call = calls.setdefault(d.index, {"name": "", "arguments": "", "id": None})
            call["id"] = call["id"] or d.id
            call["name"] += (d.function.name or "") if d.function else ""
            call["arguments"] += (d.function.arguments or "") if d.function else ""
        finish = choice.finish_reason or finish
    return content, calls, finish


def test_reasoning_trace_is_returned_apart_from_the_answer(server, tiny_model):
    """The model answers `<think>\n...\n</think>\n\nFive.`: the openai client gets the trace as
    reasoning_content and the answer as content, whole and streamed alike."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=TOKEN)
    kw = {"model": "toolcaller", "messages": REASONING_ROW["messages"][:1], "max_tokens": 40, "temperature": 0}
    message = client.chat.completions.create(**kw).choices[0].message
    assert (message.model_extra["reasoning_content"], message.content) == ("two and three make five", "Five.")
    trace = answer = ""
    for chunk in client.chat.completions.create(**kw, stream=True):
        delta = chunk.choices[0].delta
        trace += (delta.model_extra or {}).get("reasoning_content") or ""
        answer += delta.content or ""
    assert (trace, answer) == ("two and three make five", "Five.")
    from transformers import AutoTokenizer

    prompt = render_prompt(AutoTokenizer.from_pretrained(tiny_model), kw["messages"])
    raw = client.completions.create(model="toolcaller", prompt=prompt, max_tokens=40, temperature=0)
    assert raw.choices[0].text.startswith("<think>\ntwo and three make five\n</think>")  # completions: as generated


@pytest.mark.parametrize("stream", [False, True])
def test_openai_client_tool_call_round_trip(server, stream):
    """Tools in, tool_calls out, the tool's result in, the answer out, as an agent loop does it."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=TOKEN)
    for row in _glaive_rows():
        turns = row["conversations"]
        tools = [{"type": "function", "function": t} for t in json.loads(row["tools"])]
        want_call, result, want_answer = json.loads(turns[1]["value"]), turns[2]["value"], turns[3]["value"]
        msgs: list[dict] = [{"role": "user", "content": turns[0]["value"]}]
        kw = {"model": "toolcaller", "tools": tools, "max_tokens": 200, "temperature": 0}
        if stream:
            content, calls, finish = _streamed_message(client.chat.completions.create(messages=msgs, stream=True, **kw))
            assert list(calls) == [0] and calls[0]["id"]
            call = calls[0]
        else:
            out = client.chat.completions.create(messages=msgs, **kw)
            finish, content = out.choices[0].finish_reason, out.choices[0].message.content
            assert len(out.choices[0].message.tool_calls) == 1
            c = out.choices[0].message.tool_calls[0]
            call = {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
        assert finish == "tool_calls" and not content
        assert call["name"] == want_call["name"] and json.loads(call["arguments"]) == want_call["arguments"]
        msgs.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call["id"],
                        "type": "function",
                        "function": {"name": call["name"], "arguments": call["arguments"]},
                    }
                ],
            }
        )
        msgs.append({"role": "tool", "tool_call_id": call["id"], "content": result})
        if stream:
            content, calls, finish = _streamed_message(client.chat.completions.create(messages=msgs, stream=True, **kw))
        else:
            out = client.chat.completions.create(messages=msgs, **kw)
            content, calls, finish = (
                out.choices[0].message.content,
                out.choices[0].message.tool_calls,
                out.choices[0].finish_reason,
            )
        assert (content, finish) == (want_answer, "stop") and not calls


@pytest.mark.parametrize(
    "headers, body, status, words",
    [
        ({}, {"model": "alpha", "prompt": "hi"}, 401, "token"),
        ({"Authorization": "Bearer wrong"}, {"model": "alpha", "prompt": "hi"}, 401, "token"),
        (H, {"model": "nope", "prompt": "hi"}, 404, "not found"),
        (H, {"model": "../beta", "prompt": "hi"}, 400, "invalid adapter name"),
        (H, {"model": "/etc", "prompt": "hi"}, 400, "invalid adapter name"),
        (H, {"model": "escape", "prompt": "hi"}, 400, "outside the adapter root"),
        (H, {"model": "pickled", "prompt": "hi"}, 400, "safetensors"),
        (H, {"model": "alpha"}, 400, "prompt"),
        (H, {"model": "alpha", "prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
        (H, {"model": "alpha", "prompt": "word " * 5000}, 400, "tokens > limit"),
        (H, {"model": "alpha", "prompt": "hi", "temperature": -1}, 400, "temperature"),
        (H, "{not json", 400, "not valid JSON"),
    ],
)
def test_bad_requests_get_clear_errors(server, adapter_root, headers, body, status, words):
    kw = (
        {"content": body, "headers": {**headers, "Content-Type": "application/json"}}
        if isinstance(body, str)
        else {"json": body, "headers": headers}
    )
    r = httpx.post(f"{server}/v1/completions", timeout=60, **kw)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
    assert str(adapter_root) not in r.text and "/tmp" not in r.text and "Traceback" not in r.text


def test_bearer_scheme_is_case_insensitive_over_http(server):
    r = httpx.get(f"{server}/v1/models", headers={"authorization": f"bearer {TOKEN}"}, timeout=30)
    assert r.status_code == 200, r.text


def test_chat_with_tool_messages_over_http(server):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Lima?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lima"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "24C"},
    ]
    body = {"model": "alpha", "messages": messages, "tools": tools, "tool_choice": "auto", "max_tokens": 4}
    r = httpx.post(f"{server}/v1/chat/completions", headers=H, timeout=120, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 60  # the tools block and the call were rendered into the prompt
    messages[1]["tool_calls"][0]["function"]["arguments"] = "{oops"
    r = httpx.post(f"{server}/v1/chat/completions", headers=H, timeout=60, json=body)
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("messages[1].tool_calls[0].function.arguments is not valid JSON")


def test_lru_eviction_keeps_answers_right(server):
    # capacity 2: cycling three adapters evicts and reloads; answers stay those of each adapter
    first = {m: _complete(server, m, "Capital of Peru?") for m in ("alpha", "beta")}
    for m in ("beta", "alpha", "beta", "alpha"):
        assert _complete(server, m, "Capital of Peru?") == first[m]


def test_metrics_exported_per_adapter(server, ray_session):
    _complete(server, "alpha", "Capital of Peru?")
    httpx.post(f"{server}/v1/completions", timeout=30, json={"model": "alpha", "prompt": "hi"})  # 401

    def requests() -> dict:
        return {
            (s.labels["model"], s.labels["status"]): s.value
            for s in _samples(ray_session["metrics"], "ray_oikyo_requests")
            if not s.name.endswith("_created")
        }

    for i in range(3):  # made-up model names: one bounded label, not a series each
        httpx.post(f"{server}/v1/completions", headers=H, timeout=30, json={"model": f"made-up-{i}", "prompt": "hi"})
    counts = _eventually(
        lambda: (
            (got := requests()).get(("alpha", "200"))
            and got.get(("_unknown", "401"))
            and got.get(("_unknown", "404"))
            and got
        )
    )
    assert counts, requests()
    assert not any(m.startswith("made-up") for m, _ in counts)
    httpx.post(f"{server}/v1/completions", headers=H, timeout=30, json={"model": "pickled", "prompt": "hi"})
    failed = _eventually(
        lambda: {s.labels["model"] for s in _samples(ray_session["metrics"], "ray_oikyo_adapter_load_failures")}
    )
    assert "pickled" in failed and not any(m.startswith("made-up") for m in failed)  # unknown names never counted
    for family in (
        "ray_oikyo_request_latency_ms",
        "ray_oikyo_tokens",
        "ray_oikyo_batch_size",
        "ray_oikyo_engine_latency_ms",
    ):
        assert _samples(ray_session["metrics"], family), family


def test_answers_are_captured_redacted_and_rated(server, ray_session, capture_root):
    """Capture and feedback on the real app: the answer's row (redacted) and its rating land as
    parquet under the capture root; the rating is counted for the variant that answered."""
    from openai import OpenAI

    from oikyo_ray.serve.capture import read_rows

    client = OpenAI(base_url=f"{server}/v1", api_key=TOKEN)
    question = "I am ana.perez@example.org, call +44 20 7946 0958. What is the capital of Peru?"
    answer = client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": question}], max_tokens=4, temperature=0, user="u-7"
    )
    rated = httpx.post(f"{server}/v1/feedback", headers=H, timeout=30, json={"id": answer.id, "thumbs": "up"})
    assert rated.status_code == 202 and rated.json()["model"] == "alpha", rated.text
    unknown = httpx.post(f"{server}/v1/feedback", headers=H, timeout=30, json={"id": "cmpl-nosuchanswer", "score": 3})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "id"

    def row(stream: str) -> list[dict]:
        return [r for r in read_rows(str(capture_root / stream)) if r["id"] == answer.id]

    (captured,) = _eventually(lambda: row("completions"))
    assert captured["model"] == "alpha" and captured["endpoint"] == "chat"
    assert "[EMAIL]" in captured["prompt"] and "[PHONE]" in captured["prompt"] and "ana.perez" not in captured["prompt"]
    assert captured["completion"] == answer.choices[0].message.content and "user" not in captured  # not in fields
    (feedback,) = _eventually(lambda: row("feedback"))
    assert (feedback["verdict"], feedback["thumbs"], feedback["model"]) == ("positive", "up", "alpha")

    def counted() -> list:
        got = _samples(ray_session["metrics"], "ray_oikyo_feedback")
        written = _samples(ray_session["metrics"], "ray_oikyo_capture_rows")
        positive = [x for x in got if x.labels.get("model") == "alpha" and x.labels.get("verdict") == "positive"]
        return positive and [x for x in written if x.labels.get("outcome") == "written" and x.value > 0]

    assert _eventually(counted)


def test_drift_reports_are_exported_as_gauges(server, ray_session, capture_root):
    """The latest `oikyo drift` report beside the capture becomes ray_oikyo_drift_* gauges."""
    report = {"drifted": True, "checks": [{"check": "script_tv", "value": 0.5, "threshold": 0.2, "drifted": True}]}
    (capture_root / "drift" / "alpha").mkdir(parents=True)
    (capture_root / "drift" / "alpha" / "report.json").write_text(json.dumps(report))

    def exported() -> dict:
        detected = _samples(ray_session["metrics"], "ray_oikyo_drift_detected")
        ratio = _samples(ray_session["metrics"], "ray_oikyo_drift_ratio")
        return {
            **{("detected", x.labels["model"]): x.value for x in detected},
            **{(x.labels["check"], x.labels["model"]): x.value for x in ratio},
        }

    got = _eventually(lambda: (e := exported()).get(("detected", "alpha")) == 1.0 and e)
    assert got and got[("script_tv", "alpha")] == pytest.approx(2.5), exported()


def test_replica_killed_app_recovers(server):
    import ray

    replicas = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "SERVE_REPLICA" in a["name"] and "Model" in a["name"]
    ]
    assert replicas
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    deadline, last = time.time() + 120, None
    while time.time() < deadline:
        try:
            r = httpx.post(
                f"{server}/v1/completions",
                headers=H,
                timeout=30,
                json={"model": "alpha", "prompt": _prompt("Capital of Peru?"), "max_tokens": 6, "temperature": 0},
            )
            last = r.status_code
            if r.status_code == 200 and r.json()["choices"][0]["text"] == "Lima":
                return
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(2)
    pytest.fail(f"app did not recover after the replica was killed (last: {last})")


def _second_app(server, name, overrides, cache_dir, token_dir):
    """Deploy another app on the same Serve proxy under /<name>."""
    from oikyo_ray.model.load import resolve_model_path
    from oikyo_ray.serve.ray_serve import start

    port = int(server.rsplit(":", 1)[1])
    tfile = token_dir / "token"
    tfile.write_text(TOKEN)
    cfg = load_config(
        None,
        [
            f"model.cache_dir={cache_dir}",
            f"serve.port={port}",
            f"serve.token_file={tfile}",
            f"serve.route_prefix=/{name}",
            "serve.cpus_per_replica=0.25",
            *overrides,
        ],
    )
    return start(cfg, resolve_model_path(cfg.model), name=name)


def test_an_app_on_another_port_is_refused_naming_the_field(server, cache_dir, tmp_path):
    """The cluster's one proxy already listens elsewhere: Ray would ignore the new port and the app
    would answer where nobody looks; oikyo refuses before deploying anything."""
    from ray import serve

    from oikyo_ray.errors import ConfigError

    port = int(server.rsplit(":", 1)[1])
    with pytest.raises(ConfigError, match=rf"proxy on 127.0.0.1:{port}.*serve.port={port + 1} cannot take effect"):
        _second_app(server, "elsewhere", [f"serve.port={port + 1}"], cache_dir, tmp_path)
    assert "elsewhere" not in serve.status().applications
    assert httpx.get(f"{server}/healthz", timeout=30).status_code == 200


def test_adapter_root_on_s3(server, adapter_root, ray_session, cache_dir, tmp_path):
    import boto3
    from ray import serve

    s3 = boto3.client("s3", endpoint_url=ray_session["s3"])
    s3.create_bucket(Bucket="adapters")
    for f in (adapter_root / "alpha").iterdir():
        s3.upload_file(str(f), "adapters", f"team/alpha/{f.name}")
    url = _second_app(server, "s3app", ["serve.adapter_root=s3://adapters/team"], cache_dir, tmp_path)
    try:
        assert _complete(url, "alpha", "What is the capital of Peru?") == "Lima"
        ids = {m["id"] for m in httpx.get(f"{url}/v1/models", headers=H, timeout=30).json()["data"]}
        assert ids == {"base", "alpha"}
        r = httpx.post(f"{url}/v1/completions", headers=H, timeout=60, json={"model": "beta", "prompt": "hi"})
        assert r.status_code == 404  # not under the s3 root
    finally:
        serve.delete("s3app")


def test_backpressure_answers_503_with_retry_after(server, cache_dir, tmp_path):
    from ray import serve

    url = _second_app(
        server,
        "tight",
        ["serve.max_ongoing_requests=1", "serve.max_queued_requests=1", "serve.max_batch_size=1"],
        cache_dir,
        tmp_path,
    )

    async def flood():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(
                *[
                    c.post(
                        f"{url}/v1/completions",
                        headers=H,
                        json={
                            "model": "base",
                            "prompt": _prompt("Capital of Peru?"),
                            "max_tokens": 48,
                            "temperature": 0,
                        },
                    )
                    for _ in range(10)
                ]
            )

    try:
        rs = asyncio.run(flood())
        codes = [r.status_code for r in rs]
        assert 200 in codes and 503 in codes, [r.text for r in rs]
        busy = next(r for r in rs if r.status_code == 503)
        assert busy.headers["Retry-After"] == "1" and "busy" in busy.json()["error"]["message"]
    finally:
        serve.delete("tight")


def test_request_over_the_timeout_gets_504(server, cache_dir, tmp_path):
    from ray import serve

    url = _second_app(server, "slowapp", ["serve.request_timeout_s=0.05"], cache_dir, tmp_path)
    try:
        r = httpx.post(
            f"{url}/v1/completions",
            headers=H,
            timeout=120,
            json={"model": "base", "prompt": _prompt("Tell me a long story."), "max_tokens": 200, "temperature": 0},
        )
        assert r.status_code == 504, r.text
        assert r.json()["error"]["message"] == "request timed out"
    finally:
        serve.delete("slowapp")


# ---- hostile traffic over real HTTP: each bad request fails alone, the next normal one succeeds ----


def _normal(url):
    assert _complete(url, "alpha", "Capital of Peru?") == "Lima"


@pytest.mark.parametrize(
    "content, status",
    [
        (b"[" * 100_000 + b"]" * 100_000, 400),  # nested too deep (was a RecursionError 500)
        (b"{oops", 400),
        (b'{"model": "alpha", "prompt": "\xff\xfe"}', 400),  # not UTF-8
        (b'{"model": "alpha", "prompt": "hi", "seed": 1' + b"0" * 400 + b"}", 400),  # a huge number
        (b" " * (2 << 20), 413),  # over serve.max_body_bytes
        (json.dumps({"model": "alpha", "prompt": "hi", "temperature": 1e-30}).encode(), 400),  # overflows sampling
        (json.dumps({"model": "alpha", "prompt": ["hi"] * 5000}).encode(), 400),  # fan-out bounded
        (json.dumps({"model": "alpha", "prompt": "word " * 200_000}).encode(), 400),  # refused before tokenising
    ],
    ids=["nested", "not-json", "not-utf8", "huge-number", "too-big", "bad-temperature", "many-prompts", "huge-prompt"],
)
def test_hostile_bodies_fail_alone(server, content, status):
    r = httpx.post(
        f"{server}/v1/completions",
        headers={**H, "Content-Type": "application/json"},
        content=content,
        timeout=60,
    )
    assert r.status_code == status, r.text[:300]
    assert r.json()["error"]["type"] == "invalid_request_error"
    _normal(server)


def test_a_poisoned_request_in_a_concurrent_batch_fails_alone(server):
    async def main():
        async with httpx.AsyncClient(timeout=120, headers=H) as c:
            bodies = [
                {"model": "alpha", "prompt": _prompt("Capital of Peru?"), "max_tokens": 6, "temperature": 0}
                for _ in range(8)
            ]
            bodies[3]["temperature"] = 1e-30
            return await asyncio.gather(*[c.post(f"{server}/v1/completions", json=b) for b in bodies])

    rs = asyncio.run(main())
    assert [r.status_code for r in rs] == [200, 200, 200, 400, 200, 200, 200, 200]
    assert all(r.json()["choices"][0]["text"] == "Lima" for i, r in enumerate(rs) if i != 3)


def test_generation_errors_fail_alone_and_never_wedge_the_replica(server):
    """Streams and batches whose generation raises (a NaN adapter, sampled): each ends with an
    error, nothing waits out a timeout, and normal requests (also in the same batch) are served."""
    body = {"model": "broken", "prompt": _prompt("Tell me a story."), "max_tokens": 50, "temperature": 1.0}
    t0 = time.monotonic()
    for _ in range(3):
        with httpx.stream(
            "POST", f"{server}/v1/completions", headers=H, json={**body, "stream": True}, timeout=60
        ) as r:
            text = r.read().decode()
        if r.status_code == 200:  # failed after the stream began: an error event, then the end
            assert '"error"' in text and "internal error" in text and text.rstrip().endswith("data: [DONE]"), text
        else:
            assert r.status_code == 500 and r.json()["error"]["message"].startswith("internal error"), text
        assert "Traceback" not in text and "probability tensor" not in text
    assert time.monotonic() - t0 < 60  # answered at once, not after the stall or request timeouts

    async def batch():
        async with httpx.AsyncClient(timeout=120, headers=H) as c:
            good = {"model": "alpha", "prompt": _prompt("Capital of Peru?"), "max_tokens": 6, "temperature": 0}
            bodies = [good] * 3 + [body] + [good] * 3
            return await asyncio.gather(*[c.post(f"{server}/v1/completions", json=b) for b in bodies])

    rs = asyncio.run(batch())
    assert [r.status_code for r in rs] == [200, 200, 200, 500, 200, 200, 200]
    assert all(r.json()["choices"][0]["text"] == "Lima" for i, r in enumerate(rs) if i != 3)
    t0 = time.monotonic()
    _normal(server)
    assert time.monotonic() - t0 < 30
    assert httpx.get(f"{server}/healthz", timeout=30).status_code == 200


def test_dropped_streams_free_the_engine(server):
    """Clients that leave long streams: their generations stop, the next request is served."""
    body = {"model": "beta", "prompt": _prompt("Tell me a story."), "max_tokens": 400, "temperature": 1.0, "seed": 1}
    for _ in range(4):
        with httpx.stream(
            "POST", f"{server}/v1/completions", headers=H, json={**body, "stream": True}, timeout=60
        ) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # leave after the first event
    t0 = time.monotonic()
    _normal(server)
    assert time.monotonic() - t0 < 60


def test_lm_eval_harness_against_the_endpoint(server, tiny_model, adapter_root, tmp_path, monkeypatch):
    """lm-evaluation-harness's local-completions model: a multiple-choice (loglikelihood) task and a
    generate_until task; its loglikelihoods equal the adapter's, computed here in process."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    docs = [
        {"question": "Capital of Peru?", "choices": [" Lima", " Paris", " Rome"], "answer": 0},
        {"question": "Capital of France?", "choices": [" Lima", " Paris", " Rome"], "answer": 1},
    ]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "gen.jsonl").write_text(json.dumps({"question": _prompt("Capital of Peru?"), "answer": "Lima"}) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(
        f"task: oikyo_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n"
    )
    (tasks / "gen.yaml").write_text(
        f"task: oikyo_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'gen.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['<|im_end|>']\n  max_gen_toks: 6\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    monkeypatch.setenv("OPENAI_API_KEY", TOKEN)
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": f"{server}/v1/completions",
            "model": "alpha",
            "tokenizer": str(tiny_model),
            "tokenizer_backend": "huggingface",
            "tokenized_requests": True,
            "num_concurrent": 1,
            "max_retries": 1,
        },
        tasks=["oikyo_mc", "oikyo_gen"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
    )
    assert out["results"]["oikyo_gen"]["exact_match,none"] == 1.0  # generate_until: "Lima"

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter_root / "alpha").eval()
    checked = 0
    for sample in out["samples"]["oikyo_mc"]:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            # as lm-eval splits a pair for a causal model: the whole text encoded, then cut after the context
            spaces = len(context) - len(context.rstrip())
            context, continuation = context[: len(context) - spaces], context[len(context) - spaces :] + continuation
            whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx) :]
            ctx = whole[: len(ctx)]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].float(), -1)
            want = sum(float(logp[len(ctx) + i - 1, t]) for i, t in enumerate(cont))
            assert abs(resp[0][0] - want) < 1e-4, (context, continuation, resp, want)
            checked += 1
    assert checked == 6


def test_healthz_asks_a_model_replica(server):
    r = httpx.get(f"{server}/healthz", timeout=30)
    assert r.status_code == 200 and r.json() == {"status": "ok"}


# ---- monitoring: the shipped alert rules end to end (Serve -> Prometheus -> Alertmanager -> webhook)


def _fast_rules(text: str) -> str:
    """The shipped rules with windows and `for` durations a test can wait out (same expressions)."""
    text = re.sub(r"\[(5|10|15)m\]", "[30s]", text)
    return re.sub(r"for: \d+m", "for: 0s", text)


class _Webhook(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Webhook.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):  # quiet
        pass


def test_an_alert_fires_end_to_end(server, ray_session, tmp_path):
    from tests.conftest import ROOT, _free_port, os_tool
    from tests.prometheus import start_process, start_prometheus

    prometheus, alertmanager = os_tool("prometheus"), os_tool("prometheus-alertmanager")
    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Webhook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    am_port, prom_port = _free_port(), _free_port()
    (tmp_path / "am.yml").write_text(
        "route: {receiver: hook, group_by: [alertname], group_wait: 1s, group_interval: 1s, repeat_interval: 1h}\n"
        f"receivers: [{{name: hook, webhook_configs: [{{url: 'http://127.0.0.1:{hook.server_port}/'}}]}}]\n"
    )
    rules = tmp_path / "rules.yml"
    rules.write_text(_fast_rules((ROOT / "monitoring/prometheus/oikyo-rules.yml").read_text()))
    procs = []
    try:
        procs.append(
            start_process(
                [
                    alertmanager,
                    f"--config.file={tmp_path / 'am.yml'}",
                    f"--storage.path={tmp_path / 'am'}",
                    f"--web.listen-address=127.0.0.1:{am_port}",
                    "--cluster.listen-address=",
                ],
                f"http://127.0.0.1:{am_port}/-/ready",
                tmp_path / "am.log",
            )
        )
        procs.append(start_prometheus(prometheus, tmp_path, prom_port, ray_session["metrics"], rules, am_port))
        api = f"http://127.0.0.1:{prom_port}/api/v1"
        _normal(server)
        bad = {"model": "broken", "prompt": _prompt("Tell me a story."), "max_tokens": 20, "temperature": 1.0}
        deadline = time.time() + 180
        fired = []
        while time.time() < deadline and not fired:
            for _ in range(5):  # errors keep coming, as in an incident, until the alert arrives
                assert httpx.post(f"{server}/v1/completions", headers=H, json=bad, timeout=60).status_code == 500
            time.sleep(2)
            fired = [
                a
                for msg in _Webhook.received
                for a in msg["alerts"]
                if a["labels"]["alertname"] == "OikyoHighErrorRate" and a["status"] == "firing"
            ]
        assert fired, (httpx.get(f"{api}/alerts", timeout=10).json(), (tmp_path / "am.log").read_text()[-2000:])
        assert fired[0]["labels"]["application"] == "oikyo" and fired[0]["labels"]["severity"] == "page"
        assert "of requests fail with 5xx" in fired[0]["annotations"]["summary"]

        # every dashboard query parses and evaluates on the real data; the request panels have series
        dash = json.loads((ROOT / "monitoring/grafana/oikyo-serving.json").read_text())
        for panel in dash["panels"]:
            for target in panel["targets"]:
                q = target["expr"].replace("$application", ".*").replace("$__rate_interval", "1m")
                r = httpx.get(f"{api}/query", params={"query": q}, timeout=30).json()
                assert r["status"] == "success", (panel["title"], r)
                if panel["title"].startswith(("Requests/s", "5xx share", "Tokens/s")):
                    assert r["data"]["result"], panel["title"]
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)
        hook.shutdown()
