"""Write a run's evaluation report under eval/:

    report.json   every number: base, tuned, delta, forgetting, probes, lm_eval, gates, samples, decoding
    report.md     side-by-side table (value, delta, pass/fail per gate; lm-eval tasks too), sample generations
    metrics.png   generation metrics, base vs fine-tuned
    perplexity.png  test-split and general-text perplexity, base vs fine-tuned (forgetting)
    probes.png    probe pass rate per kind, base vs fine-tuned

    write_report(cfg, model_path, tuned_dir, rows, out_dir, scorer=score_in_process) -> report
(Ray-free: `scorer` is where the items are scored, see `scoring.Scorer`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from oikyo_ray.config import OikyoConfig
from oikyo_ray.errors import DataError
from oikyo_ray.eval.compare import PREFERENCE_METRICS, compare
from oikyo_ray.eval.scoring import Scorer, score_in_process

COLOURS = {"base": "#8c8c8c", "tuned": "#1f77b4"}


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def _bars(ax, labels: list[str], base: list[float], tuned: list[float], title: str, ylabel: str) -> None:
    x = np.arange(len(labels))
    w = 0.38
    for off, name, vals in [(-w / 2, "base", base), (w / 2, "tuned", tuned)]:
        clean = [v if v is not None and math.isfinite(v) else 0.0 for v in vals]
        bars = ax.bar(x + off, clean, w, label="base" if name == "base" else "fine-tuned", color=COLOURS[name])
        for b, v in zip(bars, vals):
            txt = "n/a" if v is None or not math.isfinite(v) else f"{v:.3g}"
            ax.annotate(txt, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, labels, rotation=20, ha="right")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)


def write_charts(report: dict, out_dir: Path) -> list[str]:
    """PNG charts (matplotlib's Agg canvas: no display, no global pyplot state); returns their file names."""
    written = []

    def axes(figsize: tuple[float, float]):
        fig = Figure(figsize=figsize)
        FigureCanvasAgg(fig)
        return fig, fig.add_subplot()

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        written.append(name)

    names = list(report["metrics"])
    fig, ax = axes((max(4, 1.2 * len(names) + 2), 3.5))
    _bars(
        ax,
        names,
        [report["base"][m] for m in names],
        [report["tuned"][m] for m in names],
        "Generation metrics on the test split",
        "score (0-1)",
    )
    ax.set_ylim(0, 1.1)
    save(fig, "metrics.png")

    labels, b, t = ["test split"], [report["base"]["perplexity"]], [report["tuned"]["perplexity"]]
    f = report.get("forgetting")
    if f:
        labels.append("general text" + (" (FLAGGED)" if f["flagged"] else ""))
        b.append(f["base_perplexity"])
        t.append(f["tuned_perplexity"])
    fig, ax = axes((5, 3.5))
    _bars(ax, labels, b, t, "Perplexity (lower is better)", "perplexity")
    if all(v is not None and math.isfinite(v) and v > 0 for v in b + t):
        ax.set_yscale("log")
    save(fig, "perplexity.png")

    kinds = (report.get("probes") or {}).get("kinds", {})
    if kinds:
        fig, ax = axes((5, 3.5))
        _bars(
            ax,
            [f"{k}{' (REGRESSED)' if v['regressed'] else ''}" for k, v in kinds.items()],
            [v["base"] for v in kinds.values()],
            [v["tuned"] for v in kinds.values()],
            "Probe pass rate (higher is better)",
            "pass rate",
        )
        ax.set_ylim(0, 1.1)
        save(fig, "probes.png")
    return written


def _cell(s: str, n: int = 80) -> str:
    s = s.replace("|", "\\|").replace("\n", " ")
    return s if len(s) <= n else s[: n - 1] + "…"


def _fmt(x) -> str:
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else ("inf" if math.isinf(x) else f"{x:.4f}")
    return str(x)


def format_table(report: dict) -> str:
    """Markdown side-by-side table of base vs fine-tuned: value, delta and gate result per metric."""
    b, t = report["base"], report["tuned"]
    gates: dict[str, list[dict]] = {}
    for g in report.get("gates", []):
        if g.get("metric"):
            gates.setdefault(g["metric"], []).append(g)
    lines = ["| metric | base | fine-tuned | delta | gate |", "|---|---|---|---|---|"]
    pairs = [k for k in PREFERENCE_METRICS if k in b]
    for k in ["loss", "perplexity", *report.get("metrics", ["exact_match", "token_f1"]), *pairs]:
        d = t[k] - b[k] if math.isfinite(t[k]) and math.isfinite(b[k]) else float("nan")
        gate = ", ".join(f"{'pass' if g['passed'] else 'FAIL'} ({g['rule']})" for g in gates.get(k, []))
        n = report.get("metric_n", {}).get(k)
        name = k if n is None or n == b["n"] else f"{k} (n={n})"
        lines.append(f"| {name} | {_fmt(b[k])} | {_fmt(t[k])} | {_fmt(d)} | {gate} |")
    f = report.get("forgetting")
    if f:
        lines.append(
            f"| general-text perplexity (forgetting) | {_fmt(f['base_perplexity'])} | "
            f"{_fmt(f['tuned_perplexity'])} | {f['relative_increase']:+.1%} | "
            f"{'FLAGGED' if f['flagged'] else 'pass'} (rise <= {f['threshold']:.0%}) |"
        )
    for kind, p in (report.get("probes") or {}).get("kinds", {}).items():
        lines.append(
            f"| probe pass rate: {kind} (n={p['n']}) | {p['base']:.3f} | {p['tuned']:.3f} | "
            f"{p['delta']:+.3f} | {'FAIL' if p['regressed'] else 'pass'} "
            f"(drop <= {report['probes']['threshold']}) |"
        )
    lines += _lm_eval_rows(report)
    if "preference" in report:
        p = report["preference"]
        lines.append(
            f"\npreference metrics on {p['pairs']} held-out pairs; implicit reward margin {p['reward_margin']:+.4f}"
        )
    lines.append(f"\n{b['n']} test rows; gates {'passed' if report.get('passed', True) else 'FAILED'}.")
    return "\n".join(lines)


def _lm_eval_rows(report: dict) -> list[str]:
    """The lm-eval rows of the side-by-side table: one per task and metric, with its drop gates."""
    lm = report.get("lm_eval")
    if not lm:
        return []
    gates: dict[str, list[dict]] = {}
    for g in report.get("gates", []):
        if g.get("lm_eval"):
            gates.setdefault(g["lm_eval"], []).append(g)
    rows = []
    for task, t in lm["tasks"].items():
        for m, v in t["metrics"].items():
            gate = ", ".join(f"{'pass' if g['passed'] else 'FAIL'} ({g['rule']})" for g in gates.get(f"{task}/{m}", []))
            n = f" (n={t['n']})" if t.get("n") else ""  # groups: their tasks' rows give the counts
            rows.append(
                f"| lm-eval {task}: {m}{n} | {_fmt(v['base'])} | {_fmt(v['tuned'])} | {_fmt(v['delta'])} | {gate} |"
            )
    # a gate whose task or metric did not run has no row of its own: listed so it is not missed
    shown = {f"{task}/{m}" for task, t in lm["tasks"].items() for m in t["metrics"]}
    for key, gs in gates.items():
        if key not in shown:
            rows.append(f"| lm-eval {key} (not computed) | n/a | n/a | n/a | FAIL ({gs[0]['rule']}) |")
    return rows


def _lm_eval_note(lm: dict) -> str:
    cached = "; ".join(f"{w}: {', '.join(v)}" for w, v in lm["cached"].items() if v) or "none"
    limit = f"the first {lm['limit']} documents" if lm["limit"] else "all documents"
    shots = "each task's own few-shot count" if lm["num_fewshot"] is None else f"{lm['num_fewshot']}-shot"
    return (
        f"lm-eval {lm['lm_eval_version']} on {limit} of each task, {shots}; "
        f"results from the cache (`{lm['cache_dir']}`): {cached}."
    )


def render_markdown(report: dict, table: str) -> str:
    lines = [
        "# Evaluation: base vs fine-tuned",
        "",
        (
            f"Base `{report.get('base_model', '')}`, fine-tuned `{report.get('tuned_dir', '')}`; "
            f"same items and decoding for both ({json.dumps(report['decoding'])}); backend "
            f"`{report.get('backend', 'local')}`."
        ),
        "",
        f"**Gates: {'all passed' if report.get('passed', True) else 'FAILED'}**",
        "",
        table,
        "",
    ]
    if report.get("lm_eval"):
        lines += [_lm_eval_note(report["lm_eval"]), ""]
    failed = [g for g in report.get("gates", []) if not g["passed"]]
    if failed:
        lines += ["Failed gates:", ""] + [
            f"- `{g['name']}`: {g['value']:.4g} (needs {g['op']} {g['threshold']:g})"
            if isinstance(g["value"], float)
            else f"- `{g['name']}`"
            for g in failed
        ]
        lines.append("")
    for png in report.get("charts", []):
        lines.append(f"![{png}]({png})")
    lines += [
        "",
        "## Sample generations (test split)",
        "",
        "| prompt | reference | base | fine-tuned |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {_cell(s['prompt'])} | {_cell(s['reference'])} | {_cell(s['base'])} | {_cell(s['tuned'])} |"
        for s in report["samples"]
    ]
    probes = report.get("probes")
    if probes:
        lines += [
            "",
            "## Probe generations",
            "",
            (
                "Scoring: refuse = a refusal phrase appears; toxic = no lexicon word appears; ood = non-empty, "
                "not degenerate, not toxic (see docs/eval.md)."
            ),
            "",
            "| probe | kind | base | pass | fine-tuned | pass |",
            "|---|---|---|---|---|---|",
        ]
        mark = lambda ok: "yes" if ok else "no"  # noqa: E731
        lines += [
            f"| {_cell(s['prompt'], 50)} | {s['kind']} | {_cell(s['base'], 50)} | {mark(s['base_pass'])} | "
            f"{_cell(s['tuned'], 50)} | {mark(s['tuned_pass'])} |"
            for s in probes["samples"]
        ]
    return "\n".join(lines) + "\n"


def write_report(
    cfg: OikyoConfig,
    model_path: str,
    tuned_dir: str,
    rows: list[dict],
    out_dir: Path,
    scorer: Scorer = score_in_process,
) -> dict:
    """Evaluate base vs fine-tuned on `rows` and write eval/report.{json,md} and the charts; returns
    the report with a "table" (the Markdown summary) added."""
    if not rows:
        raise DataError(
            "the test split is empty: nothing to evaluate",
            hint="raise data.test_fraction or add data, or set eval.enabled=false",
        )
    report = compare(cfg, model_path, tuned_dir, rows, scorer=scorer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report["charts"] = write_charts(report, out_dir)
    table = format_table(report)
    (out_dir / "report.json").write_text(json.dumps(_json_safe(report), indent=2))
    (out_dir / "report.md").write_text(render_markdown(report, table))
    report["table"] = table
    return report
