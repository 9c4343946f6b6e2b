"""The full-FT vs PEFT table (Ray-free): what each method's run cost and what it bought.

    row = method_row(method, run_dir, report, seconds, cost)   one method's numbers
    write_table(rows, out_dir)                                 methods.json, methods.md, methods.png

Trainable parameters are counted from what the run saved: an adapter file holds only the weights
that trained (LoRA's A and B, DoRA's magnitudes too), a full fine-tune's model file every weight.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from matplotlib.figure import Figure
from safetensors import safe_open

from oikyo_ray.train.monitor import read_metrics

COLUMNS = (
    "method",
    "test_loss",
    "test_loss_delta",
    "quality",
    "quality_delta",
    "trainable_params",
    "peak_mem_mb",
    "tokens_per_s",
    "train_seconds",
    "cost",
    "artifact_mb",
)


def saved_values(weights_dir: Path) -> int:
    """Number of values in the safetensors files of a saved adapter or model."""
    total = 0
    for f in sorted(Path(weights_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                total += math.prod(st.get_slice(name).get_shape())
    return total


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def method_row(method: str, run_dir: Path, weights: Path, report: dict, seconds: float, cost: float) -> dict:
    """One method's row. `quality` is the report's first generation metric (test split, tuned),
    beside the test loss; both with their delta against the base model."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    mems = [r["mem_peak_mb"] for r in rows if "mem_peak_mb" in r and math.isfinite(r["mem_peak_mb"])]
    metric = next(iter(report.get("metrics") or []), None)
    tuned, base = report["tuned"], report["base"]
    return {
        "method": method,
        "test_loss": tuned["loss"],
        "test_loss_delta": tuned["loss"] - base["loss"],
        "quality_metric": metric,
        "quality": tuned.get(metric, math.nan) if metric else math.nan,
        "quality_delta": (tuned[metric] - base[metric]) if metric else math.nan,
        "trainable_params": saved_values(weights),
        "peak_mem_mb": max(mems, default=math.nan),
        "tokens_per_s": statistics.median(speeds) if speeds else math.nan,
        "train_seconds": seconds,
        "cost": cost,
        "artifact_mb": _bytes(weights) / 2**20,
        "run_dir": str(run_dir),
    }


def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.4g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def markdown(rows: list[dict], skipped: dict[str, str]) -> str:
    metric = next((r["quality_metric"] for r in rows if r.get("quality_metric")), "quality")
    head = [c.replace("quality", metric) for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    lines += [f"| {m} | skipped: {why} |" + " |" * (len(COLUMNS) - 2) for m, why in skipped.items()]
    return "\n".join(lines)


def chart(rows: list[dict], out: Path) -> None:
    """Test loss against trainable parameters and against peak memory, one point per method."""
    fig = Figure(figsize=(9, 3.6))  # no pyplot: no GUI backend, nothing global to close
    for ax, key, label in zip(
        fig.subplots(1, 2), ("trainable_params", "peak_mem_mb"), ("trainable parameters", "peak memory (MiB)")
    ):
        for r in rows:
            ax.scatter(r[key], r["test_loss"])
            ax.annotate(r["method"], (r[key], r["test_loss"]), textcoords="offset points", xytext=(4, 4))
        ax.set_xscale("log" if key == "trainable_params" else "linear")
        ax.set_xlabel(label)
        ax.set_ylabel("test loss (fine-tuned)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def write_table(rows: list[dict], skipped: dict[str, str], out_dir: Path) -> str:
    table = markdown(rows, skipped)
    safe = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()} for r in rows]
    (out_dir / "methods.json").write_text(json.dumps({"methods": safe, "skipped": skipped}, indent=2))
    (out_dir / "methods.md").write_text(table + "\n")
    if rows:
        chart(rows, out_dir / "methods.png")
    return table
