"""What a run cost: device-hours of the training workers priced by `cost.*`, added up over resumed
sessions in lineage.json, and shown by `oikyo runs compare`."""

import json

import pytest

from oikyo_ray.config import load_config
from oikyo_ray.runs.compare import compare_runs, format_comparison
from oikyo_ray.runs.cost import add_cost, train_cost


def test_training_cost_counts_each_workers_devices():
    cfg = load_config(None, ["scaling.num_workers=4", "scaling.cpus_per_worker=2", "cost.cpu_hour=0.1"])
    c = train_cost(cfg.scaling, 1800, cfg.cost)
    assert (c["cpu_hours"], c["gpu_hours"], c["currency"]) == (4.0, 0.0, "USD") and c["cost"] == pytest.approx(0.4)
    gpu = load_config(None, ["scaling.num_workers=2", "scaling.use_gpu=true", "cost.gpu_hour=3", "cost.cpu_hour=0"])
    assert train_cost(gpu.scaling, 3600, gpu.cost)["cost"] == pytest.approx(6.0)


def test_resumed_sessions_add_up_and_compare_shows_them(tmp_path):
    cfg = load_config(None, ["scaling.num_workers=1", "scaling.cpus_per_worker=1", "cost.cpu_hour=1"])
    runs = []
    for name, sessions in (("a", [3600, 1800]), ("b", [])):
        run = tmp_path / name
        (run / "eval").mkdir(parents=True)
        (run / "lineage.json").write_text(json.dumps({"run": name}))
        report = {"tuned": {"loss": 1.0}, "base": {"loss": 2.0}, "metrics": [], "passed": True}
        (run / "eval" / "report.json").write_text(json.dumps({**report, "tuned": {**report["tuned"], "n": 3}}))
        for seconds in sessions:
            add_cost(run / "lineage.json", train_cost(cfg.scaling, seconds, cfg.cost))
        runs.append(run)
    cost = json.loads((runs[0] / "lineage.json").read_text())["cost"]
    assert cost["train_seconds"] == 5400 and cost["cost"] == pytest.approx(1.5)
    rows = {r["metric"]: r["cells"] for r in compare_runs(runs)["rows"]}
    assert rows["train cost"][0][0] == pytest.approx(1.5) and rows["train CPU-hours"][0][0] == pytest.approx(1.5)
    assert rows["train cost"][1][0] != rows["train cost"][1][0]  # a run from before costs were kept: NaN
    assert "| train cost |" in format_comparison(compare_runs(runs))
