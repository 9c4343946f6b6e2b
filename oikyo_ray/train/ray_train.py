"""Training on Ray Train (the train stage's only Ray module): a TorchTrainer whose workers run the
core loop (loop.py) on their dataset shards and report metrics and checkpoints back. What a step
minimises is method.objective's (objective.py): the split's columns, batches and step loss.

    fit(cfg, run_dir, model_path, manifest) -> path of the final adapter/model directory

Checkpoints go to <checkpoint.storage_path or run_dir>/checkpoints; running fit again for the same
run (same name and storage) resumes from the newest one, and so do worker restarts
(scaling.max_failures).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer

from oikyo_ray.config import OikyoConfig
from oikyo_ray.console import progress
from oikyo_ray.data.ray_data import read_split
from oikyo_ray.errors import OikyoError
from oikyo_ray.model.load import load_tokenizer
from oikyo_ray.train.checkpoint import choose_final, drop_training_state, restore, write_checkpoint
from oikyo_ray.train.checks import check_before_ray, check_objective_data, check_train_split, has_val_split
from oikyo_ray.train.engine import build_engine
from oikyo_ray.train.epochs import cached_epochs
from oikyo_ray.train.loop import LoopHooks, StepHookFactory, collate, train_loop
from oikyo_ray.train.monitor import TensorBoardLog, following, plot_losses
from oikyo_ray.train.objective import batch_collate, row_columns, step_loss
from oikyo_ray.train.start import load_model_to_train, seed_everything
from oikyo_ray.train.steps import objective_counts, rows_per_worker, run_steps
from oikyo_ray.train.storage import checkpoint_storage


class MetricsLog(ray.train.UserCallback):
    """Controller-side callback: one JSONL line and TensorBoard scalars per report."""

    def __init__(self, run_dir: Path):
        self.path, self.tb = str(run_dir / "metrics.jsonl"), TensorBoardLog(run_dir / "tensorboard")

    def after_report(self, run_context, metrics, checkpoint):
        nodes = sorted({m.pop("node_id") for m in metrics if "node_id" in m})
        line = dict(metrics[0], time=time.time(), **({"nodes": nodes} if nodes else {}))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        self.tb.write(line)


class Reporter:
    """`ray.train.report` calls made from one background thread, in call order.

    A report blocks its caller for a round trip to Ray Train's synchronisation actor and, while
    the previous report is not yet collected, until the controller's next poll (every
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): with frequent reports and short steps that wait, not
    compute, would set the pace. Here training goes on while a metrics report is delivered; it
    waits only when more than `backlog` reports are still pending (so a slow controller still
    throttles it), and for a report with a checkpoint, whose directory is temporary. A failed
    report raises in the training thread at a later `send` or at `close`.

    train_func uses backlog 0 (every report delivered before training goes on, as a plain
    ray.train.report) with several workers: the next step's collective must not let another
    rank run ahead and fail while this rank's report is undelivered, or the run would lose that
    report (a metrics line, or a checkpoint that a restart should resume from)."""

    def __init__(self, report=ray.train.report, backlog: int = 2):
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


def _shard_epochs(shard, cfg: OikyoConfig, pad: int, to_device, cache: bool, collate_rows=collate):
    """epoch -> batches of this worker's shard: held in memory when small enough (the same batches
    in the same order on every run, epochs.py), else streamed through Ray Data's seeded local shuffle."""
    tc = cfg.train
    if cache:
        read = lambda: shard.iter_batches(batch_size=1024, batch_format="numpy")  # noqa: E731
        return cached_epochs(read, tc, pad, to_device, collate_rows)

    def epochs(epoch: int):
        for b in shard.iter_batches(
            batch_size=tc.batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=4 * tc.batch_size,
            local_shuffle_seed=tc.seed + epoch,
        ):
            yield to_device(collate_rows(b, pad))

    return epochs


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def train_func(loop_config: dict) -> None:
    """Per-worker entry point (runs inside Ray Train workers): load (or resume), wrap for the
    strategy, run the loop on this worker's shard, report metrics and checkpoints."""
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
    with ckpt.as_directory() if ckpt else tempfile.TemporaryDirectory() as d:
        ckpt_dir = Path(d) if ckpt else None
        tok = load_tokenizer(cfg.model, loop_config["model_path"])
        raw_model = load_model_to_train(cfg, loop_config["model_path"], ckpt_dir)
        if cfg.method.type != "qlora":  # a 4-bit base is placed by bitsandbytes
            raw_model = raw_model.to(device)
        engine = build_engine(raw_model, cfg, steps, device)
        state = restore(engine, ckpt_dir) if ckpt_dir else None
    pad = tok.pad_token_id

    def to_device(b):  # num_tokens only feeds the host-side token count: it stays on the host
        return {k: v if k == "num_tokens" else v.to(device) for k, v in b.items()}

    # the objective's batches and loss (train/objective.py); sft: the loop's own
    collate_rows, loss = batch_collate(cfg.method) or collate, step_loss(cfg.method)
    cache = loop_config["rows_per_worker"] <= cfg.scaling.cache_shard_rows
    epochs = _shard_epochs(ray.train.get_dataset_shard("train"), cfg, pad, to_device, cache, collate_rows)
    val_shard = ray.train.get_dataset_shard("val") if loop_config["has_val"] else None

    def val_batches():
        for b in val_shard.iter_batches(batch_size=tc.batch_size, batch_format="numpy"):
            yield to_device(collate_rows(b, pad))

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

    step_hook = loop_config["step_hook"]
    hooks = LoopHooks(
        report=report,
        val_batches=val_batches if val_shard else None,
        all_reduce=_all_reduce,
        world_size=world,
        on_step=step_hook(rank) if step_hook else None,
        eval_at_checkpoint=cfg.checkpoint.score is not None,
    )
    try:
        train_loop(engine.model, epochs, tc, steps, hooks, engine=engine, state=state, step_loss=loss)
    except BaseException:
        reporter.close(timeout=30)  # the metrics reported before a failure still reach the log
        raise
    reporter.close()


def _show_step(bar, metrics: dict) -> None:
    """One metrics line on the training bar: the step it reached, its losses as the postfix."""
    if "step" in metrics:
        losses = {k: f"{metrics[k]:.4f}" for k in ("loss", "val_loss") if isinstance(metrics.get(k), float)}
        bar.moveto(int(metrics["step"]), **losses)


def fit(
    cfg: OikyoConfig,
    run_dir: Path,
    model_path: str,
    manifest: dict,
    log=print,
    callbacks: tuple = (),
    step_hook: StepHookFactory | None = None,
    show_progress: bool = True,
    on_metrics=None,
) -> Path:
    """Train on the prepared splits under run_dir/data; return the final checkpoint dir.
    `callbacks`: extra Ray Train UserCallbacks (a sweep passes Tune's report callback).
    `step_hook(rank)`: each worker's LoopHooks.on_step (loop.StepHookFactory; picklable).
    `show_progress`: a progress bar of optimizer steps (loss, steps/s, ETA) on stderr.
    `on_metrics(row)`: each metrics line as it is written (the run's trackers)."""
    check_before_ray(cfg)
    check_objective_data(cfg, manifest)
    manifest = objective_counts(cfg, manifest, run_dir / "data")  # the rows the objective trains on
    check_train_split(cfg, manifest)
    sc, ck = cfg.scaling, cfg.checkpoint
    steps, has_val = run_steps(cfg, manifest), has_val_split(cfg, manifest)
    read = partial(read_split, run_dir / "data", columns=row_columns(cfg.method), fitting=cfg.method.objective != "sft")
    datasets = {"train": read("train", packed=cfg.data.packing)}
    if has_val:
        datasets["val"] = read("val")
    log(
        f"train: {sc.num_workers} worker(s) x {cfg.train.batch_size} rows, {steps} steps, "
        f"method={cfg.method.type}, objective={cfg.method.objective}, strategy={sc.strategy}"
    )

    # Train V2's report() blocks until the controller polls (default every 2 s): with reports
    # every few steps that poll, not compute, would set the pace. Ray propagates this to workers.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True  # the same rows reach the same worker on every run (exact resume)
    storage_path, storage_fs = checkpoint_storage(cfg, run_dir)
    trainer = TorchTrainer(
        train_func,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "model_path": model_path,
            "steps": steps,
            "has_val": has_val,
            "rows_per_worker": rows_per_worker(cfg, manifest),
            "step_hook": step_hook,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker={"CPU": sc.cpus_per_worker},
            placement_strategy=sc.placement_strategy,
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=list(datasets), execution_options=ingest),
        run_config=ray.train.RunConfig(
            name="checkpoints",
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=ck.num_to_keep, checkpoint_score_attribute=ck.score, checkpoint_score_order="min"
            ),
            failure_config=ray.train.FailureConfig(max_failures=sc.max_failures),
            callbacks=[MetricsLog(run_dir), *callbacks],
        ),
    )
    try:
        with ExitStack() as shown:
            if show_progress:
                bar = shown.enter_context(progress(steps, "train"))
                shown.enter_context(following(run_dir / "metrics.jsonl", partial(_show_step, bar)))
            if on_metrics is not None:
                shown.enter_context(following(run_dir / "metrics.jsonl", on_metrics))
            result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise OikyoError(
            f"training failed: {e}",
            hint=f"see worker logs; metrics so far in "
            f"{run_dir / 'metrics.jsonl'}; run again with the same run name to resume",
        ) from None
    finally:
        try:
            plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
        except Exception as e:  # a plot must never fail a run
            log(f"train: no loss plot ({e})")
    ckpt = choose_final(ck.final, result.best_checkpoints or [], result.checkpoint)
    if ckpt is None:
        raise OikyoError("training produced no checkpoint")
    final = run_dir / ("adapter" if cfg.method.type != "full" else "model")
    if final.exists():
        shutil.rmtree(final)
    ckpt.to_directory(str(final))
    drop_training_state(final)
    return final
