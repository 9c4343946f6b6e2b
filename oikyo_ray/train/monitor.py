"""Monitoring files in the run directory (Ray-free): TensorBoard events and a loss-curve PNG.

tb = TensorBoardLog(run_dir / "tensorboard"); tb.write(metrics)   one scalar per numeric metric
plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
with following(run_dir / "metrics.jsonl", on_row): ...   on_row(metrics) per line appended meanwhile
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter

SKIP = {"step", "epoch", "time", "resumed_from", "best_step"}


class TensorBoardLog:
    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self._w: SummaryWriter | None = None

    def write(self, metrics: dict) -> None:
        if self._w is None:
            self._w = SummaryWriter(str(self.log_dir))
        step = int(metrics.get("step", 0))
        for k, v in metrics.items():
            if k not in SKIP and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self._w.add_scalar(f"train/{k}" if k != "val_loss" else "val/loss", v, step)
        self._w.flush()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, out: Path) -> Path | None:
    """Training and validation loss against step (the last value per step wins after a resume)."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    train = {r["step"]: r["loss"] for r in rows if "loss" in r}
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    fig = Figure(figsize=(6, 4), dpi=100)  # no pyplot: no GUI backend, nothing global to close
    ax = fig.subplots()
    ax.plot(sorted(train), [train[s] for s in sorted(train)], label="train loss")
    if val:
        ax.plot(sorted(val), [val[s] for s in sorted(val)], "o-", label="val loss")
    for r in rows:
        if "resumed_from" in r:
            ax.axvline(r["resumed_from"], color="grey", linestyle=":", label="resumed")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    return out


@contextmanager
def following(path: Path, on_row: Callable[[dict], None], poll_s: float = 0.5) -> Iterator[None]:
    """Call `on_row` with each metrics line appended to `path` while the block runs (a polling
    thread), then once more for lines written before the block ended. This is how the driver
    sees a run's progress: Ray Train's controller writes the file (MetricsLog), the driver only
    waits in `fit()`. Lines already there (a resumed run's) are skipped; `on_row` errors are
    swallowed, because a progress display must never fail a run."""
    path = Path(path)
    start = path.stat().st_size if path.is_file() else 0
    stop = threading.Event()

    def run() -> None:
        offset, pending = start, b""
        while True:
            stopped = stop.wait(poll_s)
            if path.is_file():
                with open(path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                offset += len(chunk)
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    with suppress(Exception):
                        on_row(json.loads(line))
            if stopped:
                return

    thread = threading.Thread(target=run, name="oikyo-metrics-follow", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
