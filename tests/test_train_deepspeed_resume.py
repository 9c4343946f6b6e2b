"""Exact resume under DeepSpeed: checkpoints carry the full optimizer state (gathered from the ZeRO
partitions, put back partition by partition), so a run stopped mid-epoch and resumed in a fresh
engine ends with the weights of the uninterrupted run. 2 spawned gloo processes, no Ray (the
engines Ray Train workers use, the checkpoint files worker.py writes and restores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

try:  # tests/ may or may not be a package
    from tests.test_train_util import local_setup
except ImportError:
    from test_train_util import local_setup

pytestmark = pytest.mark.slow  # ~45 s: 7 cases x 3 short runs on 2 spawned processes

# 2 ranks x 8 batches of 4 per epoch, grad_accum 2: 4 steps an epoch. The checkpoint at step 3 lands
# mid-epoch (inside an accumulation window's data); the resumed run crosses into epoch 1.
K, N = 3, 6
COMMON = [
    "scaling.strategy=deepspeed",
    "train.batch_size=4",
    "train.grad_accum=2",
    "train.eval_every=100",
    f"train.checkpoint_every={K}",
]
CASES = {  # every ZeRO stage; CPU offload of the optimizer (2, 3) and the parameters (3); bf16
    "zero0_full": ["scaling.zero_stage=0", "method.type=full", "train.lr=2e-3"],
    "zero0_bf16_lora": ["scaling.zero_stage=0", "train.mixed_precision=bf16", "train.lr=5e-3"],
    "zero1_lora": ["scaling.zero_stage=1", "train.lr=5e-3"],
    "zero2_full": ["scaling.zero_stage=2", "method.type=full", "train.lr=2e-3"],
    "zero2_offload_lora": ["scaling.zero_stage=2", "scaling.offload_optimizer=true", "train.lr=5e-3"],
    "zero3_full": ["scaling.zero_stage=3", "method.type=full", "train.lr=2e-3"],
    "zero3_offload_lora": [
        "scaling.zero_stage=3",
        "scaling.offload_optimizer=true",
        "scaling.offload_params=true",
        "train.lr=5e-3",
    ],
}
# bf16 is not exact: checkpoints hold the bf16 weights, not DeepSpeed's fp32 master copy, so the
# resumed run starts from rounded masters (1 bf16 ulp apart after 3 more steps at |w| < 0.25)
ATOL = {"zero0_bf16_lora": 2**-9}
# DeepSpeed's bf16 optimizers at ZeRO-0 take one zero-gradient step when built: their count is K + 1
STEP = {"zero0_bf16_lora": K + 1}
RUNS = ("uninterrupted", "resumed", "no_optimizer")


def _run(rank: int, tiny_model: Path, cache_dir: Path, overrides: list[str], out: Path, kind: str) -> dict:
    """Train to step N; `uninterrupted` writes the step-K checkpoint (as worker.py: rank 0, after the
    collective gather), the others resume from it, `no_optimizer` without its optimizer state.
    Returns the final weights on rank 0, and for `resumed` the optimizer state right after loading."""
    import torch.distributed as dist

    from oikyo_ray.train.checkpoint import load_weights, restore, write_checkpoint
    from oikyo_ray.train.engine import build_engine
    from oikyo_ray.train.loop import LoopHooks, train_loop

    cfg, model, _, epochs, _ = local_setup(tiny_model, cache_dir, [*COMMON, *overrides])
    ckpt, state, got = out / "ckpt", None, {}
    if kind != "uninterrupted":
        load_weights(model, ckpt, full=cfg.method.type == "full")
    got["trainable"] = {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    engine = build_engine(model, cfg, N)
    if kind == "no_optimizer":
        engine.load_optimizer = lambda sd: None
    if kind != "uninterrupted":
        state = restore(engine, ckpt)
    if kind == "resumed":
        got["loaded"] = engine.full_state()[1]  # collective: the state just put back, gathered again

    def report(metrics, st):
        if st is None:
            return
        model_sd, optim_sd = engine.full_state()  # collective: every rank
        if rank == 0 and kind == "uninterrupted" and st.step == K:
            write_checkpoint(ckpt, model, model_sd, optim_sd, st)
        if st.step == N:
            got["final"] = {k: v.detach().clone() for k, v in model_sd.items()}

    world = dist.get_world_size()
    shard = lambda e: (b for i, b in enumerate(epochs(e)) if i % world == rank)  # noqa: E731
    train_loop(
        engine.model, shard, cfg.train, N, LoopHooks(report=report, world_size=world), engine=engine, state=state
    )
    dist.barrier()  # the checkpoint is complete before any rank reads it
    return got


def _worker(rank: int, world: int, port: int, tiny_model: str, cache_dir: str, out: str) -> None:
    """Each case: the three runs in turn; rank 0 saves the final weights and the reloaded state."""
    import os

    import torch.distributed as dist
    from safetensors.torch import save_file

    from oikyo_ray.train.checkpoint import save_optimizer

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        # DeepSpeed JIT-builds its CPU shm-comm op (~1 min): in the directory Ray Train workers use
        # (ray_train.train_func: model.cache_dir/torch_extensions), so a session builds it once
        TORCH_EXTENSIONS_DIR=str(Path(cache_dir) / "torch_extensions"),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for name, overrides in CASES.items():
        d = Path(out) / name
        for kind in RUNS:
            got = _run(rank, Path(tiny_model), Path(cache_dir), overrides, d, kind)
            if rank == 0:
                save_file(got["final"], str(d / f"{kind}.safetensors"))
                if kind == "resumed":
                    save_optimizer(got["loaded"], d / "loaded_optimizer.safetensors")
                    (d / "trainable.json").write_text(json.dumps(got["trainable"]))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tiny_model, cache_dir, tmp_path_factory) -> Path:
    pytest.importorskip("deepspeed")
    import socket

    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ds-resume")
    for name in CASES:
        (out / name).mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tiny_model), str(cache_dir), str(out)), nprocs=2, join=True)
    return out


def _weights(d: Path, kind: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(d / f"{kind}.safetensors"))


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_run_ends_with_the_uninterrupted_weights(runs, case):
    a, b = _weights(runs / case, "uninterrupted"), _weights(runs / case, "resumed")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=ATOL.get(case, 0), msg=k)


@pytest.mark.parametrize("case", list(CASES))
def test_without_the_optimizer_state_the_resume_drifts(runs, case):
    """The control: restarted moments (a fresh Adam's first steps) change the trained weights."""
    a, c = _weights(runs / case, "uninterrupted"), _weights(runs / case, "no_optimizer")
    trainable = json.loads((runs / case / "trainable.json").read_text())
    drift = max(float((a[k] - c[k]).abs().max()) for k in trainable)
    assert drift > max(1e-4, 2 * ATOL.get(case, 0)), drift


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_holds_full_moments_that_load_back(runs, case):
    """optimizer.safetensors: step K, exp_avg and exp_avg_sq of every trainable parameter in its full
    shape; loaded into a fresh 2-rank engine and gathered again, the very same tensors."""
    from oikyo_ray.train.checkpoint import OPTIM, load_optimizer

    saved = load_optimizer(runs / case / "ckpt" / OPTIM)
    trainable = json.loads((runs / case / "trainable.json").read_text())
    assert set(saved["state"]) == set(trainable)
    for name, shape in trainable.items():
        st = saved["state"][name]
        assert set(st) == {"step", "exp_avg", "exp_avg_sq"}, name
        assert float(st["step"]) == STEP.get(case, K)
        assert list(st["exp_avg"].shape) == shape and list(st["exp_avg_sq"].shape) == shape, name
        assert st["exp_avg_sq"].abs().sum() > 0, name  # real moments, not a fresh state
    assert saved["param_groups"][0]["params"] == list(trainable)
    loaded = load_optimizer(runs / case / "loaded_optimizer.safetensors")
    for name in trainable:
        for k, v in saved["state"][name].items():
            torch.testing.assert_close(loaded["state"][name][k], v, rtol=0, atol=0, msg=f"{name}.{k}")
    assert loaded["param_groups"] == saved["param_groups"]  # lr where the schedule was at step K
