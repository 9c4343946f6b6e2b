"""What a run cost (Ray-free): device-hours its Ray Train workers held, priced by `cost.*`.

Recorded in the run's lineage.json under `cost` (resumed runs add their sessions), shown by
`oikyo runs compare` and the model card. Only training is counted: the data and eval stages are
short next to it and mostly not on the accelerators.
"""

from __future__ import annotations

import json
from pathlib import Path

from oikyo_ray.config import CostConfig, ScalingConfig

ADDED = ("train_seconds", "cpu_hours", "gpu_hours", "cost")  # what a resumed session adds to


def train_cost(scaling: ScalingConfig, seconds: float, prices: CostConfig) -> dict:
    """Device-hours and cost of `seconds` of training on the configured workers."""
    hours = seconds / 3600
    cpu_hours = scaling.num_workers * scaling.cpus_per_worker * hours
    gpu_hours = scaling.num_workers * hours if scaling.use_gpu else 0.0
    return {
        "train_seconds": seconds,
        "cpu_hours": cpu_hours,
        "gpu_hours": gpu_hours,
        "cost": cpu_hours * prices.cpu_hour + gpu_hours * prices.gpu_hour,
        "currency": prices.currency,
    }


def add_cost(lineage_path: Path, session: dict) -> dict:
    """Add one training session's cost to the run's lineage (a resume adds to the first)."""
    lineage = json.loads(lineage_path.read_text())
    total = lineage.get("cost")
    if total is not None and total.get("currency") == session["currency"]:
        session = {**session, **{k: session[k] + total[k] for k in ADDED}}
    lineage["cost"] = session
    lineage_path.write_text(json.dumps(lineage, indent=2))
    return session
