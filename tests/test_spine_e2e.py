"""The spine end to end on a real local Ray cluster: demo config -> run dir -> Serve over HTTP."""

import json
import socket
from pathlib import Path

import httpx
import pytest

from oikyo_ray.cli import main
from oikyo_ray.config import load_config
from oikyo_ray.demo.run import DEMO_CONFIG
from tests.conftest import WANDB_SECRET, python_tool
from tests.test_tracking import wandb_logged

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_run(ray_session, cache_dir, tmp_path_factory, mlflow_server):
    """The demo pipeline (curate, train with 2 DDP workers, evaluate), once for this module;
    tracked in the session's MLflow server and in W&B offline (no network, a fake key)."""
    from oikyo_ray.finetune import run_finetune

    python_tool("wandb", "test")
    root = tmp_path_factory.mktemp("runs")
    tracking = [f"tracking.mlflow_uri={mlflow_server}", "tracking.mlflow_experiment=spine", "tracking.wandb=offline"]
    cfg = load_config(
        DEMO_CONFIG,
        [f"model.cache_dir={cache_dir}", f"run.root={root}", "run.name=demo", "run.serve_after=false", *tracking],
    )
    logs: list[str] = []
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_port()}")  # nothing listens: a send would fail
        env.setenv("WANDB_API_KEY", WANDB_SECRET)
        run_dir = run_finetune(cfg, log=logs.append)
    return cfg, run_dir, logs


def test_run_directory_contents(demo_run):
    cfg, run, logs = demo_run
    for f in [
        "config.yaml",
        "lineage.json",
        "metrics.jsonl",
        "data/manifest.json",
        "data/rejects.jsonl",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/tokenizer.json",
        "eval/report.json",
        "eval/report.md",
    ]:
        assert (run / f).is_file(), f
    assert not list(run.rglob("*.bin")) and not list(run.rglob("*.pt"))  # safetensors only
    assert load_config(run / "config.yaml") == cfg  # the resolved config round-trips
    lineage = json.loads((run / "lineage.json").read_text())
    manifest = json.loads((run / "data/manifest.json").read_text())
    assert lineage["data_content_hash"] == manifest["content_hash"] and len(manifest["content_hash"]) == 64
    assert lineage["seed"] == 42 and lineage["versions"]["ray"] and lineage["versions"]["torch"]
    assert lineage["licenses"]["model"]["license"] == "apache-2.0"  # the demo ships under oikyo's licence
    assert all(v["license"] for v in lineage["licenses"]["data"].values())
    cost = lineage["cost"]  # the workers' CPU-hours over the training time, at cost.cpu_hour
    assert cost["train_seconds"] > 0 and cost["cpu_hours"] > 0 and cost["gpu_hours"] == 0
    assert cost["cost"] == pytest.approx(cost["cpu_hours"] * cfg.cost.cpu_hour) and cost["currency"] == "USD"
    c = manifest["counts"]
    assert c["read"] == 384 and c["accepted"] + c["rejected"] == c["read"]
    assert c["train"] + c["val"] + c["test"] == c["accepted"] and c["test"] > 10
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == max(m["step"] for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"] and any("val_loss" in m for m in metrics)
    ckpts = sorted(p for p in (run / "checkpoints").glob("checkpoint_*") if p.is_dir())
    assert 1 <= len(ckpts) <= 2 and (ckpts[-1] / "adapter_model.safetensors").is_file()  # adapter-only


def test_fine_tuned_beats_base(demo_run):
    _, run, logs = demo_run
    rep = json.loads((run / "eval/report.json").read_text())
    assert rep["tuned"]["loss"] < rep["base"]["loss"] - 2.0
    assert rep["tuned"]["exact_match"] >= rep["base"]["exact_match"] + 0.4, rep["tuned"]
    md = (run / "eval/report.md").read_text()
    assert "| exact_match |" in md and "fine-tuned" in md
    assert any("| exact_match |" in line for line in logs)  # the table is printed
    # the demo config's lm-eval task, in the pipeline's eval step: base at chance, tuned well above
    acc = rep["lm_eval"]["tasks"]["oikyo_demo_mc"]["metrics"]["acc"]
    assert acc["base"] <= 0.5 and acc["tuned"] >= acc["base"] + 0.3, acc
    assert "| lm-eval oikyo_demo_mc: acc (n=40) |" in md and "lm_eval:oikyo_demo_mc/acc_drop" in [
        g["name"] for g in rep["gates"] if g["passed"]
    ]


def test_run_is_tracked_in_mlflow_and_wandb(demo_run, mlflow_server):
    """Params, every logged step's losses, the eval numbers and files, the adapter as a registered
    model version (aliases following oikyo's registry) in MLflow; the same numbers in W&B offline."""
    from mlflow import MlflowClient

    from oikyo_ray.registry import registry

    cfg, run, logs = demo_run
    assert not [line for line in logs if "warning" in line]
    state = json.loads((run / "tracking.json").read_text())
    c, run_id = MlflowClient(mlflow_server), state["mlflow"]["run_id"]
    logged = c.get_run(run_id)
    assert logged.info.status == "FINISHED" and logged.info.run_name == "demo"
    params = logged.data.params
    assert params["train.lr"] == json.dumps(cfg.train.lr) and params["method.lora.r"] == str(cfg.method.lora.r)
    assert params["data.paths"] == json.dumps(cfg.data.paths) and not any(k.startswith("tracking.") for k in params)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "val_loss"):  # one point per logged step
        got = sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [m.step for m in got] == [r["step"] for r in rows if key in r], key
        assert [m.value for m in got] == pytest.approx([r[key] for r in rows if key in r]), key
    report = json.loads((run / "eval/report.json").read_text())
    assert logged.data.metrics["eval/tuned/exact_match"] == report["tuned"]["exact_match"]
    files = {a.path for d in ("", "eval", "adapter") for a in c.list_artifacts(run_id, d or None)}
    assert {"loss.png", "eval/report.json", "eval/report.md", "eval/metrics.png"} <= files
    assert "adapter/adapter_model.safetensors" in files
    v = c.get_model_version("spine", state["mlflow"]["model"]["version"])
    assert v.run_id == run_id and v.tags == {"oikyo.run": "demo", "oikyo.config_hash": cfg.config_hash()}
    # oikyo's registry on this run: the same version and alias in MLflow, under the registry's name
    registry.register(cfg.run.root, "spine-bot", str(run))
    registry.set_alias(cfg.run.root, "spine-bot", "champion", 1)
    assert c.get_model_version_by_alias("spine-bot", "champion").run_id == run_id

    config, history, summary = wandb_logged(run)
    assert config["train.lr"] == cfg.train.lr and config["run.name"] == "demo"
    assert [s for s, _ in history["loss"]] == [r["step"] for r in rows if "loss" in r]
    assert [v for _, v in history["loss"]] == pytest.approx([r["loss"] for r in rows if "loss" in r])
    assert summary["eval/tuned/exact_match"] == report["tuned"]["exact_match"]
    assert not [p for p in run.rglob("*") if p.is_file() and WANDB_SECRET.encode() in p.read_bytes()]


@pytest.fixture(scope="module")
def server(demo_run, cache_dir):
    """The OpenAI-compatible app with base + the demo adapter, on a real Serve HTTP proxy."""
    from ray import serve

    from oikyo_ray.model.load import resolve_model_path
    from oikyo_ray.serve.ray_serve import start

    cfg, run, _ = demo_run
    token = "test-token-" + "x" * 20
    tfile = run.parent / "token"
    tfile.write_text(token)
    scfg = load_config(
        None,
        [
            f"model.cache_dir={cache_dir}",
            f"serve.port={_port()}",
            f"serve.token_file={tfile}",
            f"serve.adapters.demo={run / 'adapter'}",
        ],
    )
    url = start(scfg, resolve_model_path(scfg.model))
    yield url, token
    serve.shutdown()


def test_http_chat_and_completions(server, demo_run):
    url, token = server
    h = {"Authorization": f"Bearer {token}"}
    r = httpx.post(
        f"{url}/v1/chat/completions",
        headers=h,
        timeout=60,
        json={
            "model": "demo",
            "messages": [{"role": "user", "content": "What is the capital of Peru?"}],
            "max_tokens": 8,
            "temperature": 0,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "Lima" and body["usage"]["completion_tokens"] > 0
    r = httpx.post(
        f"{url}/v1/completions",
        headers=h,
        timeout=60,
        json={
            "model": "base",
            "prompt": "<|im_start|>user\nOpposite of hot?<|im_end|>\n<|im_start|>assistant\n",
            "max_tokens": 4,
            "temperature": 0,
        },
    )
    assert r.status_code == 200 and r.json()["choices"][0]["text"] != "cold"  # the bare base never learned it
    models = httpx.get(f"{url}/v1/models", headers=h, timeout=30).json()
    assert {m["id"] for m in models["data"]} == {"base", "demo"}


def test_openai_client_works_unchanged(server):
    from openai import OpenAI

    url, token = server
    client = OpenAI(base_url=f"{url}/v1", api_key=token)
    out = client.chat.completions.create(
        model="demo", max_tokens=8, temperature=0, messages=[{"role": "user", "content": "Opposite of hot?"}]
    )
    assert out.choices[0].message.content == "cold"


@pytest.mark.parametrize(
    "headers, body, status",
    [
        ({}, {"model": "demo", "prompt": "hi"}, 401),
        ({"Authorization": "Bearer wrong"}, {"model": "demo", "prompt": "hi"}, 401),
        (None, {"model": "nope", "prompt": "hi"}, 404),
        (None, {"model": "demo"}, 400),
        (None, {"model": "demo", "prompt": "hi", "max_tokens": 100000}, 400),
        (None, {"model": "demo", "prompt": "word " * 5000}, 400),
        (None, "{not json", 400),
    ],
)
def test_http_rejects_bad_requests(server, headers, body, status):
    url, token = server
    h = {"Authorization": f"Bearer {token}"} if headers is None else headers
    kw = (
        {"content": body, "headers": {**h, "Content-Type": "application/json"}}
        if isinstance(body, str)
        else {"json": body, "headers": h}
    )
    r = httpx.post(f"{url}/v1/completions", timeout=60, **kw)
    assert r.status_code == status, r.text
    assert "error" in r.json() and r.json()["error"]["message"]


def test_demo_serve_step_answers_over_http(demo_run):
    """What `oikyo demo` does last: serve the new adapter, ask once, shut Serve down."""
    from ray import serve

    from oikyo_ray.model.load import resolve_model_path
    from oikyo_ray.serve.ray_serve import serve_and_ask

    serve.shutdown()  # the module's server fixture may still hold the proxy on another port

    cfg, run, _ = demo_run
    cfg = cfg.model_copy(deep=True)
    cfg.serve.port = _port()
    answer = serve_and_ask(cfg, resolve_model_path(cfg.model), run / "adapter", log=lambda s: None)
    assert answer["model"] == "demo" and answer["choices"][0]["message"]["content"] == "Lima"
    assert not (Path(cfg.model.cache_dir) / "serve-token").exists()  # the ephemeral token is removed


def test_bad_input_exits_cleanly(ray_session, base_overrides, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        (["data.paths=[/nonexistent/data.jsonl]"], "data file not found: /nonexistent/data.jsonl"),
        (["data.paths=[/nonexistent/data.jsonl]"], "check data.paths"),  # says what to do
        (["model.name_or_path=/nonexistent/model"], "model directory not found"),
        ([f"data.paths=[{empty}]"], f"{empty}: empty file"),
    ]
    for extra, message in cases:
        code = main(["finetune", str(DEMO_CONFIG), *base_overrides, "run.serve_after=false", *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err


def test_runs_show_and_export(demo_run, tmp_path, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oikyo_ray.eval.generate import generate
    from oikyo_ray.model.load import resolve_model_path

    cfg, run, _ = demo_run
    assert main(["runs", "show", str(run)]) == 0
    shown = capsys.readouterr().out
    assert "lineage.json" in shown and "exact_match" in shown

    assert main(["runs", "export", str(run), "--out", str(tmp_path / "a")]) == 0
    assert main(["runs", "export", str(run), "--out", str(tmp_path / "m"), "--merge"]) == 0
    a, m = tmp_path / "a", tmp_path / "m"
    assert (a / "adapter_model.safetensors").is_file() and not (a / "model.safetensors").exists()
    assert (m / "model.safetensors").is_file() and (m / "tokenizer.json").is_file()
    card = (m / "README.md").read_text()
    assert json.loads((run / "lineage.json").read_text())["data_content_hash"] in card and "| exact_match |" in card
    assert "- base model licence: apache-2.0 (shipped with oikyo)" in card

    # plain transformers/peft load both and agree with each other
    tok = AutoTokenizer.from_pretrained(m)
    prompt = [
        tok.apply_chat_template(
            [{"role": "user", "content": "Capital of Peru?"}], tokenize=False, add_generation_prompt=True
        )
    ]
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model))
    with torch.no_grad():
        via_adapter = generate(PeftModel.from_pretrained(base, a), tok, prompt, 6)[0]["text"]
        via_merged = generate(AutoModelForCausalLM.from_pretrained(m), tok, prompt, 6)[0]["text"]
    assert via_adapter == via_merged == "Lima"

    assert main(["runs", "export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2  # not a run dir
    assert main(["runs", "export", str(run), "--out", str(a)]) == 2  # target not empty
