"""A preference objective through the whole pipeline on a real local Ray cluster: `run_finetune`
(what `oikyo finetune` runs) of DPO + LoRA on 2 DDP workers over a slice of dpo_en_demo, then the
evaluation's base vs tuned preference accuracy and margin on the test split's pairs."""

from __future__ import annotations

import json
import math

import pytest

from oikyo_ray.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def short_pairs(shared_dir, tmp_path, n: int = 40):
    """The n pairs of dpo_en_demo with the shortest prompts (most fit a short data.max_length)."""
    rows = json.loads((shared_dir / "datasets" / "dpo_en_demo.json").read_text())
    rows.sort(key=lambda r: sum(len(c["value"]) for c in r["conversations"]))
    path = tmp_path / "dpo_short.json"
    path.write_text(json.dumps(rows[:n]))
    return path


@pytest.fixture(scope="module")
def dpo_run(ray_session, shared_dir, cache_dir, tmp_path_factory):
    from oikyo_ray.finetune import run_finetune

    tmp = tmp_path_factory.mktemp("dpo")
    cfg = load_config(
        None,
        [
            f"model.cache_dir={cache_dir}",
            f"run.root={tmp / 'runs'}",
            "run.name=dpo",
            f"data.paths=[{short_pairs(shared_dir, tmp)}]",
            "data.max_length=128",
            "data.val_fraction=0.2",
            "data.test_fraction=0.2",
            "method.objective=dpo",
            "method.lora.r=8",
            "scaling.num_workers=2",
            "scaling.cpus_per_worker=0.5",  # CPUs left for Ray Data's tasks (conftest.LOGICAL_CPUS)
            "train.batch_size=4",
            "train.epochs=2",
            "train.max_steps=4",
            "train.lr=5e-3",
            "train.warmup_ratio=0",
            "train.log_every=1",
            "train.eval_every=2",
            "train.checkpoint_every=2",
            "eval.forgetting=false",
            "eval.probes=false",
            "eval.max_new_tokens=4",
            "eval.num_samples=2",
        ],
    )
    return run_finetune(cfg, log=lambda s: None)


def test_dpo_lora_trains_on_two_ddp_workers(dpo_run):
    rows = [json.loads(line) for line in (dpo_run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=0.05)  # a fresh adapter is the reference
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]  # val DPO loss, pair-weighted
    ckpts = sorted(p for p in (dpo_run / "checkpoints").glob("checkpoint_*") if p.is_dir())
    assert ckpts and (ckpts[-1] / "adapter_model.safetensors").is_file()
    assert (dpo_run / "adapter" / "adapter_model.safetensors").is_file()


def test_report_holds_base_and_tuned_preference_metrics(dpo_run):
    report = json.loads((dpo_run / "eval" / "report.json").read_text())
    assert report["preference"]["pairs"] >= 4
    for which in ("base", "tuned"):
        assert 0 <= report[which]["preference_accuracy"] <= 1
        assert math.isfinite(report[which]["preference_margin"])
    margins = report["tuned"]["preference_margin"] - report["base"]["preference_margin"]
    assert report["preference"]["reward_margin"] == pytest.approx(margins)
    assert "| preference_accuracy |" in (dpo_run / "eval" / "report.md").read_text()
