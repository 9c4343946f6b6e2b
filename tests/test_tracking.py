"""Experiment tracking without Ray: the tracking config (no credentials in the URI, out of the
config hash), a run logged to a real MLflow server (sqlite, started here) and continued on resume,
oikyo's registry versions and aliases mirrored there, an unreachable server that only warns, and
W&B offline writing its files with no network and no key in them. The real pipeline's tracking
rides on the spine (test_spine_e2e.py) and S3 sweep (test_runs_s3.py) runs."""

import json
import os
import socket
import struct
import time
from pathlib import Path

import pytest

from oikyo_ray.config import dump_yaml, load_config
from oikyo_ray.errors import ConfigError
from oikyo_ray.registry import registry
from oikyo_ray.tracking.tracker import Tracker
from oikyo_ray.tracking.values import flatten, read_state
from tests.conftest import WANDB_SECRET, python_tool


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def wandb_records(run_dir: Path) -> list:
    """Every record of the run's offline .wandb files (a LevelDB-style log of protobuf records:
    a 7-byte ':W&B' header, then 32 KiB blocks of chunks with 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, chunk = f.read_bytes(), 7, b""
        assert data[:4] == b":W&B", f
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
            chunk, pos = chunk + data[pos + 7 : pos + 7 + n], pos + 7 + n
            if kind in (1, 4):  # a whole record, or a record's last chunk
                out.append(pb.Record.FromString(chunk))
            if kind in (0, 1, 4):
                chunk = b""
    return out


def wandb_logged(run_dir: Path) -> tuple[dict, dict[str, list], dict]:
    """(config, metric -> [(step, value)], summary) of the run's offline W&B files."""
    config, history, summary = {}, {}, {}
    for r in wandb_records(run_dir):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            config |= {u.key: json.loads(u.value_json) for u in r.run.config.update}
        elif kind == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            for k, v in items.items():
                if not k.startswith("_"):
                    history.setdefault(k, []).append((items["_step"], v))
        elif kind == "summary":
            summary |= {(u.key or "/".join(u.nested_key)): json.loads(u.value_json) for u in r.summary.update}
    return config, history, summary


def test_credentials_in_the_mlflow_uri_are_refused():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["tracking.mlflow_uri=https://bob:hunter2@mlflow.example.com"])
    msg = str(e.value)
    assert "tracking.mlflow_uri" in msg and "MLFLOW_TRACKING_PASSWORD" in msg and "hunter2" not in msg
    with pytest.raises(ConfigError, match="tracking.wandb_api_key: unknown field"):
        load_config(None, ["tracking.wandb_api_key=x"])  # keys come from WANDB_API_KEY only


def test_a_missing_tracker_package_is_refused_before_ray(monkeypatch):
    import importlib.util

    from oikyo_ray.tracking.tracker import check_installed

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find(name, *a))
    check_installed(load_config(None, ["tracking.mlflow_uri=http://127.0.0.1:5000"]))
    with pytest.raises(ConfigError, match=r"tracking.wandb needs wandb: pip install 'oikyo-ray\[wandb\]'"):
        check_installed(load_config(None, ["tracking.wandb=online"]))


def test_tracking_is_left_out_of_the_config_hash_and_params():
    plain = load_config(None, [])
    tracked = load_config(None, ["tracking.mlflow_uri=http://127.0.0.1:5000", "tracking.wandb=offline"])
    assert plain.config_hash() == tracked.config_hash() != load_config(None, ["train.lr=0.1"]).config_hash()
    assert load_config(None, ["tracking.wandb=off"]).tracking.wandb == "off"  # YAML's bare off is false
    params = flatten(tracked)
    assert params["train.lr"] == tracked.train.lr and params["data.paths"] == tracked.data.paths
    assert not any(k.startswith("tracking.") for k in params)


def _finished_run(tmp_path: Path, cfg, name: str) -> Path:
    """What a finished run leaves that tracking and the registry read (no training)."""
    run = tmp_path / "runs" / name
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "eval").mkdir()
    (run / "eval" / "metrics.png").write_bytes(b"\x89PNG fake")
    report = {"passed": True, "gates": [], "base": {"loss": 3.0, "n": 4}, "tuned": {"loss": 1.0, "n": 4}}
    (run / "eval" / "report.json").write_text(json.dumps(report))
    (run / "lineage.json").write_text(json.dumps({"base_model": "oikyo-demo-tiny", "config_hash": cfg.config_hash()}))
    return run


def test_run_logs_to_mlflow_resumes_and_mirrors_the_registry(mlflow_server, tmp_path, capsys):
    from mlflow import MlflowClient

    cfg = load_config(
        None, [f"tracking.mlflow_uri={mlflow_server}", "tracking.mlflow_experiment=unit", "train.lr=0.003"]
    )
    run = _finished_run(tmp_path, cfg, "r1")
    logs: list[str] = []
    t = Tracker.start(cfg, run, logs.append)
    for step in (1, 2, 3):
        t.log_metrics({"step": step, "loss": 1.0 / step, "lr": 0.003, "time": time.time()})
    t.finish("FAILED")  # the first attempt dies ...
    t = Tracker.start(cfg, run, logs.append)  # ... and `--resume` continues the same MLflow run
    t.log_metrics({"step": 4, "loss": 0.2, "time": time.time()})
    t.log_model(run / "adapter")
    t.log_eval(json.loads((run / "eval" / "report.json").read_text()), run / "eval")
    t.finish()
    assert logs == [] and len(t.sinks) == 1

    c = MlflowClient(mlflow_server)
    state = read_state(run)["mlflow"]
    assert len(c.search_runs([state["experiment_id"]])) == 1  # resumed, not a second run
    logged = c.get_run(state["run_id"])
    assert logged.info.status == "FINISHED" and logged.data.params["train.lr"] == "0.003"
    assert [(m.step, m.value) for m in c.get_metric_history(state["run_id"], "loss")] == [
        (1, 1.0),
        (2, 0.5),
        (3, 1 / 3),
        (4, 0.2),
    ]
    assert logged.data.metrics["eval/tuned/loss"] == 1.0 and logged.data.metrics["eval/passed"] == 1.0
    files = {a.path for d in ("eval", "adapter") for a in c.list_artifacts(state["run_id"], d)}
    assert {"eval/report.json", "eval/metrics.png", "adapter/adapter_config.json"} <= files
    (v,) = c.search_model_versions("name='unit'")
    assert v.run_id == state["run_id"] and v.tags["oikyo.run"] == "r1"
    assert v.tags["oikyo.config_hash"] == cfg.config_hash() and state["model"]["version"] == v.version

    # oikyo's registry: versions and aliases of model support-bot mirrored onto MLflow's support-bot
    root = str(tmp_path / "runs")
    other = _finished_run(tmp_path, cfg, "r2")  # never tracked: registered, not mirrored
    registry.register(root, "support-bot", str(other))
    registry.register(root, "support-bot", str(run))
    registry.set_alias(root, "support-bot", "champion", 2)
    (mv,) = c.search_model_versions("name='support-bot'")
    assert mv.run_id == state["run_id"] and mv.tags["oikyo.registry_version"] == "2"
    assert c.get_model_version_by_alias("support-bot", "champion").version == mv.version
    registry.set_alias(root, "support-bot", "challenger", 2)
    assert c.get_registered_model("support-bot").aliases == {"champion": mv.version, "challenger": mv.version}
    registry.set_alias(root, "support-bot", "challenger", None)
    registry.set_alias(root, "support-bot", "champion", 1)  # onto the untracked version: removed in MLflow
    assert c.get_registered_model("support-bot").aliases == {}
    registry.set_alias(root, "support-bot", "champion", 2)  # and back
    assert c.get_registered_model("support-bot").aliases == {"champion": mv.version}
    assert "warning" not in capsys.readouterr().err


def test_unreachable_mlflow_server_only_warns(tmp_path):
    cfg = load_config(None, [f"tracking.mlflow_uri=http://127.0.0.1:{closed_port()}"])
    (tmp_path / "r").mkdir()
    logs: list[str] = []
    started = time.monotonic()
    t = Tracker.start(cfg, tmp_path / "r", logs.append)
    t.log_metrics({"step": 1, "loss": 1.0})
    t.finish()
    assert time.monotonic() - started < 30 and t.sinks == []
    assert len(logs) == 1 and "MLflow tracking is off for this run: no MLflow server answers" in logs[0]


def test_wandb_offline_writes_files_sends_nothing_keeps_no_key(tmp_path, monkeypatch):
    python_tool("wandb", "test")
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")  # any send would fail
    monkeypatch.setenv("WANDB_API_KEY", WANDB_SECRET)
    cfg = load_config(None, ["tracking.wandb=offline", "tracking.wandb_project=unit"])
    run = tmp_path / "r1"
    run.mkdir()
    logs: list[str] = []
    t = Tracker.start(cfg, run, logs.append)
    for step in (1, 2):
        t.log_metrics({"step": step, "loss": 1.0 / step, "time": time.time()})
    t.log_eval({"base": {"loss": 3.0}, "tuned": {"loss": 1.0}, "passed": False}, run)
    t.finish()
    assert logs == [] and t.sinks
    config, history, summary = wandb_logged(run)
    assert config["train.lr"] == cfg.train.lr and history["loss"] == [(1, 1.0), (2, 0.5)]
    assert summary["eval/tuned/loss"] == 1.0 and summary["eval/passed"] == 0.0
    assert read_state(run)["wandb"]["mode"] == "offline"
    leaked = [p for p in run.rglob("*") if p.is_file() and WANDB_SECRET.encode() in p.read_bytes()]
    assert leaked == []
    assert os.environ["WANDB_API_KEY"] == WANDB_SECRET


def test_a_failing_tracker_is_dropped_with_one_warning_the_others_go_on():
    class Broken:
        label = "Broken"

        def log_metrics(self, row):
            raise RuntimeError("server said no")

    class Kept:
        label, rows = "Kept", []

        def log_metrics(self, row):
            self.rows.append(row)

    logs: list[str] = []
    kept = Kept()
    t = Tracker([Broken(), kept], logs.append)
    t.log_metrics({"step": 1})
    t.log_metrics({"step": 2})
    assert t.sinks == [kept] and kept.rows == [{"step": 1}, {"step": 2}]
    assert logs == ["[oikyo] warning: Broken tracking stopped for this run (log_metrics: server said no)"]


def test_sweep_trials_are_nested_runs_logged_once(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    cfg = load_config(None, [f"tracking.mlflow_uri={mlflow_server}", "tracking.mlflow_experiment=unit-sweeps"])
    sweep = tmp_path / "sw"
    rows = []
    for i, status in enumerate(["completed", "early-stopped", "failed: boom"]):
        trial = sweep / "trials" / f"abcde_0000{i}"
        trial.mkdir(parents=True)
        (trial / "config.yaml").write_text(dump_yaml(load_config(None, [f"train.lr={0.001 * (i + 1)}"])))
        (trial / "metrics.jsonl").write_text(json.dumps({"step": 2, "val_loss": 1.0 + i}) + "\n")
        rows.append({"trial": trial.name, "status": status, "dir": str(trial)})
    t = Tracker.start(cfg, sweep, lambda s: pytest.fail(s), wandb=False)
    t.log_trials(cfg, rows[:2])
    t.log_trials(cfg, rows)  # a resumed sweep: the first two are not logged again
    t.finish()
    c, state = MlflowClient(mlflow_server), read_state(sweep)["mlflow"]
    children = c.search_runs([state["experiment_id"]], f"tags.mlflow.parentRunId = '{state['run_id']}'")
    assert len(children) == 3
    by_name = {r.info.run_name: r for r in children}
    assert sorted(by_name) == sorted(state["trials"]) == [r["trial"] for r in rows]
    assert by_name["abcde_00002"].info.status == "FAILED" and by_name["abcde_00000"].info.status == "FINISHED"
    assert by_name["abcde_00001"].data.params["train.lr"] == "0.002"
    assert by_name["abcde_00001"].data.metrics["val_loss"] == 2.0
