"""Regression gates: thresholds from `eval` config checked against a report (Ray-free).

    min_improvement  {metric: x}  tuned - base >= x   (base - tuned for loss and perplexity)
    min_tuned        {metric: x}  tuned >= x          (tuned <= x for loss and perplexity)
    max_forgetting   x            general-text perplexity rise (tuned / base - 1) <= x
    max_probe_drop   x            per probe kind: base pass rate - tuned pass rate <= x
    lm_eval_max_drop {task[/metric]: x}  lm-eval score drop, base - tuned (tuned - base when lower is
                                  better) <= x; 'task' alone: each of its metrics

A gate on a metric that was not computed (e.g. tool_call on data without tool calls) fails: a
configured check that cannot run is not a pass. `oikyo eval --fail-on-regression` exits with
`GATE_EXIT_CODE` when any gate fails.
"""

from __future__ import annotations

import math

GATE_EXIT_CODE = 3
LOWER_IS_BETTER = ("loss", "perplexity")


def _gate(name: str, value: float, threshold: float, op: str, metric: str | None = None) -> dict:
    ok = value >= threshold if op == ">=" else value <= threshold
    ok = bool(ok) and not math.isnan(value)
    return {
        "name": name,
        "metric": metric,
        "value": value,
        "threshold": threshold,
        "op": op,
        "rule": f"{'improvement' if name.startswith('improvement') else 'value'} {op} {threshold:g}"
        if metric
        else f"{op} {threshold:g}",
        "passed": ok,
    }


def evaluate_gates(report: dict, ec) -> list[dict]:
    """One entry per configured gate: name, metric, value, threshold, op, rule, passed."""
    gates = []
    base, tuned = report["base"], report["tuned"]
    nan = float("nan")
    for metric, need in ec.min_improvement.items():
        b, t = base.get(metric, nan), tuned.get(metric, nan)
        imp = b - t if metric in LOWER_IS_BETTER else t - b
        if math.isinf(b) and math.isinf(t):
            imp = nan
        gates.append(_gate(f"improvement:{metric}", imp, need, ">=", metric))
    for metric, need in ec.min_tuned.items():
        t = tuned.get(metric, nan)
        gates.append(_gate(f"tuned:{metric}", t, need, "<=" if metric in LOWER_IS_BETTER else ">=", metric))
    f = report.get("forgetting")
    if f:
        g = _gate("forgetting:general_perplexity_rise", f["relative_increase"], ec.max_forgetting, "<=")
        g["passed"] = not f["flagged"]
        gates.append(g)
    for kind, p in (report.get("probes") or {}).get("kinds", {}).items():
        g = _gate(f"probes:{kind}_pass_rate_drop", p["base"] - p["tuned"], ec.max_probe_drop, "<=")
        g["passed"] = not p["regressed"]
        gates.append(g)
    gates += lm_eval_gates(report.get("lm_eval") or {}, ec.lm_eval_max_drop)
    return gates


def lm_eval_gates(lm: dict, max_drop: dict[str, float]) -> list[dict]:
    """One gate per eval.lm_eval_max_drop entry and metric it covers, with "lm_eval" set to its
    'task/metric' (the report's table row); a key that matches no computed metric fails."""
    gates = []
    for key, most in max_drop.items():
        task, _, metric = key.partition("/")
        row = (lm.get("tasks", {}).get(task) or {}).get("metrics", {})
        picked = [m for m in row if not metric or m == metric]
        if not picked:
            g = _gate(f"lm_eval:{key}_drop", float("nan"), most, "<=")
            g.update(lm_eval=key, rule=f"drop <= {most:g}")
            gates.append(g)
        for m in picked:
            g = _gate(f"lm_eval:{task}/{m}_drop", row[m]["drop"], most, "<=")
            g.update(lm_eval=f"{task}/{m}", rule=f"drop <= {most:g}")
            gates.append(g)
    return gates
