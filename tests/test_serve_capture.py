"""Capture and feedback without Ray: redaction on realistic strings, the bounded parquet writer
(partitions, caps, drops counted, failing storage and redactors, retention), feedback bodies, the
per-user cap, and the app's capture and POST /v1/feedback over a fake backend."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient

from oikyo_ray.config import load_config
from oikyo_ray.errors import ConfigError
from oikyo_ray.model.load import load_tokenizer
from oikyo_ray.serve.app import Service, create_app
from oikyo_ray.serve.capture import ParquetWriter, partition, read_rows, sampled, user_key
from oikyo_ray.serve.feedback import Answered, FeedbackRequest, Recent, UserCap
from oikyo_ray.serve.redact import load_redactor, redact
from oikyo_ray.serve.traffic import Traffic
from tests.test_serve_api import TOKEN, FakeBackend, FakeMetrics, H


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(load_config(None).model, str(tiny_model))


# ------------------------------------------------------------------------------------- redaction
@pytest.mark.parametrize(
    "text, gone, placeholder",
    [
        ("Hi, I'm Ana (ana.perez+shop@mail.example.co.uk), order #4471", "ana.perez", "[EMAIL]"),
        ("Call me on +44 20 7946 0958 after 6pm", "7946", "[PHONE]"),
        ("my number is (415) 555-0132, thanks", "555-0132", "[PHONE]"),
        ("Ruf mich an: 0171 2345678.", "2345678", "[PHONE]"),
        ("card 4111-1111-1111-1111 exp 09/27", "4111", "[CARD]"),
        ("use key sk-proj-Ab3dEf9hIjKlMnOpQrStUvWx please", "sk-proj", "[SECRET]"),
        ("export HF_TOKEN=hf_AbCdEfGhIjKlMnOpQrStUvWxYz123456", "hf_AbCd", "[SECRET]"),
        ("aws_access_key_id = AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE", "[SECRET]"),
        ("curl -H 'Authorization: Bearer 9f8e7d6c5b4a39281706abcd'", "9f8e7d6c", "[SECRET]"),
        ("my password is hunter2hunter2", "hunter2hunter2", "[SECRET]"),
        ("token: ghp_1234567890abcdefghijABCDEFGHIJ123456", "ghp_1234", "[SECRET]"),
        (
            "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
            "eyJ",
            "[SECRET]",
        ),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY-----", "MIIEp", "[SECRET]"),
    ],
)
def test_realistic_personal_data_and_secrets_are_redacted(text, gone, placeholder):
    out = redact(text)
    assert gone not in out and placeholder in out, out


@pytest.mark.parametrize(
    "text",
    [
        "In 2024 we had 1500 users; pi is 3.14159 and Ray is 2.60.0",
        "The meeting is on 2026-12-03 at 14:30, room 101",
        "ISBN 978-3-16-148410-0 and the order number 123456789012",
        "Server 192.168.1.1 answered in 250 ms",
        "The token budget is 4096 and the password field is required",
    ],
)
def test_ordinary_text_is_left_alone(text):
    assert redact(text) == text


def test_a_user_redactor_runs_after_the_built_in_one(monkeypatch):
    import types

    mod = types.ModuleType("my_redactor")
    mod.names = lambda s: s.replace("Ana", "[NAME]")
    monkeypatch.setitem(__import__("sys").modules, "my_redactor", mod)
    f = load_redactor("my_redactor:names")
    assert f("Ana: ana@example.org") == "[NAME]: [EMAIL]"
    with pytest.raises(ConfigError, match="redact_function"):
        load_config(None, ["serve.capture.redact=false", "serve.capture.redact_function=my_redactor:names"])
    with pytest.raises(ConfigError, match="serve.capture.sample_rate"):
        load_config(None, ["serve.capture.sample_rate=1.5"])
    with pytest.raises(ConfigError, match="serve.capture.fields"):
        load_config(None, ["serve.capture.fields=[prompt, password]"])


# ---------------------------------------------------------------------------------------- writer
def _row(i: int, model: str = "bot-v2", **kw) -> dict:
    return {"id": f"cmpl-{i}", "created": time.time(), "model": model, "prompt": f"q{i}", "completion": "a", **kw}


class Counts(dict):
    def __call__(self, outcome: str, n: int) -> None:
        self[outcome] = self.get(outcome, 0) + n


def test_rows_land_as_partitioned_parquet_redacted_and_capped(tmp_path):
    counts = Counts()
    w = ParquetWriter(str(tmp_path / "c"), redact, max_chars=100, flush_rows=3, flush_s=60, counts=counts)
    for i in range(5):
        assert w.offer(_row(i, prompt=f"mail ana{i}@example.org " + "x" * 200, params={"temperature": 0}))
    assert w.offer(_row(9, model="base"))
    w.close()
    rows = sorted(read_rows(str(tmp_path / "c")), key=lambda r: r["id"])
    assert counts == {"written": 6} and len(rows) == 6
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    by_id = {r["id"]: r for r in rows}
    assert {(r["model"], str(r["version"])) for r in rows} == {("bot", "2"), ("base", "-")}
    assert all(str(r["date"]) == day for r in rows)
    first = by_id["cmpl-0"]
    assert first["prompt"].startswith("mail [EMAIL] ") and "more characters dropped" in first["prompt"]
    assert first["params"] == '{"temperature": 0}'  # nested values as JSON text
    assert len(list((tmp_path / "c").rglob("*.parquet"))) >= 2  # 3 rows a part, one partition per model


def test_the_writer_flushes_on_time(tmp_path):
    w = ParquetWriter(str(tmp_path / "c"), None, flush_rows=1000, flush_s=0.2)
    w.offer(_row(1))
    deadline = time.time() + 10
    while time.time() < deadline and not list((tmp_path / "c").rglob("*.parquet")):
        time.sleep(0.05)
    assert [r["id"] for r in read_rows(str(tmp_path / "c"))] == ["cmpl-1"]
    w.close()


def test_a_full_queue_drops_and_counts_without_waiting(tmp_path):
    release, counts = threading.Event(), Counts()

    def slow(text: str) -> str:  # the writer thread is busy: the queue fills up
        release.wait(30)
        return text

    w = ParquetWriter(str(tmp_path / "c"), slow, queue_rows=2, flush_rows=1, flush_s=60, counts=counts)
    results = []
    t0 = time.perf_counter()
    for i in range(10):
        results.append(w.offer(_row(i)))
        time.sleep(0.01)
    assert time.perf_counter() - t0 < 2  # offering never blocks
    release.set()
    w.close()
    assert results.count(False) >= 6 and counts["dropped_full"] == results.count(False)
    assert counts["written"] == results.count(True) == len(read_rows(str(tmp_path / "c")))


def test_failing_storage_and_redactor_lose_their_rows_only(tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    counts = Counts()
    w = ParquetWriter(str(blocked / "c"), None, flush_rows=2, counts=counts)
    w.offer(_row(1))
    w.offer(_row(2))
    w.close()
    assert counts == {"dropped_error": 2}

    def picky(text: str) -> str:
        if "bad" in text:
            raise ValueError("cannot redact")
        return text

    counts = Counts()
    w = ParquetWriter(str(tmp_path / "ok"), picky, flush_rows=3, counts=counts)
    for row in (_row(1), _row(2, prompt="bad"), _row(3)):
        w.offer(row)
    w.close()
    assert counts == {"dropped_redaction": 1, "written": 2}
    assert sorted(r["id"] for r in read_rows(str(tmp_path / "ok"))) == ["cmpl-1", "cmpl-3"]


def test_retention_deletes_old_date_partitions(tmp_path):
    root = tmp_path / "c"
    old = (datetime.now(UTC) - timedelta(days=10)).strftime("%Y-%m-%d")
    (root / f"date={old}" / "model=bot" / "version=1").mkdir(parents=True)
    w = ParquetWriter(str(root), None, flush_rows=1, retention_days=7)
    w.offer(_row(1))
    w.close()
    assert not (root / f"date={old}").exists() and len(read_rows(str(root))) == 1


def test_capture_on_s3(s3_server, tmp_path):
    import uuid

    import boto3

    bucket = f"cap-{uuid.uuid4().hex[:10]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    w = ParquetWriter(f"s3://{bucket}/capture/completions", redact, flush_rows=2)
    w.offer(_row(1, prompt="ana@example.org"))
    w.offer(_row(2))
    w.close()
    rows = sorted(read_rows(f"s3://{bucket}/capture/completions"), key=lambda r: r["id"])
    assert [r["prompt"] for r in rows] == ["[EMAIL]", "q2"]


def test_sampling_is_by_id_and_near_the_rate():
    ids = [f"cmpl-{i:06d}" for i in range(4000)]
    kept = [i for i in ids if sampled(i, 0.25)]
    assert 0.22 < len(kept) / len(ids) < 0.28 and kept == [i for i in ids if sampled(i, 0.25)]
    assert all(sampled(i, 1.0) for i in ids[:10]) and not any(sampled(i, 0.0) for i in ids[:100])
    assert user_key("u1") == user_key("u1") != user_key("u2") and "u1" not in user_key("u1")
    assert user_key(None) is None and partition("bot-v12") == ("bot", "12") and partition("alpha") == ("alpha", "-")


# -------------------------------------------------------------------------------------- feedback
@pytest.mark.parametrize(
    "body, words",
    [
        ({"id": "cmpl-abc"}, "give thumbs, score, correction or preferred_over"),
        ({"id": "cmpl-abc", "thumbs": "up", "score": 5}, "not both"),
        ({"id": "cmpl-abc", "score": 6}, "score"),
        ({"id": "cmpl-abc", "thumbs": "sideways"}, "thumbs"),
        ({"id": "../../etc", "thumbs": "up"}, "id"),
        ({"id": "cmpl-abc", "preferred_over": "cmpl-abc"}, "itself"),
        ({"id": "cmpl-abc", "thumbs": "up", "rating": 5}, "rating"),
    ],
)
def test_bad_feedback_bodies_name_the_field(body, words):
    with pytest.raises(ValueError, match=words):
        FeedbackRequest.model_validate(body)


def test_verdicts_and_scores():
    v = lambda **kw: FeedbackRequest(id="cmpl-a", **kw)  # noqa: E731
    assert (v(thumbs="up").verdict(), v(thumbs="down").verdict()) == ("positive", "negative")
    assert [v(score=s).verdict() for s in range(1, 6)] == ["negative"] * 2 + ["neutral"] + ["positive"] * 2
    assert v(correction="Lima").verdict() == "negative" and v(correction="Lima").kind() == "correction"
    assert v(preferred_over="cmpl-b").kind() == "preference" and v(score=3).normalized() == 0.5


def test_user_cap_is_a_sliding_hour_and_recent_forgets_the_oldest():
    cap = UserCap(2)
    assert [cap.allow("u", t) for t in (0, 1, 2)] == [True, True, False]
    # an hour after the first two, both slots are free again; a refused post takes none
    assert cap.allow("other", 2) and cap.allow("u", 3601) and cap.allow("u", 3601.5) and not cap.allow("u", 3602)
    recent = Recent(2)
    for i in range(3):
        recent.add(f"cmpl-{i}", Answered("bot-v1", "bot", "champion", 0))
    assert recent.get("cmpl-0") is None and recent.get("cmpl-2").role == "champion"


# ----------------------------------------------------------------------------- the app, no Ray
class TrafficMetrics(FakeMetrics):
    def __init__(self):
        super().__init__()
        self.feedbacks: list[tuple[str, str, str, str]] = []

    def feedback(self, answered, kind, verdict):
        self.feedbacks.append((answered.model, answered.role, kind, verdict))


@pytest.fixture
def traffic_api(tokenizer, tmp_path):
    overrides = [
        "serve.capture.enabled=true",
        "serve.capture.fields=[prompt, completion, params, user]",
        "serve.feedback.enabled=true",
        "serve.feedback.max_per_user_per_hour=3",
        "serve.routes={bot: {alpha: 1}}",
    ]
    cfg = load_config(None, overrides).serve
    counts: list = []
    traffic = Traffic(cfg, str(tmp_path / "capture"), lambda *a: counts.append(a))
    svc = Service(cfg, tokenizer, TOKEN, FakeBackend(), TrafficMetrics(), traffic=traffic)
    with TestClient(create_app(svc), raise_server_exceptions=False) as client:
        yield client, svc, tmp_path / "capture"


def test_answers_are_captured_and_rated(traffic_api):
    client, svc, root = traffic_api
    chat = {"model": "bot", "user": "u-1", "messages": [{"role": "user", "content": "I'm ana@example.org. Peru?"}]}
    a = client.post("/v1/chat/completions", headers=H, json=chat).json()
    b = client.post("/v1/completions", headers=H, json={"model": "base", "prompt": "call +1 415 555 0132"}).json()
    with client.stream(
        "POST", "/v1/completions", headers=H, json={"model": "base", "prompt": "s", "stream": True}
    ) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: {")]
    streamed = json.loads(events[0][6:])["id"]

    ok = client.post("/v1/feedback", headers=H, json={"id": a["id"], "thumbs": "down", "correction": "Lima, ana@x.org"})
    assert ok.status_code == 202 and ok.json() == {
        "object": "feedback",
        "id": a["id"],
        "model": "alpha",
        "accepted": True,
    }
    assert client.post("/v1/feedback", headers=H, json={"id": b["id"], "preferred_over": streamed}).status_code == 202
    assert svc.metrics.feedbacks == [("alpha", "-", "rating", "negative"), ("base", "-", "preference", "positive")]

    unknown = client.post("/v1/feedback", headers=H, json={"id": "chatcmpl-doesnotexist", "score": 4})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "id"
    bad = client.post("/v1/feedback", headers=H, json={"id": a["id"], "score": 9})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "score"
    assert client.post("/v1/feedback", json={"id": a["id"], "score": 4}).status_code == 401
    # one user's cap (the two posts above had no user: the anonymous bucket)
    posts = [
        client.post("/v1/feedback", headers={**H, "X-Oikyo-User": "flood"}, json={"id": a["id"], "score": 5})
        for _ in range(4)
    ]
    assert [p.status_code for p in posts] == [202, 202, 202, 429] and posts[-1].headers["Retry-After"]

    svc.traffic.close()
    rows = {r["id"]: r for r in read_rows(str(root / "completions"))}
    assert set(rows) == {a["id"], b["id"], streamed}
    chat_row = rows[a["id"]]
    assert chat_row["endpoint"] == "chat" and "[EMAIL]" in chat_row["prompt"] and "ana@" not in chat_row["prompt"]
    assert chat_row["completion"] == "Lima" and chat_row["route"] == "bot" and chat_row["model"] == "alpha"
    assert chat_row["user"] == user_key("u-1") and chat_row["prompt_tokens"] > 0
    assert rows[b["id"]]["prompt"] == "call [PHONE]" and rows[streamed]["completion"] == "Lima"
    feedback = read_rows(str(root / "feedback"))
    assert len(feedback) == 5 and {f["verdict"] for f in feedback} == {"negative", "positive"}
    corrected = [f for f in feedback if f["correction"]][0]
    assert corrected["correction"] == "Lima, [EMAIL]" and corrected["model"] == "alpha"


def test_capture_failures_never_fail_an_answer(traffic_api):
    client, svc, _ = traffic_api

    def broken(*a, **kw):
        raise RuntimeError("capture is down")

    svc.traffic.answered = broken
    r = client.post("/v1/completions", headers=H, json={"model": "base", "prompt": "hi"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "Lima"


def test_feedback_is_404_when_not_enabled(tokenizer):
    svc = Service(load_config(None).serve, tokenizer, TOKEN, FakeBackend(), FakeMetrics())
    with TestClient(create_app(svc)) as client:
        r = client.post("/v1/feedback", headers=H, json={"id": "cmpl-abc", "thumbs": "up"})
    assert r.status_code == 404 and "serve.feedback.enabled" in r.json()["error"]["message"]
