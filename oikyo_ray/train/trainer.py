"""Ray Train orchestration: a TorchTrainer whose workers run `loop.train_loop` on streamed shards.

    fit(cfg, run_dir, model_path, manifest) -> path of the final adapter/model checkpoint
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from oikyo_ray.config import OikyoConfig
from oikyo_ray.errors import OikyoError

CKPT_STATE = "trainer_state.json"


def _save(model, tokenizer, out: Path, state: dict) -> None:
    """Adapter-only for peft models, full weights otherwise; safetensors either way."""
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / CKPT_STATE).write_text(json.dumps(state))


def train_func(loop_config: dict) -> None:
    """Per-worker entry point (runs inside Ray Train workers)."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from oikyo_ray.model.load import load_model, load_tokenizer
    from oikyo_ray.model.methods import apply_method
    from oikyo_ray.train.loop import LoopHooks, collate, shuffled_batches, train_loop

    cfg = OikyoConfig.model_validate(loop_config["config"])  # re-validated on every worker
    tc = cfg.train
    if not cfg.scaling.use_gpu:
        torch.set_num_threads(cfg.scaling.torch_threads)
    torch.manual_seed(tc.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    tok = load_tokenizer(cfg.model, loop_config["model_path"])
    model = apply_method(load_model(cfg.model, loop_config["model_path"]), cfg.method)
    raw_model = model
    model = ray.train.torch.prepare_model(model)
    pad = tok.pad_token_id

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if loop_config["has_val"] else None
    device = ray.train.torch.get_device()

    def to_device(b):
        return {k: v.to(device) for k, v in b.items()}

    cached: list[dict] = []
    cache = loop_config["rows_per_worker"] <= cfg.scaling.cache_shard_rows

    def epochs(epoch: int):
        # Small shards stream once, then replay from worker memory: Ray Data's per-epoch
        # start-up (seconds) would otherwise dominate short epochs.
        if cache and cached:
            yield from (to_device(collate(b, pad)) for b in shuffled_batches(cached, tc.batch_size, tc.seed + epoch))
            return
        for b in train_shard.iter_batches(batch_size=tc.batch_size, batch_format="numpy", drop_last=True,
                                          local_shuffle_buffer_size=4 * tc.batch_size,
                                          local_shuffle_seed=tc.seed + epoch):
            if cache:
                cached.extend({"input_ids": i, "labels": l} for i, l in zip(b["input_ids"], b["labels"]))
            yield to_device(collate(b, pad))

    def val_batches():
        for b in val_shard.iter_batches(batch_size=tc.batch_size, batch_format="numpy"):
            yield to_device(collate(b, pad))

    def all_reduce(t):
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t)
        return t

    def report(metrics: dict, checkpoint: bool) -> None:
        if checkpoint and rank == 0:
            with tempfile.TemporaryDirectory() as d:
                _save(raw_model, tok, Path(d), {"step": metrics["step"], "epoch": metrics["epoch"]})
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)

    hooks = LoopHooks(report=report, val_batches=val_batches if val_shard else None,
                      all_reduce=all_reduce, world_size=world)
    train_loop(model, epochs, tc, loop_config["steps"], hooks, eval_model=raw_model)


class MetricsLog:
    """Controller-side callback: one JSONL line per report (runs on the driver's node)."""

    def __new__(cls, path: Path):
        import ray.train

        class _Log(ray.train.UserCallback):
            def __init__(self, p: str):
                self.path = p

            def after_report(self, run_context, metrics, checkpoint):
                line = dict(metrics[0], time=time.time())
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(line) + "\n")

        return _Log(str(path))


def fit(cfg: OikyoConfig, run_dir: Path, model_path: str, manifest: dict, log=print) -> Path:
    """Train on the prepared splits under run_dir/data; return the final checkpoint dir."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from oikyo_ray.data.pipeline import read_split
    from oikyo_ray.train.loop import total_steps

    sc = cfg.scaling
    counts = manifest["counts"]
    rows_per_worker = counts["train"] // sc.num_workers
    if rows_per_worker < cfg.train.batch_size:
        raise OikyoError(
            f"{counts['train']} training rows across {sc.num_workers} workers is less than one batch "
            f"of train.batch_size={cfg.train.batch_size} per worker",
            hint="add data, lower train.batch_size or scaling.num_workers",
        )
    steps = total_steps(cfg.train, rows_per_worker)
    has_val = counts["val"] >= sc.num_workers
    datasets = {"train": read_split(run_dir / "data", "train")}
    if has_val:
        datasets["val"] = read_split(run_dir / "data", "val")
    log(f"train: {sc.num_workers} worker(s) x {cfg.train.batch_size} rows, {steps} steps, method={cfg.method.type}")

    # Train V2's report() blocks until the controller polls (default every 2 s): with reports
    # every few steps that poll, not compute, would set the pace. Ray propagates this to workers.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    resources = {"CPU": sc.cpus_per_worker}
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"config": cfg.model_dump(mode="json"), "model_path": model_path,
                           "steps": steps, "has_val": has_val, "rows_per_worker": rows_per_worker},
        scaling_config=ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                               resources_per_worker=resources),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=list(datasets)),
        run_config=ray.train.RunConfig(
            name="checkpoints",
            storage_path=str(run_dir.resolve()),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[MetricsLog(run_dir / "metrics.jsonl")],
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise OikyoError(f"training failed: {e}", hint=f"see worker logs; metrics so far in {run_dir / 'metrics.jsonl'}") from None
    if result.checkpoint is None:
        raise OikyoError("training produced no checkpoint")
    final = run_dir / ("adapter" if cfg.method.type != "full" else "model")
    result.checkpoint.to_directory(str(final))
    return final
