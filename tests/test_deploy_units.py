"""The Ray-free parts of gated deploys: traffic splits in the registry and their routes, the
staging load's plan and figures, gates and budgets, and the A/B statistics and alias moves."""

import asyncio
import json
import re

import pytest

from oikyo_ray.config import load_config
from oikyo_ray.deploy import ab
from oikyo_ray.deploy.checks import budget_misses, gate_failures
from oikyo_ray.deploy.load import hourly_price, plan, summarize
from oikyo_ray.errors import ConfigError, RegistryConflict, RegistryError
from oikyo_ray.registry import registry
from oikyo_ray.serve.published import Published, parse_variant, route_of
from tests.test_registry import _run

BOT = "bot"


@pytest.fixture
def root(tmp_path):
    return str(tmp_path / "root")


def _versions(root, tmp_path, n):
    for i in range(n):
        registry.register(root, BOT, _run(tmp_path, f"run-{i}"))


def test_traffic_split_routes_aliases_to_versions(root, tmp_path):
    _versions(root, tmp_path, 3)
    assert route_of(registry.load(root, BOT)) is None  # registered, no champion yet: not served
    registry.set_alias(root, BOT, "champion", 1)
    assert route_of(registry.load(root, BOT)).weights == {"bot-v1": 100.0}
    registry.set_alias(root, BOT, "challenger", 3)
    registry.set_traffic(root, BOT, {"champion": 80, "challenger": 20})
    route = route_of(registry.load(root, BOT))
    assert route.weights == {"bot-v1": 80, "bot-v3": 20} and route.roles == {
        "bot-v1": "champion",
        "bot-v3": "challenger",
    }
    registry.set_alias(root, BOT, "challenger", None)  # the split names a removed alias: champion takes all
    assert route_of(registry.load(root, BOT)).weights == {"bot-v1": 80}
    registry.set_alias(root, BOT, "challenger", 1)  # two aliases on one version: one variant
    assert route_of(registry.load(root, BOT)).weights == {"bot-v1": 100}
    assert parse_variant("bot-v3", [BOT]) == (BOT, 3)
    assert parse_variant("bot-v3", ["other"]) is None and parse_variant("bot", [BOT]) is None


def test_traffic_changes_are_checked_and_race_safe(root, tmp_path):
    _versions(root, tmp_path, 1)
    with pytest.raises(RegistryError, match="must be >= 0"):
        registry.set_traffic(root, BOT, {"champion": -1})
    with pytest.raises(RegistryError, match="must not all be 0"):
        registry.set_traffic(root, BOT, {"champion": 0})
    with pytest.raises(RegistryError, match="invalid alias"):
        registry.set_traffic(root, BOT, {"../x": 1})
    seen = registry.load(root, BOT).traffic
    registry.set_traffic(root, BOT, {"champion": 90, "challenger": 10})
    with pytest.raises(RegistryConflict, match="nothing was written"):
        registry.set_traffic(root, BOT, {"champion": 50, "challenger": 50}, expect=seen)
    assert registry.load(root, BOT).traffic == {"champion": 90, "challenger": 10}


def test_staging_results_stay_with_their_version(root, tmp_path):
    _versions(root, tmp_path, 2)
    registry.record_staging(root, BOT, 2, {"passed": False, "misses": ["p99"], "figures": {"p99_ms": 9.0}})
    s = registry.load(root, BOT)
    assert s.versions[1]["staging"] == [] and s.versions[2]["staging"][0]["misses"] == ["p99"]
    with pytest.raises(RegistryError, match="no version or alias '7'"):
        registry.record_staging(root, BOT, 7, {"passed": True})


def test_published_view_refreshes_and_survives_an_unreadable_registry(root, tmp_path):
    _versions(root, tmp_path, 2)
    registry.set_alias(root, BOT, "champion", 1)
    view = Published(root, [BOT], poll_s=3600)
    assert asyncio.run(view.route(BOT)).weights == {"bot-v1": 100.0}
    assert asyncio.run(view.route("other")) is None
    registry.set_alias(root, BOT, "champion", 2)
    assert asyncio.run(view.route(BOT)).weights == {"bot-v1": 100.0}  # within the poll interval: last view
    view.refresh()
    assert view.routes[BOT].weights == {"bot-v2": 100.0}
    log = tmp_path / "root" / "registry" / BOT / "log"
    (log / "00000099.json").write_text("{}")  # a gap: the log cannot be read
    view.refresh()
    assert view.routes[BOT].weights == {"bot-v2": 100.0}  # the last good view keeps serving


def test_load_plan_is_seeded_and_within_the_profile():
    cfg = load_config(
        None, ["deploy.load.rate_per_s=20", "deploy.load.duration_s=5", "deploy.load.prompt_tokens=[3,9]"]
    )
    a, b = plan(cfg.deploy.load, 100, {0, 1, 2}), plan(cfg.deploy.load, 100, {0, 1, 2})
    assert a == b and 60 <= len(a) <= 140  # Poisson: 100 expected
    assert all(3 <= len(p.prompt) <= 9 and not {0, 1, 2} & set(p.prompt) for p in a)
    assert all(8 <= p.max_tokens <= 32 for p in a) and all(x.at_s < y.at_s < 5 for x, y in zip(a, a[1:]))
    with pytest.raises(ConfigError, match="prompt_tokens"):
        load_config(None, ["deploy.load.prompt_tokens=[9,3]"])


def test_figures_cost_and_budgets():
    records = [
        {"status": 200, "latency_ms": float(ms), "tokens": 10, "done_s": 1.0, "error": None} for ms in range(1, 100)
    ]
    records.append({"status": 500, "latency_ms": 5.0, "tokens": 0, "done_s": 2.0, "error": "boom"})
    cfg = load_config(None, ["serve.cpus_per_replica=2", "serve.min_replicas=2", "cost.cpu_hour=0.5"])
    price = hourly_price(cfg.serve, cfg.cost.cpu_hour, cfg.cost.gpu_hour)
    f = summarize(records, 10.0, price)
    assert price == 2.0 and f["requests"] == 100 and f["errors"] == 1 and f["error_rate"] == 0.01
    assert f["p50_ms"] == 50.0 and 98 < f["p99_ms"] < 99 and f["tokens_per_s"] == 99.0
    assert f["cost_per_1m_tokens"] == pytest.approx(2.0 / (99 * 3600) * 1e6)
    b = load_config(None, ["deploy.budgets.p99_ms=50", "deploy.budgets.max_cost_per_1m_tokens=1"]).deploy.budgets
    misses = budget_misses(f, b)
    assert len(misses) == 3 and "error rate 1.0% (1 of 100)" in misses[0] and "500: boom" in misses[0]
    assert "p99 latency 98 ms is above deploy.budgets.p99_ms 50" in misses[1] and "cost per 1M" in misses[2]
    relaxed = load_config(None, ["deploy.budgets.max_error_rate=0.05"]).deploy.budgets
    assert budget_misses(f, relaxed) == []
    nothing = summarize([{**records[-1]}], 10.0, price)
    assert nothing["p99_ms"] is None and "nothing answered" in budget_misses(nothing, relaxed)[1]


def test_eval_gates_decide_first(tmp_path):
    passed = registry.run_summary(_run(tmp_path, "ok"))
    failed = registry.run_summary(_run(tmp_path, "bad", passed=False))
    assert gate_failures(passed, True) == [] and gate_failures(failed, True) == ["eval gate 'tuned:exact_match' failed"]
    assert gate_failures({"eval": None}, True) == ["the run has no eval report (eval/report.json)"]
    assert gate_failures({"eval": None}, False) == []


def test_wilson_interval_and_the_recommendation():
    lo, hi = ab.wilson(0, 100)
    assert lo == 0 and hi == pytest.approx(0.037, abs=1e-3)  # the textbook value for 0 of 100
    lo, hi = ab.wilson(10, 100)
    assert (round(lo, 3), round(hi, 3)) == (0.055, 0.174)

    def role(n, k, p99):
        return {"requests": n, "errors": k, "error_rate": k / n, "p99_ms": p99}

    assert ab.recommend({"champion": role(500, 5, 100)}, 100, 1.25)[0] == "keep"
    assert ab.recommend({"champion": role(500, 5, 100), "challenger": role(100, 12, 100)}, 100, 1.25)[0] == "roll back"
    assert ab.recommend({"champion": role(500, 5, 100), "challenger": role(100, 1, 200)}, 100, 1.25)[0] == "roll back"
    assert ab.recommend({"champion": role(500, 5, 100), "challenger": role(40, 0, 100)}, 100, 1.25)[0] == "keep"
    verdict = ab.recommend({"champion": role(500, 5, 100), "challenger": role(120, 2, 110)}, 100, 1.25)
    assert verdict[0] == "promote"


def test_ratings_decide_against_a_challenger_users_like_less():
    def role(n, pos, neg):
        rated = pos + neg
        return {
            "requests": n,
            "errors": 0,
            "error_rate": 0.0,
            "p99_ms": 100,
            "error_ci": ab.wilson(0, n),
            "feedback": {"positive": pos, "negative": neg, "neutral": 1},
            "rated": rated,
            "positive_rate": pos / rated,
            "positive_ci": ab.wilson(pos, rated),
        }

    worse = ab.recommend({"champion": role(500, 160, 40), "challenger": role(200, 30, 30)}, 100, 1.25)
    assert worse[0] == "roll back" and "users rate the challenger lower: 50% positive of 60" in worse[1]
    same = ab.recommend({"champion": role(500, 160, 40), "challenger": role(200, 50, 12)}, 100, 1.25)
    assert same[0] == "promote" and "users rate it no lower" in same[1]
    state = registry.ModelState(name="bot", versions={}, aliases={"champion": 1, "challenger": 2})
    text = ab.report_text("bot", state, {"champion": role(500, 160, 40), "challenger": role(200, 30, 30)}, worse)
    assert "challenger        30        30        1     50% (38%-62%)" in text and "no feedback" not in text
    plain = {"champion": {k: v for k, v in role(500, 1, 1).items() if k not in ("feedback", "rated")}}
    assert "no feedback recorded" in ab.report_text("bot", state, plain, ("keep", "-"))


def test_promote_and_rollback_move_aliases_and_traffic(root, tmp_path):
    _versions(root, tmp_path, 3)
    registry.set_alias(root, BOT, "champion", 1)
    with pytest.raises(RegistryError, match="no challenger to promote"):
        ab.promote(root, BOT)
    with pytest.raises(RegistryError, match="no earlier champion"):
        ab.rollback(root, BOT)
    registry.set_alias(root, BOT, "challenger", 2)
    registry.set_traffic(root, BOT, {"champion": 80, "challenger": 20})
    assert ab.rollback(root, BOT) == 1  # ends the canary
    s = registry.load(root, BOT)
    assert s.aliases == {"champion": 1} and s.traffic == {"champion": 100.0}
    registry.set_alias(root, BOT, "challenger", 3)
    registry.set_traffic(root, BOT, {"champion": 80, "challenger": 20})
    assert ab.promote(root, BOT) == 3
    s = registry.load(root, BOT)
    assert s.aliases == {"champion": 3} and s.traffic == {"champion": 100.0}
    assert ab.rollback(root, BOT) == 1  # no canary: the champion moves back
    assert registry.load(root, BOT).aliases == {"champion": 1}
    assert json.loads(json.dumps(s.history))  # every entry stays plain JSON


@pytest.mark.parametrize(
    "override, words",
    [
        ("serve.registry_models=[../x]", "is not a model name"),
        ("serve.registry_models=[base]", "already a route's, an adapter's or the base's name"),
        ("deploy.budgets.max_error_rate=2", "max_error_rate"),
        ("deploy.load.rate_per_s=0", "rate_per_s"),
    ],
)
def test_bad_deploy_and_registry_serving_config_names_the_field(override, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(None, [override])


def test_deploy_job_refuses_a_run_that_fails_its_gates(tmp_path):
    """jobs/deploy.py (the RayJob's entrypoint) runs `oikyo deploy`: the gates decide before Ray."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    bad, root = _run(tmp_path, "bad", passed=False), tmp_path / "root"
    cmd = [sys.executable, "jobs/deploy.py", "--config", "serve/serve_demo.yaml", "--run-dir", bad]
    r = subprocess.run(
        [*cmd, "--model", "bot", f"run.root={root}"], cwd=repo, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 1 and "eval gate 'tuned:exact_match' failed" in r.stderr, r.stderr[-2000:]
    assert registry.list_models(str(root)) == [] and not root.exists()
