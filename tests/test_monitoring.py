"""The shipped alert rules, Alertmanager config and Grafana dashboard, checked by the real tools
(`promtool`, `amtool`), and against the metrics the Serve app really exports. The end-to-end
alert (Serve -> Prometheus -> Alertmanager -> webhook) is in test_serve_app.py."""

import json
import re
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import ROOT, os_tool

MON = ROOT / "monitoring"
RULES, RULE_TESTS = MON / "prometheus" / "oikyo-rules.yml", MON / "prometheus" / "oikyo-rules.test.yml"
DASHBOARD = MON / "grafana" / "oikyo-serving.json"
# what Ray Serve itself exports (ray/serve/_private); the rest must be defined in oikyo's code
RAY_SERVE_METRICS = {"ray_serve_deployment_replica_starts_total", "ray_serve_deployment_replica_healthy"}


def _run(*cmd, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd)


def exported_metrics() -> set[str]:
    """Every series name oikyo's Serve app exports: Ray prefixes `ray_`, counters get `_total`,
    histograms `_bucket`, `_sum` and `_count`."""
    src = (ROOT / "oikyo_ray" / "serve" / "ray_serve.py").read_text()
    names = set()
    for kind, name in re.findall(r"metrics\.(Counter|Histogram|Gauge)\(\s*\"(\w+)\"", src):
        base = f"ray_{name}"
        names |= {f"{base}_total"} if kind == "Counter" else {f"{base}_{s}" for s in ("bucket", "sum", "count")}
        names |= {base} if kind == "Gauge" else set()
    return names | RAY_SERVE_METRICS


def _series_names(expr: str) -> set[str]:
    return set(re.findall(r"\bray_[a-z_]+", expr))


def test_rules_are_valid_and_their_unit_tests_pass():
    promtool = os_tool("promtool")
    r = _run(promtool, "check", "rules", str(RULES))
    assert r.returncode == 0 and "SUCCESS: 9 rules found" in r.stdout, r.stdout + r.stderr
    r = _run(promtool, "test", "rules", str(RULE_TESTS))
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize(
    "old, new",
    [
        (
            "> 0.05\n        for: 5m\n        labels:\n          severity: page",
            "> 0.5\n        for: 5m\n        labels:\n          severity: page",
        ),
        ("for: 10m", "for: 30m"),
        ("[15m]", "[1m]"),
        ("          ) + 0.01\n", "          ) + 0.5\n"),
    ],
    ids=["error-threshold", "latency-for", "replica-window", "canary-ratio"],
)
def test_rule_unit_tests_catch_a_changed_rule(tmp_path, old, new):
    promtool = os_tool("promtool")
    text = RULES.read_text()
    assert old in text
    (tmp_path / RULES.name).write_text(text.replace(old, new, 1))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    r = _run(promtool, "test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert r.returncode != 0 and "FAILED" in r.stdout + r.stderr


def test_alertmanager_config_is_valid():
    r = _run(os_tool("amtool"), "check-config", str(MON / "alertmanager.yml"))
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_rules_and_dashboard_use_only_exported_metrics():
    exported = exported_metrics()
    assert {"ray_oikyo_requests_total", "ray_oikyo_request_latency_ms_bucket"} <= exported
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    used = set().union(*(_series_names(r["expr"]) for r in rules))
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    for e in exprs:
        used |= _series_names(e)
    assert used and used <= exported, f"not exported by the app: {sorted(used - exported)}"
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"]) and dash["uid"] == "oikyo-serving"
    assert all("$application" in e for e in exprs)  # every panel follows the application picker


def test_kubernetes_rules_are_the_shipped_rules():
    """k8s/monitoring/prometheusrule.yaml is what monitoring/prometheusrule.py writes from the
    rules file (so it cannot drift), and promtool accepts its groups."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("prometheusrule", MON / "prometheusrule.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    committed = ROOT / "k8s" / "monitoring" / "prometheusrule.yaml"
    assert committed.read_text() == gen.manifest(), "run `python monitoring/prometheusrule.py`"
    doc = yaml.safe_load(committed.read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert doc["spec"] == yaml.safe_load(RULES.read_text())


def test_podmonitor_scrapes_the_serving_pods():
    from tests.test_k8s_manifests import _containers, _one, _pod_labels

    pm = yaml.safe_load((ROOT / "k8s" / "monitoring" / "podmonitor.yaml").read_text())
    service = _one("RayService", "oikyo-serve")
    want = pm["spec"]["selector"]["matchLabels"]
    # KubeRay adds ray.io/is-ray-node to every Ray pod; the rest must be on the templates
    for labels in _pod_labels(service):
        assert {k: v for k, v in want.items() if k != "ray.io/is-ray-node"}.items() <= labels.items()
    ports = {p["name"] for c in _containers(service) for p in c.get("ports", [])}
    assert all(e["port"] in ports for e in pm["spec"]["podMetricsEndpoints"]), ports
