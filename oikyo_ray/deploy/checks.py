"""What a deploy must pass before anything is promoted (Ray-free): the run's eval gates, then the
staging test's figures against `deploy.budgets`. Each miss is one line naming the figure."""

from __future__ import annotations

from oikyo_ray.config import Budgets


def gate_failures(version: dict, require_eval: bool) -> list[str]:
    """Why a registered version's evaluation does not allow a deploy ([] when it does)."""
    ev = version.get("eval")
    if ev is None:
        return ["the run has no eval report (eval/report.json)"] if require_eval else []
    if ev["passed"]:
        return []
    return [f"eval gate {name!r} failed" for name in ev["failed_gates"]] or ["the eval report did not pass"]


def budget_misses(figures: dict, budgets: Budgets) -> list[str]:
    """Which budgets the staging figures miss ([] when all are met)."""
    misses = []
    if figures["error_rate"] > budgets.max_error_rate:
        seen = "; ".join(figures["first_errors"])
        misses.append(
            f"error rate {figures['error_rate']:.1%} ({figures['errors']} of {figures['requests']}) is above "
            f"deploy.budgets.max_error_rate {budgets.max_error_rate:.1%}" + (f" (e.g. {seen})" if seen else "")
        )
    for key in ("p50_ms", "p99_ms"):
        limit = getattr(budgets, key)
        if limit is not None and (figures[key] is None or figures[key] > limit):
            got = "nothing answered" if figures[key] is None else f"{figures[key]:.0f} ms"
            misses.append(f"{key[:3]} latency {got} is above deploy.budgets.{key} {limit:g} ms")
    if budgets.min_tokens_per_s is not None and figures["tokens_per_s"] < budgets.min_tokens_per_s:
        floor = budgets.min_tokens_per_s
        misses.append(f"{figures['tokens_per_s']:.1f} tokens/s is below deploy.budgets.min_tokens_per_s {floor:g}")
    limit = budgets.max_cost_per_1m_tokens
    cost = figures["cost_per_1m_tokens"]
    if limit is not None and (cost is None or cost > limit):
        got = "no tokens answered" if cost is None else f"{cost:.2f}"
        misses.append(f"cost per 1M tokens {got} is above deploy.budgets.max_cost_per_1m_tokens {limit:g}")
    return misses
