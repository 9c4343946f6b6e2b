"""A canary's readout and its end (Ray-free): `oikyo ab report|promote|rollback NAME`.

The readout asks Prometheus (which scrapes the serving app's metrics, see docs/monitoring.md) for
each role's requests, errors and latency quantiles on the route over a window; Prometheus sums
the replicas and handles counter resets, so none of that is redone here. Error rates get Wilson
95% intervals; the challenger is "worse" when a one-sided two-proportion z-test says its error
rate is higher, or its p99 is over `latency_ratio` times the champion's. Where users rated
answers (POST /v1/feedback), each role's share of positive ratings (of positive + negative) is
compared the same way: a challenger rated lower is worse, whatever its latency.
"""

from __future__ import annotations

import math

import httpx

from oikyo_ray.errors import OikyoError, RegistryError
from oikyo_ray.registry import registry
from oikyo_ray.registry.registry import CHALLENGER, CHAMPION, DEFAULT_TRAFFIC

Z95 = 1.959964  # two-sided 95% for the intervals
Z_ONE_SIDED = 1.644854  # one-sided 95% for "the challenger errs more"


def query(prometheus: str, promql: str) -> list[dict]:
    """An instant query's result vector ({"metric": labels, "value": [t, "x"]} each)."""
    try:
        r = httpx.get(f"{prometheus.rstrip('/')}/api/v1/query", params={"query": promql}, timeout=30)
        body = r.json()
    except (httpx.HTTPError, ValueError) as e:
        raise OikyoError(f"cannot query Prometheus at {prometheus}: {e}", hint="pass --prometheus URL") from None
    if body.get("status") != "success":
        raise OikyoError(f"Prometheus refused {promql!r}: {body.get('error')}")
    return body["data"]["result"]


def readout(prometheus: str, route: str, window: str) -> dict[str, dict]:
    """Per role (champion, challenger, ...): requests, errors, error rate with its interval, p50/p99 ms."""
    sel = f'route="{route}"'
    counts = query(prometheus, f"sum by (role, status) (increase(ray_oikyo_requests_total{{{sel}}}[{window}]))")
    roles: dict[str, dict] = {}
    for row in counts:
        role, n = row["metric"].get("role", "-"), float(row["value"][1])
        r = roles.setdefault(role, {"requests": 0.0, "errors": 0.0})
        r["requests"] += n
        if row["metric"].get("status", "").startswith("5"):
            r["errors"] += n
    for q in (50, 99):
        promql = (
            f"histogram_quantile({q / 100}, sum by (role, le) "
            f'(increase(ray_oikyo_request_latency_ms_bucket{{{sel},status="200"}}[{window}])))'
        )
        for row in query(prometheus, promql):
            value = float(row["value"][1])
            if row["metric"].get("role") in roles and math.isfinite(value):
                roles[row["metric"]["role"]][f"p{q}_ms"] = value
    for r in roles.values():
        n, k = round(r["requests"]), round(r["errors"])  # increase() extrapolates: whole requests
        r.update(requests=n, errors=k, error_rate=k / n if n else 0.0, error_ci=wilson(k, n))
    rated = query(prometheus, f"sum by (role, verdict) (increase(ray_oikyo_feedback_total{{{sel}}}[{window}]))")
    for row in rated:
        role = row["metric"].get("role", "-")
        if role in roles:
            votes = roles[role].setdefault("feedback", {"positive": 0, "negative": 0, "neutral": 0})
            votes[row["metric"].get("verdict", "neutral")] = round(float(row["value"][1]))
    for r in roles.values():
        if "feedback" in r:
            pos, neg = r["feedback"]["positive"], r["feedback"]["negative"]
            r.update(
                rated=pos + neg,
                positive_rate=pos / (pos + neg) if pos + neg else 0.0,
                positive_ci=wilson(pos, pos + neg),
            )
    return roles


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (sound at 0 errors and small n, unlike k/n +- ...)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def above(k1: int, n1: int, k2: int, n2: int) -> bool:
    """One-sided two-proportion z-test at 95%: k1/n1 is above k2/n2."""
    if not n1 or not n2:
        return False
    pooled = (k1 + k2) / (n1 + n2)
    if pooled in (0.0, 1.0):
        return False
    z = (k1 / n1 - k2 / n2) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return z > Z_ONE_SIDED


def errs_more(chall: dict, champ: dict) -> bool:
    """The challenger's error rate is above the champion's."""
    return above(chall["errors"], chall["requests"], champ["errors"], champ["requests"])


def rated_lower(chall: dict, champ: dict) -> bool:
    """The challenger's share of negative ratings is above the champion's."""
    if not chall.get("rated") or not champ.get("rated"):
        return False
    neg = lambda r: r["feedback"]["negative"]  # noqa: E731
    return above(neg(chall), chall["rated"], neg(champ), champ["rated"])


def recommend(roles: dict[str, dict], min_requests: int, latency_ratio: float) -> tuple[str, str]:
    """("promote" | "keep" | "roll back", why) for the challenger against the champion."""
    champ, chall = roles.get(CHAMPION), roles.get(CHALLENGER)
    if champ is None or chall is None:
        return "keep", "no traffic reached both the champion and the challenger in the window"
    if errs_more(chall, champ):
        return "roll back", (
            f"the challenger fails more: {chall['error_rate']:.2%} vs {champ['error_rate']:.2%} (one-sided z-test, 95%)"
        )
    if rated_lower(chall, champ):
        return "roll back", (
            f"users rate the challenger lower: {chall['positive_rate']:.0%} positive of {chall['rated']} ratings vs "
            f"{champ['positive_rate']:.0%} of {champ['rated']} (one-sided z-test, 95%)"
        )
    if chall.get("p99_ms") and champ.get("p99_ms") and chall["p99_ms"] > latency_ratio * champ["p99_ms"]:
        return "roll back", (
            f"the challenger's p99 {chall['p99_ms']:.0f} ms is over {latency_ratio:g}x the champion's "
            f"{champ['p99_ms']:.0f} ms"
        )
    if min(chall["requests"], champ["requests"]) < min_requests:
        return "keep", f"fewer than {min_requests} requests on a variant: not enough to decide yet"
    why = "the challenger fails no more than the champion and its p99 is within bounds"
    return "promote", why + (", and users rate it no lower" if chall.get("rated") and champ.get("rated") else "")


def report_text(model: str, state: registry.ModelState, roles: dict[str, dict], verdict: tuple[str, str]) -> str:
    lines = [f"# A/B: {model}", "", "role        version  requests  errors  error rate (95% CI)        p50 ms  p99 ms"]
    for role, r in sorted(roles.items()):
        version = state.aliases.get(role)
        lo, hi = r["error_ci"]
        lines.append(
            f"{role:<11} {'v' + str(version) if version else '-':<8} {r['requests']:>8}  {r['errors']:>6}  "
            f"{r['error_rate']:>7.2%} ({lo:.2%}-{hi:.2%})   {_ms(r.get('p50_ms')):>7} {_ms(r.get('p99_ms')):>7}"
        )
    rated = {role: r for role, r in sorted(roles.items()) if r.get("feedback")}
    if not rated:
        lines += ["", "quality signals: no feedback recorded for this route (POST /v1/feedback)"]
    else:
        lines += ["", "role        positive  negative  neutral  positive share (95% CI)"]
        for role, r in rated.items():
            f, (lo, hi) = r["feedback"], r["positive_ci"]
            lines.append(
                f"{role:<11} {f['positive']:>8}  {f['negative']:>8}  {f['neutral']:>7}  "
                f"{r['positive_rate']:>6.0%} ({lo:.0%}-{hi:.0%})"
            )
    lines += ["", f"recommendation: {verdict[0]} ({verdict[1]})"]
    return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def promote(root: str, model: str) -> int:
    """The challenger becomes the champion and takes all the traffic; returns its version."""
    state = registry.load(root, model)
    if CHALLENGER not in state.aliases:
        raise RegistryError(f"model {model!r} has no {CHALLENGER} to promote", hint="see `oikyo registry show`")
    version = state.aliases[CHALLENGER]
    registry.set_alias(root, model, CHAMPION, version, expect=state.aliases.get(CHAMPION))
    _end_canary(root, model, state, version)
    return version


def rollback(root: str, model: str) -> int:
    """End a canary (the champion takes all the traffic back) or, with none running, move the
    champion back to the version it pointed to before; returns the version now serving."""
    state = registry.load(root, model)
    if CHALLENGER in state.aliases:
        _end_canary(root, model, state, state.aliases[CHALLENGER])
        return state.aliases[CHAMPION]
    moves = [e for e in state.history if e["kind"] == "alias" and e["alias"] == CHAMPION]
    if not moves or moves[-1]["previous"] is None:
        raise RegistryError(f"model {model!r}: no canary running and no earlier {CHAMPION} to roll back to")
    previous = moves[-1]["previous"]
    registry.set_alias(root, model, CHAMPION, previous, expect=state.aliases.get(CHAMPION))
    return previous


def _end_canary(root: str, model: str, state: registry.ModelState, challenger: int) -> None:
    # traffic first: from here on no request is routed to the challenger alias, then it goes
    registry.set_traffic(root, model, dict(DEFAULT_TRAFFIC), expect=state.traffic)
    registry.set_alias(root, model, CHALLENGER, None, expect=challenger)
