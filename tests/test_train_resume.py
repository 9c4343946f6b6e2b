"""Checkpoints that survive: exact resume after a stop, worker restarts (max_failures), keep-K,
early stopping with the best checkpoint, monitoring files (Ray Train on the session cluster)."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch

try:  # tests/ may or may not be a package
    from tests.test_train_util import adapter_tensors, fail_once_at, make_run, metrics
except ImportError:
    from test_train_util import adapter_tensors, fail_once_at, make_run, metrics

pytestmark = [pytest.mark.slow, pytest.mark.ray]

# 2 workers x 8 rows, 4 optimizer steps per epoch (grad_accum 2), 7 steps: the stop at step 5
# lands mid-epoch (epoch 1), after the checkpoint at step 4, inside an accumulation window's data
BASE = [
    "scaling.num_workers=2",
    "train.batch_size=4",
    "train.grad_accum=2",
    "train.max_steps=7",
    "train.checkpoint_every=2",
    "train.eval_every=100",
    "checkpoint.num_to_keep=2",
    "train.lr=5e-3",
]


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tiny_model, cache_dir, tmp_path_factory):
    from oikyo_ray.train.ray_train import fit

    cfg, run, man = make_run(tmp_path_factory.mktemp("a"), tiny_model, cache_dir, BASE)
    return fit(cfg, run, str(tiny_model), man, log=lambda s: None), run


def _same_weights(a, b):
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-6, msg=k)


def test_restart_then_rerun_resume_exactly(uninterrupted, tiny_model, cache_dir, tmp_path):
    """Fault tolerance and exact resume. max_failures=1: rank 0 raises at step 5 (mid-epoch, after
    the step-4 checkpoint); Ray Train restarts the workers, which resume from step 4. It raises
    again at step 6: a second failure ends the run. Started again with the same name and storage,
    the run resumes from step 4 once more and ends with the uninterrupted run's weights."""
    from oikyo_ray.errors import OikyoError
    from oikyo_ray.train.ray_train import fit

    final_a, run_a = uninterrupted
    cfg, run, man = make_run(tmp_path, tiny_model, cache_dir, [*BASE, "scaling.max_failures=1"])
    with pytest.raises(OikyoError, match="injected failure at step 6"):
        fit(
            cfg,
            run,
            str(tiny_model),
            man,
            log=lambda s: None,
            step_hook=partial(fail_once_at, (5, 6), str(tmp_path / "failed")),
        )
    assert (tmp_path / "failed.5").exists() and (tmp_path / "failed.6").exists()
    assert not (run / "adapter").exists()
    rows = metrics(run)
    assert [m["step"] for m in rows] == [1, 2, 3, 4, 5] and rows[4]["resumed_from"] == 4  # restarted, not from 0
    final = fit(cfg, run, str(tiny_model), man, log=lambda s: None)  # same run name + storage: resumes
    rows = metrics(run)
    assert [m["step"] for m in rows] == [1, 2, 3, 4, 5, 5, 6, 7], rows
    assert [m["resumed_from"] for m in rows if "resumed_from" in m] == [4, 4]
    _same_weights(final_a, final)
    a_loss = {m["step"]: m["loss"] for m in metrics(run_a)}
    assert all(m["loss"] == pytest.approx(a_loss[m["step"]], rel=1e-4) for m in rows)
    # keep-last-2: the newest two checkpoints remain; each holds everything a resume needs
    ckpts = sorted(p for p in (run / "checkpoints").glob("checkpoint_*") if p.is_dir())
    assert len(ckpts) == 2
    names = {p.name for p in ckpts[-1].iterdir()}
    assert {"adapter_model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"} <= names
    assert json.loads((ckpts[-1] / "trainer_state.json").read_text())["step"] == 7
    assert not list(run.rglob("*.pt")) and not list(run.rglob("*.bin")) and not list(run.rglob("*.pkl"))
    # the final adapter has no optimizer/RNG state; monitoring files are in the run dir
    assert not (final / "optimizer.safetensors").exists() and (final / "adapter_config.json").is_file()
    assert (run / "loss.png").stat().st_size > 1000 and list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_early_stopping_keeps_the_best_checkpoint(ray_session, tiny_model, cache_dir, tmp_path):
    """Patience 2 with a min_delta no step can reach: stops after the third validation; with
    score=val_loss and num_to_keep=1 the best checkpoint (and the newest) are kept, and the best
    becomes run_dir/adapter."""
    from oikyo_ray.train.ray_train import fit

    cfg, run, man = make_run(
        tmp_path,
        tiny_model,
        cache_dir,
        [
            "scaling.num_workers=1",
            "train.batch_size=8",
            "train.max_steps=30",
            "train.eval_every=2",
            "train.checkpoint_every=2",
            "train.early_stopping_patience=2",
            "train.early_stopping_min_delta=100",
            "checkpoint.score=val_loss",
            "checkpoint.num_to_keep=1",
            "checkpoint.final=best",
            "train.lr=1e-2",
        ],
    )
    final = fit(cfg, run, str(tiny_model), man, log=lambda s: None)
    rows = metrics(run)
    assert rows[-1]["step"] == 6 and rows[-1]["stopped_early"] is True
    vals = {m["step"]: m["val_loss"] for m in rows if "val_loss" in m}
    best = min(vals, key=vals.get)
    assert sorted(vals) == [2, 4, 6] and rows[-1]["best_step"] == best
    kept = {
        json.loads((p / "trainer_state.json").read_text())["step"]
        for p in (run / "checkpoints").glob("checkpoint_*")
        if p.is_dir()
    }
    assert kept == {best, 6}
    assert json.loads((final / "trainer_state.json").read_text())["step"] == best
