"""How many optimizer steps a run takes (Ray-free): what training runs and what a sweep budgets.

With data.packing on, workers read packed blocks, not rows: every count here is of what they read.
"""

from __future__ import annotations

from pathlib import Path

from oikyo_ray.config import OikyoConfig, TrainConfig
from oikyo_ray.data.prepared import read_column
from oikyo_ray.errors import OikyoError

SPLITS = ("train", "val", "test")


def objective_counts(cfg: OikyoConfig, manifest: dict, data_dir: Path) -> dict:
    """The manifest with the split counts of rows method.objective trains on: a preference objective
    skips rows whose prompt leaves no room for the answers (the manifest counts them per file only;
    curate.py leaves their ids empty, as `ray_data.read_split(fitting=True)` expects)."""
    if cfg.method.objective == "sft":
        return manifest
    fits = {s: sum(len(x) > 0 for x in read_column(data_dir, s, "prompt_ids")) for s in SPLITS}
    return {**manifest, "counts": {**manifest["counts"], **fits}}


def train_units(cfg: OikyoConfig, manifest: dict) -> int:
    """Training rows in the prepared data, or packed blocks when data.packing is on."""
    if not cfg.data.packing:
        return manifest["counts"]["train"]
    if "packing" not in manifest:
        raise OikyoError(
            "data.packing=true but the prepared data has no packed split",
            hint="prepare the data again with data.packing=true",
        )
    return manifest["packing"]["blocks"]


def rows_per_worker(cfg: OikyoConfig, manifest: dict) -> int:
    """Rows (or blocks) in each worker's shard: the shards are equal, the remainder is dropped."""
    return train_units(cfg, manifest) // cfg.scaling.num_workers


def total_steps(cfg: TrainConfig, rows_per_worker: int) -> int:
    """Optimizer steps over train.epochs of `rows_per_worker` rows, capped at train.max_steps."""
    micro = rows_per_worker // cfg.batch_size
    per_epoch = max(1, micro // cfg.grad_accum)
    steps = per_epoch * cfg.epochs
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def run_steps(cfg: OikyoConfig, manifest: dict) -> int:
    """The optimizer steps a training run of `cfg` on these prepared data takes (unless it stops early)."""
    return total_steps(cfg.train, rows_per_worker(cfg, manifest))
