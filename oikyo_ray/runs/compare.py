"""Several runs' evaluation reports side by side (Ray-free).

compare_runs([run_dir or s3:// run, ...]) -> {"runs": [...], "rows": [...]}
format_comparison(result) -> Markdown table: one column per run, one row per metric, each cell
                             "fine-tuned value (delta vs that run's base)"
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from oikyo_ray.errors import OikyoError
from oikyo_ray.runs.store import join, read_text, run_name


def load_report(run_dir: str | Path) -> dict:
    """A run's eval/report.json: local dir or s3:// run."""
    p = join(run_dir, "eval", "report.json")
    text = read_text(p)
    if text is None:
        raise OikyoError(
            f"no evaluation report in {run_dir} (looked for {p})", hint=f"run `oikyo eval {run_dir}` first"
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise OikyoError(f"{p} is not valid JSON ({e.msg})") from None


def _cost(run_dir: str | Path) -> dict | None:
    """The run's recorded training cost (lineage.json `cost`), None for runs from before it."""
    text = read_text(join(run_dir, "lineage.json"))
    return json.loads(text).get("cost") if text else None


def _num(x) -> float:
    if x is None:
        return float("nan")
    if isinstance(x, str):
        return float(x)  # "inf" / "-inf" as written by the report
    return float(x)


def compare_runs(run_dirs: list[str | Path]) -> dict:
    """Rows (metric, [(tuned, delta) per run]) over the union of the runs' metrics."""
    if len(run_dirs) < 1:
        raise OikyoError("give at least one run directory to compare")
    reports = [load_report(d) for d in run_dirs]
    names = [run_name(d) for d in run_dirs]
    metrics: list[str] = ["loss", "perplexity"]
    for r in reports:
        metrics += [m for m in r.get("metrics", ["exact_match", "token_f1"]) if m not in metrics]
    rows = []
    for m in metrics:
        cells: list[tuple[float, float | None]] = []
        for r in reports:
            t, b = _num(r["tuned"].get(m)), _num(r["base"].get(m))
            cells.append((t, t - b if math.isfinite(t) and math.isfinite(b) else float("nan")))
        rows.append({"metric": m, "cells": cells})
    rows.append(
        {
            "metric": "general-text perplexity rise",
            "cells": [
                ((_num(r["forgetting"]["relative_increase"]), None) if r.get("forgetting") else (float("nan"), None))
                for r in reports
            ],
        }
    )
    kinds: list[str] = []
    for r in reports:
        kinds += [k for k in (r.get("probes") or {}).get("kinds", {}) if k not in kinds]
    for k in kinds:
        cells = []
        for r in reports:
            p = (r.get("probes") or {}).get("kinds", {}).get(k)
            cells.append((p["tuned"], p["delta"]) if p else (float("nan"), None))
        rows.append({"metric": f"probe pass rate: {k}", "cells": cells})
    scores: list[tuple[str, str]] = []  # (lm-eval task, metric) over the union of the runs' tasks
    for r in reports:
        for task, t in (r.get("lm_eval") or {}).get("tasks", {}).items():
            scores += [(task, m) for m in t["metrics"] if (task, m) not in scores]
    for task, m in scores:
        cells = []
        for r in reports:
            v = ((r.get("lm_eval") or {}).get("tasks", {}).get(task) or {}).get("metrics", {}).get(m)
            cells.append((_num(v["tuned"]), _num(v["delta"])) if v else (float("nan"), None))
        rows.append({"metric": f"lm-eval {task}: {m}", "cells": cells})
    costs = [_cost(d) for d in run_dirs]
    for key, label in (("cpu_hours", "train CPU-hours"), ("gpu_hours", "train GPU-hours"), ("cost", "train cost")):
        rows.append({"metric": label, "cells": [(_num(c.get(key)) if c else float("nan"), None) for c in costs]})
    return {
        "runs": names,
        "paths": [str(d) for d in run_dirs],
        "rows": rows,
        "passed": [r.get("passed") for r in reports],
        "n": [r["tuned"].get("n") for r in reports],
    }


def _cell(value: float, delta: float | None) -> str:
    if not math.isfinite(value):
        return "inf" if value == float("inf") else "–"
    return f"{value:.4f}" if delta is None or not math.isfinite(delta) else f"{value:.4f} ({delta:+.4f})"


def format_comparison(result: dict) -> str:
    head = "| metric | " + " | ".join(result["runs"]) + " |"
    lines = [head, "|---" * (len(result["runs"]) + 1) + "|"]
    for row in result["rows"]:
        lines.append(f"| {row['metric']} | " + " | ".join(_cell(v, d) for v, d in row["cells"]) + " |")
    gates = ["passed" if p else ("FAILED" if p is False else "–") for p in result["passed"]]
    lines.append("| gates | " + " | ".join(gates) + " |")
    lines.append("| test rows | " + " | ".join(str(n) for n in result["n"]) + " |")
    lines.append("\nCells: fine-tuned value (delta vs that run's base model).")
    return "\n".join(lines)
