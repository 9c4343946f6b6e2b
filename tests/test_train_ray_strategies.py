"""Sharded training inside Ray Train workers: FSDP2 state is gathered for checkpoints (a collective
on every rank) and the final full model lands in run_dir/model. DeepSpeed runs through the same
collective path (its engine is also tested per ZeRO stage in test_train_strategies.py); both are
slow (DeepSpeed's start-up most) and run in CI."""

from __future__ import annotations

import json

import pytest

try:  # tests/ may or may not be a package
    from tests.test_train_util import make_run, metrics
except ImportError:
    from test_train_util import make_run, metrics

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.mark.parametrize(
    "overrides, final_dir, weights",
    [
        (["scaling.strategy=fsdp2", "method.type=full", "train.lr=2e-3"], "model", "model.safetensors"),
        (["scaling.strategy=deepspeed", "scaling.zero_stage=3"], "adapter", "adapter_model.safetensors"),
    ],
    ids=["fsdp2-full", "deepspeed-zero3-lora"],
)
def test_sharded_strategies_on_ray(ray_session, tiny_model, cache_dir, tmp_path, overrides, final_dir, weights):
    from oikyo_ray.train.ray_train import fit

    cfg, run, man = make_run(
        tmp_path,
        tiny_model,
        cache_dir,
        [
            "scaling.num_workers=2",
            "train.batch_size=4",
            "train.max_steps=8",
            "train.checkpoint_every=4",
            "train.eval_every=4",
            "train.lr=5e-3",
            *overrides,
        ],
    )
    final = fit(cfg, run, str(tiny_model), man, log=lambda s: None)
    rows = metrics(run)
    assert final.name == final_dir and (final / weights).is_file()
    assert rows[-1]["step"] == 8 and rows[-1]["loss"] < rows[0]["loss"]
    ckpt = max(p for p in (run / "checkpoints").glob("checkpoint_*") if p.is_dir())
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 8


def test_packed_blocks_train_on_ray(ray_session, tiny_model, cache_dir, tmp_path):
    """data.packing feeds fixed-length blocks (position ids, no attention mask) to 2 DDP workers."""
    from oikyo_ray.errors import OikyoError
    from oikyo_ray.train.ray_train import fit

    cfg, run, man = make_run(
        tmp_path,
        tiny_model,
        cache_dir,
        [
            "scaling.num_workers=2",
            "train.batch_size=2",
            "train.epochs=8",
            "train.max_steps=6",
            "train.eval_every=3",
            "train.lr=5e-3",
            "data.packing=true",
            "data.max_length=64",
            "data.pack_length=256",
        ],
    )
    assert 6 <= man["packing"]["blocks"] < 64  # 64 rows of <= 64 tokens fit in far fewer blocks
    final = fit(cfg, run, str(tiny_model), man, log=lambda s: None)
    rows = metrics(run)
    assert (final / "adapter_model.safetensors").is_file()
    assert rows[-1]["step"] == 6 and rows[-1]["loss"] < rows[0]["loss"] and "val_loss" in rows[-1]

    with pytest.raises(OikyoError, match="no packed split"):
        fit(cfg, run, str(tiny_model), {k: v for k, v in man.items() if k != "packing"}, log=lambda s: None)
