"""A drift report's files (Ray-free): report.json, report.md and lengths.png in a directory.

write(out_dir, report, ref_lengths, live_lengths)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def markdown(report: dict) -> str:
    verdict = {True: "DRIFTED", False: "no drift", None: "not enough live prompts for a verdict"}[report["drifted"]]
    rows = report["rows"]
    lines = [
        f"# Drift: {report['model']}",
        "",
        f"{verdict} — {rows['live']} captured prompts of the last {report['window_days']} days against "
        f"{rows['reference']} training prompts.",
        "",
        "| check | value | threshold | drifted |",
        "|---|---|---|---|",
    ]
    for c in report["checks"]:
        lines.append(f"| {c['check']} | {c['value']:.4g} | {c['threshold']:g} | {'yes' if c['drifted'] else 'no'} |")
    ppl = report.get("perplexity")
    if ppl:
        lines += ["", f"Tuned model perplexity: live prompts {ppl['live']:.2f}, test split {ppl['test']:.2f}."]
    scripts = report["scripts"]
    top = lambda d: ", ".join(f"{k} {v:.0%}" for k, v in list(d.items())[:4]) or "-"  # noqa: E731
    lines += ["", f"Scripts: training {top(scripts['reference'])}; live {top(scripts['live'])}."]
    if report.get("feedback"):
        lines += ["", "| version | date | positive | negative | positive share |", "|---|---|---|---|---|"]
        for version, days in report["feedback"].items():
            for d in days:
                share = "-" if d["share"] is None else f"{d['share']:.0%}"
                lines.append(f"| {version} | {d['date']} | {d['positive']} | {d['negative']} | {share} |")
    return "\n".join(lines) + "\n"


def write(out_dir: Path, report: dict, ref_lengths: list[int], live_lengths: list[int]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(markdown(report))
    fig = Figure(figsize=(7, 4), dpi=100)  # no pyplot: no GUI backend, nothing global to close
    ax = fig.subplots()
    top = max([*ref_lengths, *live_lengths, 1])
    bins = np.linspace(0, top + 1, min(41, top + 2)).tolist()
    ax.hist(ref_lengths, bins=bins, density=True, alpha=0.5, label="training prompts")
    ax.hist(live_lengths, bins=bins, density=True, alpha=0.5, label="captured prompts")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("share")
    ax.set_title(f"{report['model']}: prompt lengths")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "lengths.png")
    return out_dir
