"""What a run reports to its trackers, as plain values (Ray-free).

flatten(cfg)          {"train.lr": 0.0002, "data.paths": [...], ...}  the config's leaves
numbers(row)          a metrics.jsonl row's finite numbers, without step/time bookkeeping
eval_numbers(report)  {"eval/tuned/loss": ..., "eval/base/exact_match": ..., "eval/passed": 1.0}
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel

STATE_FILE = "tracking.json"
SKIP = {"step", "epoch", "time", "resumed_from", "best_step"}  # not metrics of their own (train/monitor.py)


def flatten(cfg: BaseModel, prefix: str = "") -> dict[str, Any]:
    """The config as dotted leaves (`train.lr`), sections only: a dict- or list-valued field stays
    one value (its keys may be paths). The tracking section itself is left out."""
    dump, out = cfg.model_dump(mode="json"), dict[str, Any]()
    for name, value in cfg:
        if name == "tracking" and not prefix:
            continue
        if isinstance(value, BaseModel):
            out |= flatten(value, f"{prefix}{name}.")
        else:
            out[f"{prefix}{name}"] = dump[name]
    return out


def numbers(row: dict) -> dict[str, float]:
    """The row's finite numeric metrics."""
    return {
        k: float(v)
        for k, v in row.items()
        if k not in SKIP and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def eval_numbers(report: dict) -> dict[str, float]:
    """A report's headline numbers: eval/base/<m>, eval/tuned/<m>, eval/passed, forgetting."""
    out = {f"eval/{side}/{k}": v for side in ("base", "tuned") for k, v in numbers(report.get(side) or {}).items()}
    out["eval/passed"] = float(bool(report.get("passed", True)))
    if f := report.get("forgetting"):
        out |= {f"eval/forgetting/{k}": v for k, v in numbers(f).items()}
    return out


def read_state(run_dir: Path) -> dict:
    f = Path(run_dir) / STATE_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def write_state(run_dir: Path, state: dict) -> None:
    (Path(run_dir) / STATE_FILE).write_text(json.dumps(state, indent=2))
