"""`oikyo eval RUN_DIR` on real tiny fine-tunes (trained in-process, Ray-free): tuned beats base,
an over-trained full fine-tune is flagged for forgetting, gates set the exit code, the report
renders; and the Ray Data actor-pool path gives the same numbers as the in-process path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from oikyo_ray.config import dump_yaml, load_config
from oikyo_ray.eval.cli import evaluate_run, main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


def _make_run(root: Path, name: str, tiny_model, cache_dir, recs, overrides: list[str], steps: int) -> Path:
    """A run directory as `oikyo finetune` leaves it (config.yaml, data/test, adapter/ or model/),
    trained in-process on the demo tasks' train split."""
    from oikyo_ray.model.load import load_model, load_tokenizer
    from oikyo_ray.model.methods import apply_method
    from oikyo_ray.train.loop import LoopHooks, collate, shuffled_batches, train_loop

    cfg = load_config(
        None,
        [
            f"model.cache_dir={cache_dir}",
            "data.max_length=64",
            f"run.name={name}",
            "eval.max_new_tokens=8",
            "eval.probe_max_new_tokens=12",
            *overrides,
        ],
    )
    tok = load_tokenizer(cfg.model, str(tiny_model))
    train = [r for r in recs if r["split"] == "train"]
    test = [r for r in recs if r["split"] == "test"]
    torch.manual_seed(0)
    model = apply_method(load_model(cfg.model, str(tiny_model)), cfg.method)
    if steps:
        batches = lambda e: (collate(b, tok.pad_token_id) for b in shuffled_batches(train, 16, e))  # noqa: E731
        train_loop(model, batches, cfg.train, steps, LoopHooks())
    run = root / name
    (run / "data" / "test").mkdir(parents=True)
    cols = ("hash", "messages", "meta", "input_ids", "labels")
    pq.write_table(
        pa.Table.from_pylist([{k: list(r[k]) if k in ("input_ids", "labels") else r[k] for k in cols} for r in test]),
        run / "data/test/part-0.parquet",
    )
    (run / "config.yaml").write_text(dump_yaml(cfg))
    out = run / ("model" if cfg.method.type == "full" else "adapter")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return run


def make_eval_runs(tiny_model, cache_dir, root: Path) -> dict[str, Path]:
    """The run directories these tests evaluate (test_eval_harness evaluates the same kinds)."""
    from oikyo_ray.data.curate import curate_file
    from oikyo_ray.demo.tasks import ASSET
    from oikyo_ray.model.load import load_tokenizer

    cfg = load_config(None, [f"model.cache_dir={cache_dir}", "data.max_length=64"])
    tok = load_tokenizer(cfg.model, str(tiny_model))
    recs = [r for r in curate_file(str(ASSET), ASSET.read_bytes(), cfg.data, tok) if r["status"] == "ok"]
    make = lambda name, over, steps: _make_run(root, name, tiny_model, cache_dir, recs, over, steps)  # noqa: E731
    return {
        # LoRA: learns the answers (300 steps of 16 rows, ~10 s on one thread)
        "lora": make("lora", ["train.lr=3e-3"], 300),
        # full fine-tune at a high constant LR: learns the answers, and forgets general text
        "full": make(
            "full", ["method.type=full", "train.lr=1e-2", "train.warmup_ratio=0", "train.lr_schedule=constant"], 100
        ),
        # a freshly initialised adapter (B = 0): the fine-tuned model *is* the base
        "fresh": make("fresh", [], 0),
    }


@pytest.fixture(scope="module")
def runs(one_torch_thread, tiny_model, cache_dir, tmp_path_factory):
    return make_eval_runs(tiny_model, cache_dir, tmp_path_factory.mktemp("eval-runs"))


def test_lora_run_report_tuned_wins_and_renders(runs):
    run = runs["lora"]
    assert main([str(run)]) == 0
    rep = json.loads((run / "eval/report.json").read_text())
    assert rep["tuned"]["loss"] < rep["base"]["loss"] - 2.0 and rep["delta"]["loss"] < -2.0
    assert rep["tuned"]["perplexity"] < rep["base"]["perplexity"] / 5
    assert rep["tuned"]["exact_match"] >= rep["base"]["exact_match"] + 0.3, rep["tuned"]
    assert rep["tuned"]["token_f1"] > rep["base"]["token_f1"] and rep["tuned"]["rouge_l"] > rep["base"]["rouge_l"]
    assert rep["metrics"] == ["exact_match", "token_f1", "rouge_l", "bleu"] and rep["backend"] == "local"
    assert rep["base"]["n"] == rep["tuned"]["n"] == len(pq.read_table(run / "data/test")) > 10
    assert set(rep["probes"]["kinds"]) == {"refuse", "toxic", "ood"}
    assert rep["passed"] == all(g["passed"] for g in rep["gates"]) and rep["gates"][0]["name"] == "improvement:loss"
    assert rep["gates"][0]["passed"] and rep["gates"][1]["passed"]  # loss improved; no forgetting (LoRA)
    assert rep["decoding"]["temperature"] == 0.0 and len(rep["samples"]) == 10
    assert {"prompt", "reference", "base", "tuned"} <= set(rep["samples"][0])
    md = (run / "eval/report.md").read_text()
    assert "| metric | base | fine-tuned | delta | gate |" in md and "| loss |" in md and "| rouge_l |" in md
    assert "pass (improvement >= 0)" in md and "general-text perplexity (forgetting)" in md
    assert "| prompt | reference | base | fine-tuned |" in md and "## Probe generations" in md
    for png in ("metrics.png", "perplexity.png", "probes.png"):
        assert (run / "eval" / png).read_bytes()[:8] == PNG and f"]({png})" in md
    assert rep["charts"] == ["metrics.png", "perplexity.png", "probes.png"]


def test_over_trained_full_fine_tune_wins_but_is_flagged_for_forgetting(runs, capsys):
    run = runs["full"]
    assert main([str(run)]) == 0  # gates are reported, not enforced, without the flag
    rep = json.loads((run / "eval/report.json").read_text())
    assert rep["tuned"]["exact_match"] >= rep["base"]["exact_match"] + 0.3, rep["tuned"]
    assert rep["tuned"]["token_f1"] > rep["base"]["token_f1"] and rep["tuned"]["rouge_l"] > rep["base"]["rouge_l"]
    f = rep["forgetting"]
    assert f["tuned_perplexity"] > f["base_perplexity"] * 1.25 and f["flagged"] is True
    assert rep["passed"] is False
    assert "FLAGGED" in (run / "eval/report.md").read_text()
    capsys.readouterr()
    assert main([str(run), "--fail-on-regression"]) == 3
    assert "forgetting:general_perplexity_rise" in capsys.readouterr().out
    # a looser threshold passes the same run
    assert main([str(run), "--fail-on-regression", "eval.max_forgetting=1000"]) == 0


def test_untrained_adapter_scores_exactly_like_the_base(runs, tiny_model, cache_dir):
    from oikyo_ray.data.prepared import load_split_rows
    from oikyo_ray.eval.compare import evaluate_model
    from oikyo_ray.model.load import load_model, load_tokenizer

    run = runs["fresh"]
    rep = evaluate_run(run, ["eval.probes=false"], log=lambda s: None)
    assert rep["tuned"]["loss"] == pytest.approx(rep["base"]["loss"], abs=1e-5)
    assert [s["base"] for s in rep["samples"]] == [s["tuned"] for s in rep["samples"]]
    assert abs(rep["forgetting"]["relative_increase"]) < 1e-4 and rep["forgetting"]["flagged"] is False
    assert "probes" not in rep
    # the base side (adapter disabled) equals a plain base model scored on its own
    cfg = load_config(run / "config.yaml")
    plain, _ = evaluate_model(
        load_model(cfg.model, str(tiny_model)),
        load_tokenizer(cfg.model, str(tiny_model)),
        load_split_rows(run / "data", "test"),
        cfg,
    )
    assert plain["loss"] == pytest.approx(rep["base"]["loss"], abs=1e-5)


def test_metric_gates_set_the_exit_code(runs, capsys):
    run = runs["lora"]
    assert (
        main(
            [
                str(run),
                "--fail-on-regression",
                "eval.forgetting=false",
                "eval.probes=false",
                "eval.min_improvement={loss: 1.0, exact_match: 0.9}",
            ]
        )
        == 3
    )
    assert "improvement:exact_match" in capsys.readouterr().out
    assert (
        main(
            [
                str(run),
                "--fail-on-regression",
                "eval.forgetting=false",
                "eval.probes=false",
                "eval.min_tuned={perplexity: 1.5}",
            ]
        )
        == 3
    )
    assert (
        main(
            [
                str(run),
                "--fail-on-regression",
                "eval.forgetting=false",
                "eval.probes=false",
                "eval.min_tuned={perplexity: 1000}",
                "eval.max_samples=6",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main([str(run.parent / "nope")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_jobs_evaluate_script_and_runs_compare(runs):
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs/evaluate.py"),
            "--run-dir",
            str(runs["fresh"]),
            "eval.max_samples=4",
            "eval.probes=false",
            "--fail-on-regression",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| loss |" in r.stdout and (runs["fresh"] / "eval/report.md").is_file()
    assert "Run as:" in (ROOT / "jobs/evaluate.py").read_text()
    from oikyo_ray.runs.compare import compare_runs, format_comparison

    for name in ("lora", "full"):
        if not (runs[name] / "eval/report.json").exists():
            evaluate_run(runs[name], ["eval.probes=false"], log=lambda s: None)
    text = format_comparison(compare_runs([runs["lora"], runs["full"], runs["fresh"]]))
    assert text.splitlines()[0] == "| metric | lora | full | fresh |" and "| exact_match |" in text


@pytest.mark.ray
def test_ray_data_actor_pool_matches_in_process(runs, ray_session):
    run = runs["lora"]
    local = evaluate_run(run, ["eval.backend=local", "eval.batch_size=8"], log=lambda s: None)
    dist = evaluate_run(
        run,
        ["eval.backend=ray", "eval.num_actors=2", "eval.cpus_per_actor=0.5", "eval.batch_size=8"],
        log=lambda s: None,
    )
    assert local["backend"] == "local" and dist["backend"] == "ray"
    for k in ("loss", "perplexity"):
        for which in ("base", "tuned"):
            assert dist[which][k] == pytest.approx(local[which][k], rel=1e-4)
    assert dist["forgetting"]["tuned_perplexity"] == pytest.approx(local["forgetting"]["tuned_perplexity"], rel=1e-4)
    same = sum(a["tuned"] == b["tuned"] for a, b in zip(local["samples"], dist["samples"]))
    assert same >= 9, (local["samples"], dist["samples"])  # greedy: batch padding may flip a rare tie
    assert set(dist["probes"]["kinds"]) == {"refuse", "toxic", "ood"}
    assert json.loads((run / "eval/report.json").read_text())["backend"] == "ray"
