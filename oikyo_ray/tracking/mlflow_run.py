"""One oikyo run (or sweep) as an MLflow run, through MLflow's client API (Ray-free).

    run = MlflowRun.open(cfg, run_dir, saved, save)   new run, or the one `saved` names (resume)
    run.log_metrics(row); run.log_file(path); run.log_eval(report, eval_dir)
    run.log_model(adapter_dir)   artifact + version of the registered model (tags: run, config hash)
    run.log_trials(cfg, rows)    a sweep's trials as nested runs (tag mlflow.parentRunId)
    run.log_promoted(trial, best_dir)   the promoted best trial's eval and adapter on its nested run
    run.finish(status)

Metrics are sent in batches (`log_batch`), at most every FLUSH_S seconds while a run trains.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from oikyo_ray.config import OikyoConfig
from oikyo_ray.tracking.values import eval_numbers, flatten, numbers, read_state, write_state

FLUSH_S = 2.0
BATCH = 1000  # MLflow's most metrics per log_batch
PARAMS_PER_BATCH = 100
MAX_PARAM_CHARS = 6000


def reachable(uri: str, timeout: float = 5.0) -> None:
    """An http(s) tracking server answers at all (any HTTP status counts: an authenticating proxy
    is reachable). Checked once up front: MLflow's own client retries a refused connection for
    minutes before it gives up."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectionError(f"no MLflow server answers at {uri} ({reason})") from None


def client(uri: str) -> MlflowClient:
    # a server that stops answering mid-run costs a minute, not MLflow's default of several
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    reachable(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(c: MlflowClient, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name)
    except MlflowException:  # created meanwhile by another run
        found = c.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _param_value(v) -> str:
    text = v if isinstance(v, str) else json.dumps(v)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."


def log_params(c: MlflowClient, run_id: str, params: dict) -> None:
    """Params not logged yet (MLflow refuses to change one: a resumed run logs only new keys)."""
    have = c.get_run(run_id).data.params
    todo = [Param(k, _param_value(v)) for k, v in params.items() if k not in have]
    for i in range(0, len(todo), PARAMS_PER_BATCH):
        c.log_batch(run_id, params=todo[i : i + PARAMS_PER_BATCH])


def row_metrics(row: dict) -> list[Metric]:
    ts, step = int(1000 * row.get("time", time.time())), int(row.get("step", 0))
    return [Metric(k, v, ts, step) for k, v in numbers(row).items()]


def log_metric_list(c: MlflowClient, run_id: str, metrics: list[Metric]) -> None:
    for i in range(0, len(metrics), BATCH):
        c.log_batch(run_id, metrics=metrics[i : i + BATCH])


def ensure_registered_model(c: MlflowClient, name: str) -> None:
    try:
        c.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def model_version(c: MlflowClient, name: str, run_id: str, artifact_path: str, tags: dict[str, str]) -> str:
    """The version of registered model `name` made from this run's `artifact_path` (created once)."""
    found = c.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if found:
        return found[0].version
    ensure_registered_model(c, name)
    source = f"{c.get_run(run_id).info.artifact_uri}/{artifact_path}"
    return c.create_model_version(name, source=source, run_id=run_id, tags=tags).version


class MlflowRun:
    label = "MLflow"

    def __init__(self, c: MlflowClient, cfg: OikyoConfig, run_id: str, state: dict, save: Callable[[str, dict], None]):
        self.client, self.cfg, self.run_id, self.state, self._save = c, cfg, run_id, state, save
        self._pending: list[Metric] = []
        self._sent = time.monotonic()
        self._lock = threading.Lock()  # rows come from the driver's metrics-following thread

    @classmethod
    def open(cls, cfg: OikyoConfig, run_dir: Path, saved: dict | None, save: Callable[[str, dict], None]) -> MlflowRun:
        tc = cfg.tracking
        uri = tc.mlflow_uri or ""
        c = client(uri)
        if saved and saved.get("uri") == uri:  # resume: the same MLflow run, running again
            run_id = saved["run_id"]
            c.update_run(run_id, status="RUNNING")
            state = saved
        else:
            eid = experiment_id(c, tc.mlflow_experiment)
            tags = {"oikyo.run": run_dir.name, "oikyo.config_hash": cfg.config_hash()}
            run_id = c.create_run(eid, run_name=run_dir.name, tags=tags).info.run_id
            state = {"uri": uri, "experiment_id": eid, "run_id": run_id}
        save("mlflow", state)
        log_params(c, run_id, flatten(cfg))
        return cls(c, cfg, run_id, state, save)

    def _flush(self, force: bool = False) -> None:
        with self._lock:
            if not self._pending or (not force and time.monotonic() - self._sent < FLUSH_S):
                return
            pending, self._pending = self._pending, []
            self._sent = time.monotonic()
            log_metric_list(self.client, self.run_id, pending)

    def log_metrics(self, row: dict) -> None:
        with self._lock:
            self._pending += row_metrics(row)
        self._flush()

    def log_file(self, path: Path, artifact_dir: str | None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_dir)

    def log_eval(self, report: dict, eval_dir: Path) -> None:
        self._flush(force=True)
        ts = int(1000 * time.time())
        log_metric_list(self.client, self.run_id, [Metric(k, v, ts, 0) for k, v in eval_numbers(report).items()])
        self.client.set_tag(self.run_id, "oikyo.eval_passed", str(bool(report.get("passed", True))).lower())
        self.client.log_artifacts(self.run_id, str(eval_dir), "eval")

    def log_model(self, model_dir: Path) -> None:
        """The adapter (or full model) directory as artifacts, then a version of the registered model."""
        self._flush(force=True)
        self.client.log_artifacts(self.run_id, str(model_dir), model_dir.name)
        tc = self.cfg.tracking
        name = tc.mlflow_model_name or tc.mlflow_experiment
        run_name = self.client.get_run(self.run_id).info.run_name
        tags = {"oikyo.run": run_name, "oikyo.config_hash": self.cfg.config_hash()}
        version = model_version(self.client, name, self.run_id, model_dir.name, tags)
        self.state["model"] = {"name": name, "version": version, "artifact_path": model_dir.name}
        self._save("mlflow", self.state)

    def log_trials(self, cfg: OikyoConfig, rows: list[dict]) -> None:
        """Each trial as a nested run: its config as params, its metrics.jsonl as metrics, its
        status; trials logged before (a resumed sweep) are not logged again."""
        done = self.state.setdefault("trials", {})
        eid = self.client.get_run(self.run_id).info.experiment_id
        for row in rows:
            if row["trial"] in done:
                continue
            trial_dir = Path(row["dir"])
            tags = {"mlflow.parentRunId": self.run_id, "oikyo.trial": row["trial"], "oikyo.status": row["status"]}
            child = self.client.create_run(eid, run_name=row["trial"], tags=tags).info.run_id
            config = trial_dir / "config.yaml"
            if config.is_file():
                log_params(self.client, child, flatten(OikyoConfig.model_validate(yaml.safe_load(config.read_text()))))
            metrics = trial_dir / "metrics.jsonl"
            lines = metrics.read_text().splitlines() if metrics.is_file() else []
            log_metric_list(
                self.client, child, [m for line in lines if line.strip() for m in row_metrics(json.loads(line))]
            )
            self.client.set_terminated(child, "FAILED" if row["status"].startswith("failed") else "FINISHED")
            done[row["trial"]] = child
            self._save("mlflow", self.state)

    def log_promoted(self, trial: str, run_dir: Path) -> None:
        """The promoted best trial: its evaluation and adapter on the trial's nested run, and a
        tracking.json in run_dir, so that registering it mirrors to MLflow as a finetune run does."""
        child = self.state.get("trials", {}).get(trial)
        if child is None or read_state(run_dir).get("mlflow", {}).get("run_id") == child:
            return
        self.client.set_tag(self.run_id, "oikyo.best_trial", trial)
        trial_cfg = OikyoConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
        state = {"uri": self.state["uri"], "experiment_id": self.state["experiment_id"], "run_id": child}
        best = MlflowRun(self.client, trial_cfg, child, state, lambda name, s: write_state(run_dir, {name: s}))
        if (run_dir / "eval" / "report.json").is_file():
            best.log_eval(json.loads((run_dir / "eval" / "report.json").read_text()), run_dir / "eval")
        best.log_model(run_dir / ("adapter" if (run_dir / "adapter").is_dir() else "model"))

    def finish(self, status: str) -> None:
        self._flush(force=True)
        self.client.set_terminated(self.run_id, status)
