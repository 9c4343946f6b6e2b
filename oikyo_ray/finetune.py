"""The whole pipeline for one config: curate (Ray Data) -> train (Ray Train) -> evaluate -> serve.

run_finetune(cfg) -> run_dir (local; for an s3:// run.root the staging copy of what was uploaded)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

# Importing this module imports ray: callers (the CLI) set the auth mode first (cluster.default_auth_mode).
from oikyo_ray.cluster import init_ray
from oikyo_ray.config import OikyoConfig, load_config
from oikyo_ray.data.licenses import check_licenses
from oikyo_ray.data.paths import expand_paths
from oikyo_ray.data.prepared import load_split_rows
from oikyo_ray.data.ray_data import prepare
from oikyo_ray.errors import OikyoError
from oikyo_ray.eval import ray_eval
from oikyo_ray.eval.compare import check_eval
from oikyo_ray.eval.report import write_report
from oikyo_ray.model.budget import check_serve_memory
from oikyo_ray.model.load import load_tokenizer, resolve_model_path
from oikyo_ray.runs import store
from oikyo_ray.runs.cost import add_cost, train_cost
from oikyo_ray.runs.rundir import create_run_dir, existing_run_dir, publishing, write_lineage
from oikyo_ray.serve.ray_serve import serve_and_ask
from oikyo_ray.tracking.tracker import Tracker, check_installed
from oikyo_ray.train.checks import check_before_ray
from oikyo_ray.train.ray_train import fit


def _step(log, name: str):
    t0 = time.perf_counter()
    log(f"[oikyo] {name} ...")
    return lambda extra="": log(f"[oikyo] {name} done in {time.perf_counter() - t0:.1f}s {extra}".rstrip())


def _resume_dir(cfg: OikyoConfig) -> Path:
    """The existing run directory to continue: same run.root and run.name, same settings."""
    if not cfg.run.name:
        raise OikyoError("--resume needs run.name (the run to continue)")
    run_dir = existing_run_dir(cfg, cfg.run.name)
    if not (run_dir / "config.yaml").is_file():
        raise OikyoError(f"nothing to resume: {store.join(cfg.run.root, cfg.run.name)} is not a run directory")
    if load_config(run_dir / "config.yaml").config_hash() != cfg.config_hash():
        raise OikyoError(
            f"{run_dir} was started with other settings; resume it with its own config.yaml",
            hint=f"oikyo finetune {run_dir / 'config.yaml'} --resume",
        )
    return run_dir


def run_finetune(cfg: OikyoConfig, log=print, resume: bool = False, lineage: dict | None = None) -> Path:
    """`lineage`: more to record in the run's lineage.json (a retrain's parent and data)."""
    # Everything a user can get wrong is checked here, before Ray starts and before a run dir exists.
    check_before_ray(cfg)
    if cfg.eval.enabled:
        check_eval(cfg)  # eval.lm_eval_tasks: files, names and gates, before training rather than after
    done = _step(log, "base model")
    model_path = resolve_model_path(cfg.model)
    load_tokenizer(cfg.model, model_path)
    done(f"({model_path})")
    if memory := check_serve_memory(cfg, model_path):  # a model that cannot ship: refused before training
        log(f"[oikyo] serving estimate: {memory['total_gb']:.2f} GiB (model.max_serve_memory_gb)")
    expand_paths(cfg.data.paths)
    found_licenses = check_licenses(cfg, model_path, warn=log)  # policy: refused before Ray starts
    check_installed(cfg)  # a configured tracker's package
    run_dir = _resume_dir(cfg) if resume else create_run_dir(cfg)
    where = store.join(cfg.run.root, run_dir.name)
    staged = f" (staged in {run_dir})" if store.is_remote(cfg.run.root) else ""
    log(f"[oikyo] run directory: {where}{staged}{' (resuming from its newest checkpoint)' if resume else ''}")
    tracker = Tracker.start(cfg, run_dir, log)  # MLflow / W&B as tracking.* asks (a no-op without)
    status = "FAILED"
    try:
        with publishing(cfg, run_dir, log) as publish:  # s3 run.root: uploaded after each stage
            _stages(cfg, run_dir, model_path, resume, found_licenses, lineage, tracker, publish, log)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)
    return run_dir


def _stages(cfg, run_dir, model_path, resume, found_licenses, lineage, tracker, publish, log) -> None:
    """data -> train -> evaluate (-> serve), each reported to the trackers as it ends."""
    init_ray()

    if resume and (run_dir / "data" / "manifest.json").is_file():
        manifest = json.loads((run_dir / "data" / "manifest.json").read_text())  # the same rows
    else:
        done = _step(log, "data: read, normalise, validate, split, tokenise (Ray Data)")
        manifest = prepare(cfg, model_path, run_dir / "data")
        done(json.dumps(manifest["counts"]))
        write_lineage(run_dir, cfg, manifest, model_path, licenses=found_licenses, **(lineage or {}))
        publish()

    done = _step(log, "train (Ray Train)")
    started = time.perf_counter()
    final = fit(cfg, run_dir, model_path, manifest, log=log, on_metrics=tracker.log_metrics)
    spent = add_cost(run_dir / "lineage.json", train_cost(cfg.scaling, time.perf_counter() - started, cfg.cost))
    done(f"-> {final} ({spent['cost']:.4f} {spent['currency']} so far)")
    tracker.log_file(run_dir / "loss.png")
    tracker.log_model(final)
    publish()

    if cfg.eval.enabled:
        done = _step(log, "evaluate base vs fine-tuned on the test split")
        rows = load_split_rows(run_dir / "data", "test")
        report = write_report(cfg, model_path, str(final), rows, run_dir / "eval", scorer=ray_eval.score)
        done()
        log(report["table"])
        tracker.log_eval(report, run_dir / "eval")

    if cfg.run.serve_after:
        serve_and_ask(cfg, model_path, final, log=log)
