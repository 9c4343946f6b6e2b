"""The Ray-free training core: exact resume from a checkpoint directory, early stopping, optimizer
state in safetensors, grad accumulation, gradient checkpointing, bf16, method errors."""

from __future__ import annotations

import contextlib

import pytest
import torch

try:  # tests/ may or may not be a package
    from tests.test_train_util import local_setup
except ImportError:
    from test_train_util import local_setup


class Stop(Exception):
    pass


def _run(tiny_model, cache_dir, overrides, steps, ckpt_dir=None, stop_at=None, resume=None):
    from oikyo_ray.train.checkpoint import load_weights, restore, write_checkpoint
    from oikyo_ray.train.engine import TorchEngine
    from oikyo_ray.train.loop import LoopHooks, train_loop

    cfg, model, tok, epochs, val = local_setup(tiny_model, cache_dir, overrides)
    if resume is not None:
        load_weights(model, resume, full=cfg.method.type == "full")
    engine = TorchEngine(model, cfg.train, steps)
    state = restore(engine, resume) if resume is not None else None
    reports = []

    def report(m, st):
        reports.append(dict(m))
        if st is not None and ckpt_dir is not None:
            sd, osd = engine.full_state()
            write_checkpoint(ckpt_dir / f"step{st.step}", model, sd, osd, st, tok)

    def on_step(st):
        if st.step == stop_at:
            raise Stop

    hooks = LoopHooks(report=report, val_batches=lambda: val, on_step=on_step)
    with contextlib.suppress(Stop):
        train_loop(model, epochs, cfg.train, steps, hooks, engine=engine, state=state)
    return model, reports


def _weights(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_mid_epoch_is_exact(tiny_model, cache_dir, tmp_path, method):
    # 64 rows / batch 4 = 16 micro-batches = 8 steps per epoch; stop at 11 (epoch 1), resume from 10
    ov = [
        f"method.type={method}",
        "train.batch_size=4",
        "train.grad_accum=2",
        "train.checkpoint_every=5",
        "train.eval_every=100",
        "method.lora.dropout=0.1",
        "train.lr=3e-3",
    ]
    ref, ref_reports = _run(tiny_model, cache_dir, ov, 13)
    _run(tiny_model, cache_dir, ov, 13, ckpt_dir=tmp_path, stop_at=11)
    resumed, reports = _run(tiny_model, cache_dir, ov, 13, resume=tmp_path / "step10")
    assert reports[0]["step"] == 11 and reports[0]["resumed_from"] == 10 and reports[0]["epoch"] == 1
    for k, v in _weights(ref).items():
        torch.testing.assert_close(_weights(resumed)[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert [r["loss"] for r in reports] == pytest.approx([r["loss"] for r in ref_reports[10:]], rel=1e-5)


def test_optimizer_state_roundtrips_through_safetensors(tmp_path):
    from oikyo_ray.train.checkpoint import load_optimizer, save_optimizer

    p = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(p.parameters(), lr=0.1)
    p(torch.ones(1, 3)).sum().backward()
    opt.step()
    save_optimizer(opt.state_dict(), tmp_path / "o.safetensors")
    back = load_optimizer(tmp_path / "o.safetensors")
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    opt2.load_state_dict(back)
    assert opt2.param_groups[0]["lr"] == 0.1
    for a, b in zip(opt.state.values(), opt2.state.values()):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(a[k], b[k])


def test_early_stopping_with_patience_and_min_delta(tiny_model, cache_dir):
    # min_delta larger than any possible gain: the first validation sets the best, the next two fail
    ov = [
        "train.eval_every=2",
        "train.checkpoint_every=100",
        "train.early_stopping_patience=2",
        "train.early_stopping_min_delta=100",
        "train.batch_size=8",
    ]
    _, reports = _run(tiny_model, cache_dir, ov, 20)
    assert reports[-1]["step"] == 6 and reports[-1]["stopped_early"] is True
    vals = {r["step"]: r["val_loss"] for r in reports if "val_loss" in r}
    assert list(vals) == [2, 4, 6] and reports[-1]["best_step"] == min(vals, key=vals.get)
    # without min_delta (and a decreasing loss) it runs to the end
    _, reports = _run(tiny_model, cache_dir, [*ov[:3], "train.early_stopping_min_delta=0"], 8)
    assert reports[-1]["step"] == 8 and "stopped_early" not in reports[-1]


def test_grad_accum_checkpointing_bf16_still_learn(tiny_model, cache_dir):
    ov = [
        "train.batch_size=4",
        "train.grad_accum=2",
        "train.gradient_checkpointing=true",
        "train.mixed_precision=bf16",
        "train.eval_every=100",
        "train.checkpoint_every=100",
        "train.lr=5e-3",
    ]
    model, reports = _run(tiny_model, cache_dir, ov, 12)
    assert model.base_model.model.is_gradient_checkpointing
    assert [r["step"] for r in reports] == list(range(1, 13))  # 2 micro-batches per step
    assert sum(r["loss"] for r in reports[-3:]) < sum(r["loss"] for r in reports[:3]) - 0.5


def test_qlora_without_bitsandbytes_is_refused_with_a_reason(monkeypatch):
    """qlora trains on CPU too (tests/test_qlora.py), but only with bitsandbytes installed."""
    import sys

    from oikyo_ray.config import load_config
    from oikyo_ray.errors import ModelError
    from oikyo_ray.model.methods import check_method

    cfg = load_config(None, ["method.type=qlora"])
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with pytest.raises(ModelError, match="qlora needs bitsandbytes") as e:
        check_method(cfg.method)
    assert "pip install bitsandbytes" in str(e.value)
    check_method(load_config(None, ["method.type=dora"]).method)


def test_reporter_sends_in_order_in_the_background_and_raises_failures():
    """ray_train.Reporter (no cluster needed): metrics reports return at once (up to `backlog` pending), a checkpoint
    report waits for everything before it and itself; a failed report raises in the caller."""
    import threading

    from oikyo_ray.train.ray_train import Reporter

    got, gate = [], threading.Event()

    def report(metrics, checkpoint=None):
        assert gate.wait(10)
        got.append((metrics["step"], checkpoint))

    r = Reporter(report, backlog=2)
    r.send({"step": 1})
    r.send({"step": 2})  # both pending: the caller was not held up
    assert got == []
    gate.set()
    r.send({"step": 3}, checkpoint="ckpt")
    assert got == [(1, None), (2, None), (3, "ckpt")]
    r.send({"step": 4})
    r.close()
    assert got[-1] == (4, None)

    def fails(metrics, checkpoint=None):
        raise RuntimeError("controller gone")

    r = Reporter(fails)
    with pytest.raises(RuntimeError, match="controller gone"):  # at a later send, or at close
        r.send({"step": 1})
        r.send({"step": 2})
        r.close()
