"""Sweeps: bad search spaces fail before Ray; budgets count steps as training does (packed blocks
with data.packing); ASHA on a real local Ray stops weak trials, promotes the best, and resumes
after the driver dies."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from oikyo_ray.cli import main
from oikyo_ray.config import load_config
from oikyo_ray.errors import ConfigError
from oikyo_ray.sweep.budget import max_t
from oikyo_ray.sweep.report import trial_rows
from oikyo_ray.sweep.space import validate_space, with_params
from oikyo_ray.train.steps import total_steps

try:  # tests/ may or may not be a package
    from tests.test_train_util import make_run, metrics
except ImportError:
    from test_train_util import make_run, metrics

ROOT = Path(__file__).resolve().parent.parent
SWEEP = ROOT / "jobs/configs/sweep_demo.yaml"


@pytest.mark.parametrize(
    "space, words",
    [
        ("{}", "sweep.space is empty"),
        ("{train.lrr: {type: loguniform, low: 1e-4, high: 1e-2}}", "unknown config field 'train.lrr'"),
        ("{train: {type: choice, values: [1]}}", "is a section"),
        ("{train.lr.x: {type: choice, values: [1]}}", "is a field, not a section"),
        ("{run.name: {type: choice, values: [a]}}", "cannot be swept"),
        ("{method.lora.r: {type: choice, values: [8, sixteen]}}", "method.lora.r: value 'sixteen' is invalid"),
        ("{method.lora.r: {type: randint, low: 0, high: 4}}", "method.lora.r: value 0 is invalid"),
        ("{train.epochs: {type: choice, values: []}}", "non-empty"),
        ("{train.lr: {type: uniform, low: 1, high: 1}}", "low < high"),
        ("{train.lr: {type: loguniform, low: 0, high: 1}}", "low > 0"),
        ("{train.lr: {type: normal, low: 0, high: 1}}", "sweep.space.train.lr.type"),
    ],
)
def test_bad_search_spaces_name_the_field(space, words):
    with pytest.raises(ConfigError) as e:
        validate_space(load_config(SWEEP, [f"sweep.space={space}"]))
    assert words in str(e.value)


def test_bad_space_fails_in_cli_before_ray(capsys):
    code = main(["sweep", str(SWEEP), "sweep.space={train.lrr: {type: choice, values: [1]}}"])
    assert code == 2 and "train.lrr" in capsys.readouterr().err


def test_trial_params_land_in_the_config():
    cfg = load_config(SWEEP)
    t = with_params(cfg.model_dump(mode="json"), {"train.lr": 0.01, "method.lora.r": 4})
    assert t.train.lr == 0.01 and t.method.lora.r == 4 and t.data == cfg.data


# 64 rows packed into 10 blocks: 5 steps of 2 blocks, where 2 rows a step would make 32
PACKED = ["data.packing=true", "train.batch_size=2", "train.epochs=1", "train.eval_every=2"]


def test_packed_trial_that_ran_its_steps_is_completed(tmp_path):
    """A trial's budget counts packed blocks, as training does: the trial that reported its 5th
    and last step completed (counted in rows, its budget would be 32 and it would look stopped)."""
    cfg = load_config(SWEEP, PACKED)
    manifest = {"counts": {"train": 64, "val": 16, "test": 8}, "packing": {"blocks": 10}}
    trial = tmp_path / "trials" / "abcde_00000"
    trial.mkdir(parents=True)
    (trial / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "val_loss": 2.0 - s / 10}) + "\n" for s in (2, 4, 5))
    )
    result = SimpleNamespace(
        metrics={"trial_id": "abcde_00000"}, config={"params": {"train.lr": 0.003}}, path=str(trial), error=None
    )
    (row,) = trial_rows(cfg, tmp_path, [result], manifest)
    assert (row["status"], row["steps"], row["budget"]) == ("completed", 5, 5)
    assert max_t(cfg, manifest) == 5 and total_steps(cfg.train, 64) == 32


def _trial_result(tmp_path: Path, tid: str, lr: float, reports: list[dict]) -> SimpleNamespace:
    trial = tmp_path / "trials" / tid
    trial.mkdir(parents=True)
    (trial / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reports))
    return SimpleNamespace(metrics={"trial_id": tid}, config={"params": {"train.lr": lr}}, path=str(trial), error=None)


def test_pareto_front_of_completed_trials(tmp_path):
    """Quality (val_loss, min) against speed (tokens/s, max), each at the trial's last report:
    a dominated trial and an early-stopped one are off the front, the trade-offs are on it."""
    cfg = load_config(SWEEP, ["train.max_steps=4", "sweep.objectives=[{metric: tokens_per_s, mode: max}]"])
    manifest = {"counts": {"train": 64, "val": 16, "test": 8}}

    def done(v, tps):  # a first report that the last one overrides, then the last
        return [{"step": 2, "val_loss": 9.0, "tokens_per_s": 1.0}, {"step": 4, "val_loss": v, "tokens_per_s": tps}]

    grid = [
        _trial_result(tmp_path, "aaaaa_00000", 1e-3, done(1.0, 100.0)),  # best quality
        _trial_result(tmp_path, "aaaaa_00001", 2e-3, done(2.0, 300.0)),  # fastest
        _trial_result(tmp_path, "aaaaa_00002", 3e-3, done(2.5, 200.0)),  # worse than 00001 on both
        _trial_result(tmp_path, "aaaaa_00003", 4e-3, [{"step": 2, "val_loss": 0.5, "tokens_per_s": 900.0}]),
    ]
    rows = {r["trial"]: r for r in trial_rows(cfg, tmp_path, grid, manifest)}
    assert {t: (r["status"], r["pareto"]) for t, r in rows.items()} == {
        "aaaaa_00000": ("completed", "yes"),
        "aaaaa_00001": ("completed", "yes"),
        "aaaaa_00002": ("completed", ""),
        "aaaaa_00003": ("early-stopped", ""),
    }
    assert rows["aaaaa_00001"]["last_tokens_per_s"] == 300.0
    assert "pareto" not in trial_rows(load_config(SWEEP, ["train.max_steps=4"]), tmp_path, grid[:1], manifest)[0]


@pytest.mark.parametrize(
    "objectives, words",
    [
        ("[{metric: val_loss, mode: min}]", "not sweep.metric (val_loss) again"),
        ("[{metric: loss, mode: min}, {metric: loss, mode: max}]", "each metric once"),
        ("[{metric: cost, mode: min}]", "sweep.objectives.0.metric"),
        ("[{metric: loss}]", "sweep.objectives.0.mode"),
    ],
)
def test_bad_objectives_name_the_field(objectives, words):
    with pytest.raises(ConfigError, match="sweep") as e:
        load_config(SWEEP, [f"sweep.objectives={objectives}"])
    assert words in str(e.value)


def test_optuna_gets_every_objective_and_asha_the_first():
    from oikyo_ray.sweep.ray_tune import _asha, _search

    cfg = load_config(SWEEP, ["sweep.search=optuna", "sweep.objectives=[{metric: tokens_per_s, mode: max}]"])
    searcher = _search(cfg, 1).searcher
    assert (searcher.metric, searcher.mode) == (["val_loss", "tokens_per_s"], ["min", "max"])
    asha = _asha(cfg, {"counts": {"train": 64, "val": 16, "test": 8}})
    assert (asha.metric, asha._mode) == ("val_loss", "min")
    single = _search(load_config(SWEEP, ["sweep.search=optuna"]), 1).searcher
    assert (single.metric, single.mode) == ("val_loss", "min")


@pytest.mark.slow
@pytest.mark.ray
def test_packed_sweep_budget_is_the_steps_training_runs(ray_session, tiny_model, cache_dir, tmp_path):
    """ASHA's max_t for a packed sweep is the number of steps fit() then trains on those blocks."""
    from oikyo_ray.train.ray_train import fit

    cfg, run, man = make_run(
        tmp_path,
        tiny_model,
        cache_dir,
        ["scaling.num_workers=1", "data.max_length=64", "data.pack_length=256", *PACKED],
    )
    budget = max_t(cfg, man)
    assert budget != total_steps(cfg.train, man["counts"]["train"])  # packing changes the count
    fit(cfg, run, str(tiny_model), man, log=lambda s: None)
    assert metrics(run)[-1]["step"] == budget


def _sweep_args(root: Path, cache_dir: Path, name: str) -> list[str]:
    # lr 1e-5 cannot learn in 60 steps, 3e-3 can: ASHA has something to stop
    return [
        str(SWEEP),
        f"run.root={root}",
        f"run.name={name}",
        f"model.cache_dir={cache_dir}",
        "train.epochs=3",
        "train.eval_every=10",
        "sweep.grace_period=10",
        "sweep.num_samples=2",  # with seed 1: lr 3e-3, then 1e-5 for ASHA to stop
        "sweep.space={train.lr: {type: choice, values: [0.003, 0.00001]}}",
        "sweep.seed=1",
        "eval.max_samples=8",
        "sweep.max_concurrent_trials=1",
    ]  # serial: ASHA decisions are deterministic


@pytest.mark.slow
@pytest.mark.ray
def test_asha_sweep_survives_its_driver_and_promotes_the_best(ray_session, cache_dir, tmp_path):
    """One sweep, two trials (lr 3e-3, then 1e-5): the driver is killed while the first trial
    trains; `--resume` finishes it, ASHA stops the weak trial at its first rung, and the best
    (the completed 3e-3 trial) is promoted with lineage and evaluated. (One sweep for both: each
    trial costs Ray Train's start-up, the part of a sweep test that does not shrink.)"""
    args = _sweep_args(tmp_path, cache_dir, "s")
    cmd = [sys.executable, "-m", "oikyo_ray.cli", "sweep", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    sweep, deadline = tmp_path / "s", time.time() + 300
    # killed once the first trial has started (its config is written before Ray Train starts): a
    # later kill on a fast machine let that trial finish before its actors died, so the resumed
    # Tune never saw its results and ASHA had nothing to stop the weak trial against
    while time.time() < deadline and not list((sweep / "trials").glob("*/config.yaml")):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-sweep
    proc.wait()
    assert not (sweep / "best.json").exists()
    assert main(["sweep", *args]) == 2  # exists: must ask for --resume
    assert main(["sweep", *args, "--resume"]) == 0

    best = json.loads((sweep / "best.json").read_text())
    table = (sweep / "results.md").read_text()
    rows = [line for line in (sweep / "results.csv").read_text().splitlines()[1:] if line]
    assert len(rows) == 2 and "early-stopped" in table and "completed" in table, table
    assert best["param:train.lr"] == 0.003 and best["status"] == "completed"
    promoted = Path(best["promoted_to"])
    assert promoted == tmp_path / "s-best" and (promoted / "adapter/adapter_model.safetensors").is_file()
    lineage = json.loads((promoted / "lineage.json").read_text())
    assert lineage["parent"]["sweep"] == str(sweep) and lineage["parent"]["params"] == {"train.lr": 0.003}
    assert (promoted / "eval/report.json").is_file() and (sweep / "val_loss_vs_step.png").stat().st_size > 1000
    assert load_config(sweep / "best_config.yaml").train.lr == 0.003
