"""The runs registry on s3:// (the session's moto server): a real finetune with run.root=s3://...
is staged locally, uploaded after each stage, and then listed, shown, compared with a local run,
evaluated and exported through pyarrow; names are not reused, failed runs are recorded, bad roots
give clear errors, and nothing uploaded holds the S3 secret."""

import csv
import io
import json
import shutil
import socket
from pathlib import Path

import pytest

from oikyo_ray.cli import main
from oikyo_ray.config import load_config
from oikyo_ray.demo.run import DEMO_CONFIG
from oikyo_ray.errors import ConfigError
from tests.conftest import S3_SECRET

pytestmark = [pytest.mark.slow, pytest.mark.ray]
BUCKET = "oikyo-runs"
ROOT = f"s3://{BUCKET}/runs"
SWEEP = Path(__file__).resolve().parent.parent / "jobs" / "configs" / "sweep_demo.yaml"
FAST = [
    "run.serve_after=false",
    "scaling.num_workers=1",
    "train.max_steps=4",
    "train.checkpoint_every=1",
    "checkpoint.num_to_keep=1",
    "eval.max_samples=8",
    "eval.forgetting=false",
    "eval.probes=false",
    "eval.backend=local",
]


@pytest.fixture(scope="module")
def s3(s3_server):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=BUCKET)
    return client


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _objects(s3, prefix: str) -> dict[str, bytes]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    keys = [o["Key"] for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/")]  # files
    return {k[len(prefix) :]: s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}


@pytest.fixture(scope="module")
def s3_run(ray_session, s3, cache_dir):
    """One short real finetune (curate, Ray Train, eval) with run.root on s3."""
    from oikyo_ray.finetune import run_finetune

    # tracked in an MLflow server that is not there: the run only warns
    unreachable = f"tracking.mlflow_uri=http://127.0.0.1:{_closed_port()}"
    cfg = load_config(
        DEMO_CONFIG, [f"model.cache_dir={cache_dir}", f"run.root={ROOT}", "run.name=s3ft", unreachable, *FAST]
    )
    logs: list[str] = []
    staged = run_finetune(cfg, log=logs.append)
    return cfg, staged, f"{ROOT}/s3ft", logs


def test_s3_run_is_uploaded_in_full_without_secrets(s3_run, s3):
    _, staged, uri, logs = s3_run
    assert any(f"run directory: {uri} (staged in {staged})" in line for line in logs), logs[:5]
    remote = _objects(s3, "runs/s3ft/")
    for f in [
        "config.yaml",
        "lineage.json",
        "metrics.jsonl",
        "data/manifest.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "eval/report.json",
        "eval/report.md",
    ]:
        assert f in remote, (f, sorted(remote))
    local = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert set(remote) == local - {".oikyo-uploaded.json"}  # rotated checkpoints deleted there too
    assert len({f.split("/")[1] for f in remote if f.startswith("checkpoints/checkpoint_") and f.count("/") > 1}) == 1
    assert load_config(staged / "config.yaml").run.root == ROOT
    for name, body in remote.items():
        assert S3_SECRET.encode() not in body and b"oikyo-test-access" not in body, name


def test_unreachable_mlflow_server_only_warns(s3_run, s3):
    cfg, staged, remote, logs = s3_run
    (warning,) = [line for line in logs if "MLflow" in line]
    assert "MLflow tracking is off for this run: no MLflow server answers at http://127.0.0.1:" in warning
    assert "tracking.json" not in _objects(s3, "runs/s3ft/")  # nothing to continue: nothing was tracked


def test_list_and_show_read_s3(s3_run, capsys):
    from oikyo_ray.runs.rundir import list_runs

    _, staged, uri, _ = s3_run
    row = next(r for r in list_runs(ROOT) if r["run"] == "s3ft")
    assert row["path"] == uri and isinstance(row["tuned_em"], float) and row["base_model"] == "oikyo-demo-tiny"
    assert main(["runs", "list", "--root", ROOT]) == 0
    assert "s3ft" in capsys.readouterr().out
    assert main(["runs", "show", uri + "/"]) == 0
    shown = capsys.readouterr().out
    lineage = json.loads((staged / "lineage.json").read_text())
    assert shown.startswith("# s3ft") and "## lineage.json" in shown and lineage["data_content_hash"] in shown
    assert '"seed": 42' in shown and "## metrics" in shown and "exact_match" in shown


def test_compare_mixes_s3_and_local_runs(s3_run, tmp_path, capsys):
    _, staged, uri, _ = s3_run
    local = tmp_path / "runs" / "local-copy"
    shutil.copytree(staged, local)
    assert main(["runs", "compare", uri, str(local)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "| metric | s3ft | local-copy |"
    em = next(line for line in out.splitlines() if line.startswith("| exact_match |"))
    assert em.split("|")[2] == em.split("|")[3]  # the same report, read from s3 and from disk


def test_export_s3_run_loads_with_peft(s3_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from oikyo_ray.model.load import resolve_model_path

    cfg, staged, uri, _ = s3_run
    out = tmp_path / "exported"
    assert main(["runs", "export", uri, "--out", str(out)]) == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    card = (out / "README.md").read_text()
    assert card.startswith("# s3ft") and json.loads((staged / "lineage.json").read_text())["data_content_hash"] in card
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model)), out)
    assert model.peft_config["default"].r == cfg.method.lora.r


def test_reused_name_is_refused_before_ray(s3_run, cache_dir, capsys):
    code = main(
        ["finetune", str(DEMO_CONFIG), f"model.cache_dir={cache_dir}", f"run.root={ROOT}/", "run.name=s3ft", *FAST]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"already exists: {ROOT}/s3ft" in err and "Traceback" not in err, err


def test_failed_run_is_still_recorded(ray_session, s3, cache_dir, capsys):
    # data is prepared, then training refuses (batch larger than the data): the run is on s3
    code = main(
        [
            "finetune",
            str(DEMO_CONFIG),
            f"model.cache_dir={cache_dir}",
            f"run.root={ROOT}",
            "run.name=s3fail",
            "train.batch_size=100000",
            *FAST,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "optimizer step" in err, err
    remote = _objects(s3, "runs/s3fail/")
    assert {"config.yaml", "lineage.json", "data/manifest.json"} <= set(remote), sorted(remote)
    assert not any(S3_SECRET.encode() in body for body in remote.values())


def test_eval_of_s3_run_uploads_its_report(s3_run, s3):
    from oikyo_ray.eval.cli import evaluate_run

    _, _, uri, _ = s3_run
    report = evaluate_run(uri, ["eval.max_samples=4"], log=lambda s: None)
    assert report["tuned"]["n"] == 4
    assert json.loads(_objects(s3, "runs/s3ft/eval/")["report.json"])["tuned"]["n"] == 4


def test_resume_fetches_an_s3_run_not_staged_here(s3_run, s3):
    from oikyo_ray.finetune import run_finetune

    cfg, staged, uri, _ = s3_run
    shutil.rmtree(staged)  # as on another machine: only s3 has the run
    logs: list[str] = []
    assert run_finetune(cfg, log=logs.append, resume=True) == staged
    assert any("resuming from its newest checkpoint" in line for line in logs)
    steps = [json.loads(line)["step"] for line in _objects(s3, "runs/s3ft/")["metrics.jsonl"].splitlines()]
    assert steps == [1, 2, 3, 4]  # continued from the step-4 checkpoint, not trained again
    assert (staged / "adapter" / "adapter_model.safetensors").is_file()


def test_optuna_sweep_on_s3_stops_weak_trial_and_promotes_best(ray_session, s3, cache_dir, mlflow_server):
    """A multi-objective Optuna search (val_loss down, tokens/s up) under ASHA, its trials one at
    a time: seed 10 draws lr 3e-3, then 1e-5, which has not learnt by the first rung, so ASHA stops
    it there. The sweep and its promoted best land on S3, and it is tracked in MLflow: the sweep a
    parent run, each trial a nested run."""
    from mlflow import MlflowClient

    from oikyo_ray.runs.rundir import list_runs

    sweep = ROOT.replace("/runs", "/sweeps")
    assert (
        main(
            [
                "sweep",
                str(SWEEP),
                f"model.cache_dir={cache_dir}",
                f"run.root={sweep}",
                "run.name=sw",
                # the weak trial trains on while ASHA's stop travels to it: a budget of 16 steps
                # keeps it from finishing (and counting as completed) before the stop lands
                "train.max_steps=16",
                "train.eval_every=4",
                "sweep.grace_period=4",
                "sweep.search=optuna",
                "sweep.seed=10",
                "sweep.objectives=[{metric: tokens_per_s, mode: max}]",
                "sweep.num_samples=2",
                "sweep.space={train.lr: {type: choice, values: [0.003, 0.00001]}}",
                "sweep.max_concurrent_trials=1",
                "eval.max_samples=4",
                "eval.forgetting=false",
                "eval.probes=false",
                "eval.backend=local",
                f"tracking.mlflow_uri={mlflow_server}",
                "tracking.mlflow_experiment=sweeps",
            ]
        )
        == 0
    )
    remote, best = _objects(s3, "sweeps/sw/"), _objects(s3, "sweeps/sw-best/")
    state = json.loads(remote["tracking.json"])["mlflow"]
    c = MlflowClient(mlflow_server)
    parent = c.get_run(state["run_id"])
    assert parent.info.run_name == "sw" and parent.info.status == "FINISHED"
    assert json.loads(parent.data.params["sweep.space"])["train.lr"]["values"] == [0.003, 0.00001]
    assert {"results.md", "best.json", "val_loss_vs_step.png"} <= {a.path for a in c.list_artifacts(parent.info.run_id)}
    children = c.search_runs([state["experiment_id"]], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {r.info.run_name: r for r in children}
    trial = json.loads(remote["best.json"])["trial"]
    assert len(children) == 2 and state["trials"] == {n: r.info.run_id for n, r in by_name.items()}
    child = by_name[trial]
    assert child.data.tags["oikyo.status"] == "completed" and float(child.data.params["train.lr"]) == 0.003
    (weak_child,) = [r for n, r in by_name.items() if n != trial]
    assert weak_child.data.tags["oikyo.status"] == "early-stopped"
    trial_rows = [json.loads(line) for line in remote[f"trials/{trial}/metrics.jsonl"].splitlines()]
    history = c.get_metric_history(child.info.run_id, "val_loss")
    assert sorted(m.step for m in history) == [r["step"] for r in trial_rows if "val_loss" in r] != []
    # the promoted best: its eval and adapter on the trial's run, a registered version, its tracking.json
    assert json.loads(best["tracking.json"])["mlflow"]["run_id"] == child.info.run_id
    assert "eval/tuned/loss" in c.get_run(child.info.run_id).data.metrics
    (version,) = c.search_model_versions(f"name='sweeps' and run_id='{child.info.run_id}'")
    assert version.tags["oikyo.run"] == trial and parent.data.tags["oikyo.best_trial"] == trial
    assert {"config.yaml", "results.md", "best.json", "data/manifest.json"} <= set(remote)
    rows = {r["param:train.lr"]: r for r in csv.DictReader(io.StringIO(remote["results.csv"].decode()))}
    assert rows.keys() == {"0.003", "1e-05"}, rows
    strong, weak = rows["0.003"], rows["1e-05"]
    assert (strong["status"], weak["status"]) == ("completed", "early-stopped"), rows
    assert int(weak["steps"]) < int(weak["budget"]) == 16
    assert float(strong["last_tokens_per_s"]) > 0 and strong["pareto"] == "yes" and weak["pareto"] == ""
    best_row = json.loads(remote["best.json"])
    assert best_row["param:train.lr"] == 0.003 and best_row["pareto_front"] == [best_row["trial"]]
    assert not any(f.startswith("trials/") and "/data/" in f for f in remote)  # trials link the shared data
    assert best_row["promoted_to"] == f"{sweep}/sw-best"
    assert {"adapter/adapter_model.safetensors", "eval/report.json"} <= set(best)
    assert json.loads(best["lineage.json"])["parent"]["sweep"] == f"{sweep}/sw"
    assert [r["run"] for r in list_runs(sweep)] == ["sw-best", "sw"]
    assert not any(S3_SECRET.encode() in body for body in [*remote.values(), *best.values()])


def test_bad_run_root_scheme_fails_config_validation(capsys):
    with pytest.raises(ConfigError, match=r"run\.root: .*s3://bucket"):
        load_config(None, ["run.root=gs://bucket/runs"])
    assert main(["finetune", str(DEMO_CONFIG), "run.root=s3:///runs"]) == 2
    err = capsys.readouterr().err
    assert "run.root" in err and "Traceback" not in err


def test_bad_s3_inputs_give_clear_errors(s3, cache_dir, capsys, monkeypatch):
    cases = [
        (["runs", "list", "--root", "s3://no-such-bucket/runs"], "s3 bucket 'no-such-bucket' not found"),
        (["runs", "show", f"{ROOT}/missing"], f"{ROOT}/missing is not a run directory"),
        (["runs", "compare", f"{ROOT}/missing"], "no evaluation report"),
        (["runs", "export", f"{ROOT}/missing", "--out", str(cache_dir / "never")], "not a run directory"),
        (["eval", f"{ROOT}/missing"], "not a run directory"),
        (
            [
                "finetune",
                str(DEMO_CONFIG),
                f"model.cache_dir={cache_dir}",
                f"run.root={ROOT}",
                "run.name=gone",
                "--resume",
            ],
            f"nothing to resume: {ROOT}/gone",
        ),
        (
            [
                "finetune",
                str(DEMO_CONFIG),
                f"model.cache_dir={cache_dir}",
                "run.root=s3://no-such-bucket/runs",
                "run.name=x",
                *FAST,
            ],
            "s3 bucket 'no-such-bucket' not found",
        ),
    ]
    for argv, message in cases:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)
    assert main(["runs", "list", "--root", f"s3://{BUCKET}/nothing-here"]) == 0
    assert "no runs under" in capsys.readouterr().out
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    assert main(["runs", "list", "--root", ROOT]) == 2
    err = capsys.readouterr().err
    assert f"cannot access {ROOT}" in err and "AWS_ENDPOINT_URL" in err and "Traceback" not in err


def test_upload_sends_changes_and_deletes_what_is_gone(s3, tmp_path):
    from oikyo_ray.runs.store import UPLOADED, download, upload

    run = tmp_path / "r"
    (run / "checkpoints" / "checkpoint_1").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint_1" / "w").write_text("1")
    (run / "config.yaml").write_text("a: 1\n")
    (tmp_path / "shared").mkdir()
    (run / "data").symlink_to(tmp_path / "shared", target_is_directory=True)  # a sweep trial's data link
    upload(run, f"{ROOT}-unit/r")
    assert set(_objects(s3, "runs-unit/r/")) == {"config.yaml", "checkpoints/checkpoint_1/w"}
    shutil.rmtree(run / "checkpoints" / "checkpoint_1")  # rotated away by Ray Train
    (run / "config.yaml").write_text("a: 2\n")
    upload(run, f"{ROOT}-unit/r")
    assert _objects(s3, "runs-unit/r/") == {"config.yaml": b"a: 2\n"}
    back = download(f"{ROOT}-unit/r", tmp_path / "back")
    assert (back / "config.yaml").read_text() == "a: 2\n" and (back / UPLOADED).is_file()
