"""One oikyo run as a Weights & Biases run (Ray-free).

    run = WandbRun.open(cfg, run_dir, saved, save)   tracking.wandb = offline | online
    run.log_metrics(row); run.log_eval(report, eval_dir); run.finish(status)

offline: everything is written under <run>/wandb/ and nothing is sent (`wandb sync <run>/wandb/offline-run-*`
uploads it later). online: sent to WANDB_BASE_URL (default api.wandb.ai) with the key from
WANDB_API_KEY; oikyo never reads or writes the key. The console is not captured, so what the
driver prints stays out of the run's files.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Callable
from pathlib import Path

import wandb

from oikyo_ray.config import OikyoConfig
from oikyo_ray.tracking.values import eval_numbers, flatten, numbers


class WandbRun:
    label = "W&B"

    def __init__(self, run):
        self.run = run

    @classmethod
    def open(cls, cfg: OikyoConfig, run_dir: Path, saved: dict | None, save: Callable[[str, dict], None]) -> WandbRun:
        tc = cfg.tracking
        run_id = (saved or {}).get("run_id") or "".join(
            secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8)
        )
        resumed = bool(saved) and tc.wandb == "online"
        run = wandb.init(
            mode="offline" if tc.wandb == "offline" else "online",  # never "off" here
            dir=str(run_dir),
            project=tc.wandb_project,
            entity=tc.wandb_entity,
            name=run_dir.name,
            id=run_id,
            # wandb writes nothing for an offline run asked to resume: a resumed offline run is
            # a second offline directory with the same id
            resume="allow" if resumed else None,
            config=flatten(cfg),
            tags=[f"config:{cfg.config_hash()}"],
            reinit="create_new",
            settings=wandb.Settings(console="off", silent=True),
        )
        save("wandb", {"run_id": run_id, "mode": tc.wandb, "project": tc.wandb_project})
        return cls(run)

    def log_metrics(self, row: dict) -> None:
        if "step" in row and (values := numbers(row)):
            self.run.log(values, step=int(row["step"]))

    def log_file(self, path: Path, artifact_dir: str | None) -> None:
        """Files go to MLflow only (W&B gets the numbers)."""

    def log_eval(self, report: dict, eval_dir: Path) -> None:
        self.run.summary.update(eval_numbers(report))

    def log_model(self, model_dir: Path) -> None:
        """The adapter is versioned in MLflow and oikyo's registry, not uploaded to W&B."""

    def log_trials(self, cfg: OikyoConfig, rows: list[dict]) -> None:
        """Sweeps are tracked in MLflow only."""

    def log_promoted(self, trial: str, run_dir: Path) -> None:
        """Sweeps are tracked in MLflow only."""

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)
        # finish() returns before wandb's service has written the run's files (offline: all of
        # them, and a driver that exits right after lost them); teardown waits for it to exit
        wandb.teardown()
