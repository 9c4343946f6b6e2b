"""Ray Train orchestration: a TorchTrainer whose workers (worker.py) run `loop.train_loop` on shards.

    fit(cfg, run_dir, model_path, manifest) -> path of the final adapter/model directory

Checkpoints go to <checkpoint.storage_path or run_dir>/checkpoints; running fit again for the same
run (same name and storage) resumes from the newest one, and so do worker restarts
(scaling.max_failures).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from oikyo_ray.config import OikyoConfig
from oikyo_ray.errors import OikyoError
from oikyo_ray.train.worker import train_func

TEST_FAIL_ENV = "OIKYO_TEST_FAIL_AT"  # test-only: "<step>[,<step>...]:<marker prefix>": rank 0 raises once per step


class MetricsLog:
    """Controller-side callback: one JSONL line and TensorBoard scalars per report."""

    def __new__(cls, run_dir: Path):
        import ray.train

        from oikyo_ray.train.monitor import TensorBoardLog

        class _Log(ray.train.UserCallback):
            def __init__(self, d: Path):
                self.path, self.tb = str(d / "metrics.jsonl"), TensorBoardLog(d / "tensorboard")

            def after_report(self, run_context, metrics, checkpoint):
                nodes = sorted({m.pop("node_id") for m in metrics if "node_id" in m})
                line = dict(metrics[0], time=time.time(), **({"nodes": nodes} if nodes else {}))
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(line) + "\n")
                self.tb.write(line)

        return _Log(run_dir)


def _storage(cfg: OikyoConfig, run_dir: Path) -> tuple[str, object | None]:
    """(storage_path, pyarrow filesystem or None) for RunConfig; s3:// goes through pyarrow with the
    endpoint and keys of the driver's environment (workers do not share the driver's env)."""
    uri = cfg.checkpoint.storage_path
    if not uri:
        return str(run_dir.resolve()), None
    if not uri.startswith("s3://"):
        return str(Path(uri).expanduser().resolve() / run_dir.name), None
    import pyarrow.fs as pafs

    from oikyo_ray.storage import filesystem

    fs, path = filesystem(uri)
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
        kw = {}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kw = {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
        fs = pafs.S3FileSystem(access_key=key, secret_key=secret, session_token=os.environ.get(
            "AWS_SESSION_TOKEN"), region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"), **kw)
    return f"{path.rstrip('/')}/{run_dir.name}", fs


def _test_fail_spec() -> dict | None:
    raw = os.environ.get(TEST_FAIL_ENV)
    if not raw:
        return None
    steps, marker = raw.split(":", 1)
    return {"steps": [int(s) for s in steps.split(",")], "marker": marker}


def check_before_ray(cfg: OikyoConfig) -> None:
    """Errors a user can fix, raised before any worker starts."""
    from oikyo_ray.model.methods import check_method

    check_method(cfg.method)
    if cfg.checkpoint.score and cfg.data.val_fraction == 0:
        raise OikyoError("checkpoint.score=val_loss needs a validation split", hint="set data.val_fraction > 0")
    if cfg.train.early_stopping_patience and cfg.data.val_fraction == 0:
        raise OikyoError("early stopping needs a validation split", hint="set data.val_fraction > 0")


def _final_checkpoint(cfg: OikyoConfig, result):
    if cfg.checkpoint.final == "best":
        scored = [(m["val_loss"], c) for c, m in (result.best_checkpoints or []) if m and "val_loss" in m]
        if scored:
            return min(scored, key=lambda t: t[0])[1]
    return result.checkpoint


def fit(cfg: OikyoConfig, run_dir: Path, model_path: str, manifest: dict, log=print,
        callbacks: tuple = ()) -> Path:
    """Train on the prepared splits under run_dir/data; return the final checkpoint dir.
    `callbacks`: extra Ray Train UserCallbacks (a sweep passes Tune's report callback)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from oikyo_ray.data.pipeline import read_split
    from oikyo_ray.train.checkpoint import TRAINING_ONLY
    from oikyo_ray.train.loop import total_steps
    from oikyo_ray.train.monitor import plot_losses

    check_before_ray(cfg)
    sc, ck = cfg.scaling, cfg.checkpoint
    counts = manifest["counts"]
    packed = cfg.data.packing
    if packed and "packing" not in manifest:
        raise OikyoError("data.packing=true but the prepared data has no packed split",
                         hint="prepare the data again with data.packing=true")
    n_train = manifest["packing"]["blocks"] if packed else counts["train"]
    rows_per_worker = n_train // sc.num_workers
    if rows_per_worker < cfg.train.batch_size * cfg.train.grad_accum:
        raise OikyoError(
            f"{n_train} training {'blocks' if packed else 'rows'} across {sc.num_workers} workers is less than one optimizer "
            f"step of train.batch_size={cfg.train.batch_size} x train.grad_accum={cfg.train.grad_accum} per worker",
            hint="add data, lower train.batch_size, train.grad_accum or scaling.num_workers",
        )
    steps = total_steps(cfg.train, rows_per_worker)
    has_val = counts["val"] >= sc.num_workers
    if (ck.score or cfg.train.early_stopping_patience) and not has_val:
        raise OikyoError(f"{counts['val']} validation rows: too few for val_loss on {sc.num_workers} workers",
                         hint="raise data.val_fraction or turn off checkpoint.score / early stopping")
    datasets = {"train": read_split(run_dir / "data", "train", packed=packed)}
    if has_val:
        datasets["val"] = read_split(run_dir / "data", "val")
    log(f"train: {sc.num_workers} worker(s) x {cfg.train.batch_size} rows, {steps} steps, "
        f"method={cfg.method.type}, strategy={sc.strategy}")

    # Train V2's report() blocks until the controller polls (default every 2 s): with reports
    # every few steps that poll, not compute, would set the pace. Ray propagates this to workers.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True  # the same rows reach the same worker on every run (exact resume)
    storage_path, storage_fs = _storage(cfg, run_dir)
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"config": cfg.model_dump(mode="json"), "model_path": model_path, "steps": steps,
                           "has_val": has_val, "rows_per_worker": rows_per_worker,
                           "test_fail_at": _test_fail_spec()},
        scaling_config=ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                               resources_per_worker={"CPU": sc.cpus_per_worker},
                                               placement_strategy=sc.placement_strategy),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=list(datasets), execution_options=ingest),
        run_config=ray.train.RunConfig(
            name="checkpoints",
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=ck.num_to_keep, checkpoint_score_attribute=ck.score,
                checkpoint_score_order="min"),
            failure_config=ray.train.FailureConfig(max_failures=sc.max_failures),
            callbacks=[MetricsLog(run_dir), *callbacks],
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise OikyoError(f"training failed: {e}", hint=f"see worker logs; metrics so far in "
                         f"{run_dir / 'metrics.jsonl'}; run again with the same run name to resume") from None
    finally:
        try:
            plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
        except Exception as e:  # a plot must never fail a run
            log(f"train: no loss plot ({e})")
    ckpt = _final_checkpoint(cfg, result)
    if ckpt is None:
        raise OikyoError("training produced no checkpoint")
    final = run_dir / ("adapter" if cfg.method.type != "full" else "model")
    if final.exists():
        shutil.rmtree(final)
    ckpt.to_directory(str(final))
    for name in TRAINING_ONLY:
        (final / name).unlink(missing_ok=True)
    return final
