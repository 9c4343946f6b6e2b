"""ASHA vs running every trial to its full budget: same trials (same seeds), best val_loss and
total training steps of each.

Run as: python bench/sweep_asha.py [--samples 6]
Writes bench/results/sweep_asha.json (ratio = ASHA steps / full-budget steps; target <= 0.40 with
the best metric within 5%).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench._common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def sweep(root: Path, name: str, samples: int, asha: bool) -> dict:
    from oikyo_ray.config import load_config
    from oikyo_ray.sweep.ray_tune import run_sweep

    overrides = [
        f"run.root={root}",
        f"run.name={name}",
        f"model.cache_dir={root / 'cache'}",
        "eval.enabled=false",
        "train.epochs=6",
        "train.eval_every=10",
        "sweep.grace_period=10",
        f"sweep.num_samples={samples}",
        "sweep.seed=3",
        "sweep.space={train.lr: {type: loguniform, low: 0.00003, high: 0.01}, "
        "method.lora.r: {type: choice, values: [4, 16]}}",
    ]
    if not asha:  # reduction_factor that never stops anyone within the budget = run everything in full
        overrides += ["sweep.grace_period=100000"]
    run_sweep(load_config(ROOT / "jobs/configs/sweep_demo.yaml", overrides), log=lambda s: None)
    rows = list(csv.DictReader((root / name / "results.csv").open()))
    return {
        "best": min(float(r["best_val_loss"]) for r in rows),
        "steps": sum(int(r["steps"]) for r in rows),
        "trials": len(rows),
        "early_stopped": sum(r["status"] == "early-stopped" for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=6)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="oikyo-sweep-bench-"))
    from oikyo_ray.cluster import init_ray

    init_ray(num_cpus=4)  # logical CPUs: see tests/conftest.py LOGICAL_CPUS (Ray Data bookkeeping tasks)
    asha = sweep(root, "asha", args.samples, asha=True)
    full = sweep(root, "full", args.samples, asha=False)
    write_result(
        "sweep_asha",
        "total training steps (lower is better)",
        asha["steps"],
        full["steps"],
        "every trial to its full budget (same trials, same seeds)",
        asha["steps"] / full["steps"],
        "<= 0.40 of the steps with best val_loss within 5%",
        best_val_loss_asha=asha["best"],
        best_val_loss_full=full["best"],
        best_gap=(asha["best"] - full["best"]) / full["best"],
        asha=asha,
        full=full,
    )


if __name__ == "__main__":
    main()
