"""Write a run's evaluation report: eval/report.json and eval/report.md."""

from __future__ import annotations

import json
from pathlib import Path

from oikyo_ray.config import OikyoConfig
from oikyo_ray.errors import DataError
from oikyo_ray.eval.compare import compare, format_table


def write_report(cfg: OikyoConfig, model_path: str, tuned_dir: str, rows: list[dict], out_dir: Path) -> dict:
    if not rows:
        raise DataError("the test split is empty: nothing to evaluate",
                        hint="raise data.test_fraction or add data, or set eval.enabled=false")
    report = compare(cfg, model_path, tuned_dir, rows)
    table = format_table(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    lines = ["# Evaluation: base vs fine-tuned", "", table, "", "## Samples", "",
             "| prompt | reference | base | fine-tuned |", "|---|---|---|---|"]
    cell = lambda s: s.replace("|", "\\|").replace("\n", " ")[:80]  # noqa: E731
    lines += [f"| {cell(s['prompt'])} | {cell(s['reference'])} | {cell(s['base'])} | {cell(s['tuned'])} |"
              for s in report["samples"]]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    report["table"] = table
    return report
