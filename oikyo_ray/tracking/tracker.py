"""The trackers a run logs to, behind one object the driver calls (Ray-free).

    tracker = Tracker.start(cfg, run_dir, log)   MLflow and/or W&B, as tracking.* asks; none: no-op
    tracker.log_metrics(row)                     a metrics.jsonl row (the driver follows the file)
    tracker.log_file(run_dir / "loss.png")
    tracker.log_eval(report, run_dir / "eval")   the report's numbers; its files as artifacts
    tracker.log_model(run_dir / "adapter")       artifact + registered model version (MLflow)
    tracker.log_trials(cfg, rows); tracker.log_promoted(trial, best_dir)   a sweep (MLflow)
    tracker.finish("FINISHED")                   or "FAILED" / "KILLED"

Tracking must never fail a run: a tracker that raises is reported once and dropped for the rest
of the run. What each tracker needs to continue (its run id; never a secret) is kept in
<run>/tracking.json, so `--resume` continues the same MLflow and W&B runs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from oikyo_ray.config import OikyoConfig
from oikyo_ray.errors import ConfigError
from oikyo_ray.tracking.values import read_state, write_state


def check_installed(cfg: OikyoConfig) -> None:
    """A configured tracker's package is installed: checked before Ray starts."""
    tc = cfg.tracking
    for wanted, package, extra in [(tc.mlflow_uri, "mlflow", "mlflow"), (tc.wandb != "off", "wandb", "wandb")]:
        if wanted and importlib.util.find_spec(package) is None:
            field = "tracking.mlflow_uri" if package == "mlflow" else "tracking.wandb"
            raise ConfigError(f"{field} needs {package}: pip install 'oikyo-ray[{extra}]'", hint=f"or unset {field}")


class Tracker:
    def __init__(self, sinks: list, log: Callable[[str], None] = print):
        self.sinks, self.log = sinks, log

    @classmethod
    def start(cls, cfg: OikyoConfig, run_dir: Path, log: Callable[[str], None] = print, wandb: bool = True) -> Tracker:
        """Open (or, with a tracking.json from an earlier attempt, continue) the configured
        trackers' runs and log the flattened config as params. `wandb=False`: MLflow only (sweeps)."""
        run_dir, tc = Path(run_dir), cfg.tracking
        state = read_state(run_dir)

        def save(name: str, section: dict) -> None:
            state[name] = section
            write_state(run_dir, state)

        # imported only when configured: both packages are optional and slow to import
        def open_mlflow() -> Any:
            from oikyo_ray.tracking.mlflow_run import MlflowRun  # noqa: PLC0415

            return MlflowRun.open(cfg, run_dir, state.get("mlflow"), save)

        def open_wandb() -> Any:
            from oikyo_ray.tracking.wandb_run import WandbRun  # noqa: PLC0415

            return WandbRun.open(cfg, run_dir, state.get("wandb"), save)

        sinks: list = []
        openers: list[tuple[str, Callable[[], Any]]] = []
        if tc.mlflow_uri:
            openers.append(("MLflow", open_mlflow))
        if tc.wandb != "off" and wandb:
            openers.append(("W&B", open_wandb))
        for label, open_ in openers:
            try:
                sinks.append(open_())
            except Exception as e:
                log(f"[oikyo] warning: {label} tracking is off for this run: {e}")
        return cls(sinks, log)

    def _each(self, method: str, *args) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(*args)
            except Exception as e:
                self.sinks.remove(sink)
                self.log(f"[oikyo] warning: {sink.label} tracking stopped for this run ({method}: {e})")

    def log_metrics(self, row: dict) -> None:
        self._each("log_metrics", row)

    def log_file(self, path: Path, artifact_dir: str | None = None) -> None:
        if Path(path).is_file():
            self._each("log_file", Path(path), artifact_dir)

    def log_eval(self, report: dict, eval_dir: Path) -> None:
        self._each("log_eval", report, Path(eval_dir))

    def log_model(self, model_dir: Path) -> None:
        self._each("log_model", Path(model_dir))

    def log_trials(self, cfg: OikyoConfig, rows: list[dict]) -> None:
        """Sweep trials (sweep/report.trial_rows) as nested runs of this one."""
        self._each("log_trials", cfg, rows)

    def log_promoted(self, trial: str, run_dir: Path) -> None:
        """The sweep's promoted best trial (run_dir: <sweep>-best): its eval and adapter."""
        self._each("log_promoted", trial, Path(run_dir))

    def finish(self, status: str = "FINISHED") -> None:
        self._each("finish", status)
