"""Methods x strategies on 2 processes (gloo, spawned; the engines Ray Train workers use, without
Ray's start-up cost): each trains the tiny model and its loss falls."""

from __future__ import annotations

import pytest

try:  # tests/ may or may not be a package
    from tests.test_train_util import run_strategies
except ImportError:
    from test_train_util import run_strategies

pytestmark = pytest.mark.slow

COMMON = ["train.batch_size=4", "train.lr=5e-3", "train.eval_every=5", "train.checkpoint_every=5"]
METHODS = {
    "lora": ["method.type=lora"],
    "dora": ["method.type=dora"],
    "full": ["method.type=full", "train.lr=2e-3"],
    "lora_save_head": [
        "method.type=lora",
        "method.lora.modules_to_save=[lm_head]",
        "method.lora.target_modules=[q_proj,v_proj]",
    ],
}
STRATEGIES = {"ddp": ["scaling.strategy=ddp"], "fsdp2": ["scaling.strategy=fsdp2"]}
DEEPSPEED = {  # representative ZeRO cases (all of 0/1/2/3, offload, ZeRO-3 + LoRA)
    "ds_zero0_full": ["scaling.strategy=deepspeed", "scaling.zero_stage=0", "method.type=full", "train.lr=2e-3"],
    "ds_zero1_lora": ["scaling.strategy=deepspeed", "scaling.zero_stage=1"],
    "ds_zero2_offload_lora": ["scaling.strategy=deepspeed", "scaling.zero_stage=2", "scaling.offload_optimizer=true"],
    "ds_zero3_full": ["scaling.strategy=deepspeed", "scaling.zero_stage=3", "method.type=full", "train.lr=2e-3"],
    "ds_zero3_lora": ["scaling.strategy=deepspeed", "scaling.zero_stage=3"],
}
ENGINE = {"ddp": "TorchEngine", "fsdp2": "FSDP2Engine"}


def _check(results: dict, name: str, engine: str | None = None):
    r = results[name]
    assert r["error"] is None, f"{name}:\n{r['error']}"
    losses = r["losses"]
    assert len(losses) == 10, (name, losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, (name, losses)
    if engine:
        assert r["engine"] == engine


def test_methods_by_ddp_and_fsdp2(tiny_model, cache_dir, tmp_path):
    cases = [(f"{m}/{s}", [*COMMON, *mo, *so], 10) for m, mo in METHODS.items() for s, so in STRATEGIES.items()]
    results = run_strategies(tiny_model, cache_dir, cases, tmp_path / "out.json")
    for name in results:
        _check(results, name, ENGINE[name.split("/")[1]])


def test_deepspeed_zero_stages(tiny_model, cache_dir, tmp_path):
    pytest.importorskip("deepspeed")
    cases = [(name, [*COMMON, *ov], 10) for name, ov in DEEPSPEED.items()]
    results = run_strategies(tiny_model, cache_dir, cases, tmp_path / "out.json")
    for name in DEEPSPEED:
        _check(results, name, "DeepSpeedEngine")
