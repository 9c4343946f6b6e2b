"""What each Ray Train worker runs: load (or resume), wrap for the strategy, feed shards, checkpoint.

    train_func(loop_config)   the TorchTrainer entry point; loop_config = {"config": cfg dump, ...}
"""

from __future__ import annotations

import os
import random
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

from oikyo_ray.config import OikyoConfig


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _load(cfg: OikyoConfig, model_path: str, ckpt_dir: Path | None):
    """Base model (full: the checkpoint's weights) with the method applied and weights restored."""
    from oikyo_ray.model.load import load_model
    from oikyo_ray.model.methods import apply_method, quantization_config
    from oikyo_ray.train.checkpoint import load_weights

    base = load_model(cfg.model, model_path, quantization_config(cfg.method, cfg.scaling.use_gpu))
    model = apply_method(base, cfg.method, cfg.train.gradient_checkpointing)
    if ckpt_dir is not None:
        load_weights(model, ckpt_dir, full=cfg.method.type == "full")
    return model


def _rows_key(r: dict) -> bytes:
    import numpy as np

    return np.asarray(r["input_ids"], dtype=np.int64).tobytes()


def make_epochs(shard, cfg: OikyoConfig, pad: int, to_device, cache: bool):
    """epoch -> batches. Cached shards are read once, sorted by content (independent of streaming
    order) and reshuffled with seed + epoch: the same batches in the same order on every run."""
    from oikyo_ray.train.loop import collate, shuffled_batches

    tc = cfg.train
    rows: list[dict] = []

    def epochs(epoch: int):
        if cache:
            if not rows:
                for b in shard.iter_batches(batch_size=1024, batch_format="numpy"):
                    rows.extend(dict(zip(b, vals)) for vals in zip(*b.values()))
                rows.sort(key=_rows_key)
            yield from (to_device(collate(b, pad)) for b in shuffled_batches(rows, tc.batch_size, tc.seed + epoch))
            return
        for b in shard.iter_batches(batch_size=tc.batch_size, batch_format="numpy", drop_last=True,
                                    local_shuffle_buffer_size=4 * tc.batch_size, local_shuffle_seed=tc.seed + epoch):
            yield to_device(collate(b, pad))

    return epochs


class Reporter:
    """`ray.train.report` calls made from one background thread, in call order.

    A report blocks its caller for a round trip to Ray Train's synchronisation actor (~3 ms) and,
    while the previous report is not yet collected, until the controller's next poll (every
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): at train.log_every=10 that was 5-10% of the time of 20 ms
    steps. Here training goes on while a metrics report is delivered; it waits only when more than
    `backlog` reports are still pending (so a slow controller still throttles it), and for a
    report with a checkpoint, whose directory is temporary. A failed report raises in the
    training thread at a later `send` or at `close`. `report`: ray.train.report unless given.

    train_func uses backlog 0 (every report delivered before training goes on, as a plain
    ray.train.report) with several workers: the next step's collective must not let another
    rank run ahead and fail while this rank's report is undelivered, or the run would lose that
    report (a metrics line, or a checkpoint that a restart should resume from)."""

    def __init__(self, report=None, backlog: int = 2):
        if report is None:
            import ray.train

            report = ray.train.report
        self.report, self.backlog = report, backlog
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="oikyo-report")
        self._pending: list[Future] = []

    def send(self, metrics: dict, checkpoint=None) -> None:
        kwargs = {"checkpoint": checkpoint} if checkpoint is not None else {}
        self._pending.append(self._pool.submit(self.report, metrics, **kwargs))
        limit = 0 if checkpoint is not None else self.backlog
        while self._pending and (self._pending[0].done() or len(self._pending) > limit):
            self._pending.pop(0).result()  # waits for the oldest; raises its error

    def close(self, timeout: float | None = None) -> None:
        """Deliver every pending report (or give up after `timeout` s), then stop the thread."""
        wait(self._pending, timeout=timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if timeout is None:
            for f in self._pending:
                f.result()
        self._pending = []


def _fail_once(spec: dict | None, rank: int):
    """Test-only fault injection (OIKYO_TEST_FAIL_AT on the driver): rank 0 raises once at each of
    the given steps (a marker file per step remembers it across restarts)."""
    if not spec:
        return None

    def on_step(state) -> None:
        marker = Path(f"{spec['marker']}.{state.step}")
        if state.step in spec["steps"] and rank == 0 and not marker.exists():
            marker.write_text(str(state.step))
            raise RuntimeError(f"injected failure at step {state.step} (test)")

    return on_step


def train_func(loop_config: dict) -> None:
    """Per-worker entry point (runs inside Ray Train workers)."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from oikyo_ray.model.load import load_tokenizer
    from oikyo_ray.train.checkpoint import restore, write_checkpoint
    from oikyo_ray.train.engine import build_engine
    from oikyo_ray.train.loop import LoopHooks, collate, train_loop

    cfg = OikyoConfig.model_validate(loop_config["config"])  # re-validated on every worker
    tc = cfg.train
    if not cfg.scaling.use_gpu:
        torch.set_num_threads(cfg.scaling.torch_threads)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(cfg.model.cache_dir).expanduser() / "torch_extensions"))
    seed_everything(tc.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    steps = loop_config["steps"]

    ckpt = ray.train.get_checkpoint()
    with (ckpt.as_directory() if ckpt else tempfile.TemporaryDirectory()) as d:
        ckpt_dir = Path(d) if ckpt else None
        tok = load_tokenizer(cfg.model, loop_config["model_path"])
        raw_model = _load(cfg, loop_config["model_path"], ckpt_dir)
        if cfg.method.type != "qlora":  # a 4-bit base is placed by bitsandbytes
            raw_model = raw_model.to(device)
        engine = build_engine(raw_model, cfg, steps, device)
        state = restore(engine, ckpt_dir) if ckpt_dir else None
    pad = tok.pad_token_id

    def to_device(b):  # num_tokens only feeds the host-side token count: it stays on the host
        return {k: v if k == "num_tokens" else v.to(device) for k, v in b.items()}

    cache = loop_config["rows_per_worker"] <= cfg.scaling.cache_shard_rows
    epochs = make_epochs(ray.train.get_dataset_shard("train"), cfg, pad, to_device, cache)
    val_shard = ray.train.get_dataset_shard("val") if loop_config["has_val"] else None

    def val_batches():
        for b in val_shard.iter_batches(batch_size=tc.batch_size, batch_format="numpy"):
            yield to_device(collate(b, pad))

    def all_reduce(t):
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t)
        return t

    node = {"node_id": ray.get_runtime_context().get_node_id()}  # the first report says where we ran
    reporter = Reporter(backlog=2 if world == 1 else 0)

    def report(metrics: dict, st) -> None:
        if node:
            metrics = {**metrics, **node}
            node.clear()
        if st is None:
            reporter.send(metrics)
            return
        # gathering sharded state is collective (FSDP2, ZeRO-3): every rank takes part
        model_sd, optim_sd = engine.full_state() if (rank == 0 or engine.name != "ddp") else ({}, None)
        if rank != 0:
            reporter.send(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:  # complete before Ray persists it
            write_checkpoint(Path(tmp), raw_model, model_sd, optim_sd, st, tok)
            reporter.send(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))  # waits for it

    hooks = LoopHooks(report=report, val_batches=val_batches if val_shard else None, all_reduce=all_reduce,
                      world_size=world, on_step=_fail_once(loop_config.get("test_fail_at"), rank),
                      eval_at_checkpoint=cfg.checkpoint.score is not None)
    try:
        train_loop(engine.model, epochs, tc, steps, hooks, engine=engine, state=state)
    except BaseException:
        reporter.close(timeout=30)  # the metrics reported before a failure still reach the log
        raise
    reporter.close()
