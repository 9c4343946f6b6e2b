"""k-fold cross-validation on Ray (the cv stage's only Ray module): the data is prepared once
(Ray Data), cut into folds (folds.py), and each fold is a training run (Ray Train) evaluated on
the shared test split; the folds' metrics are summarised as mean ± std.

    run_cv(cfg) -> cv_dir   <run.root>/<name>/: data/, fold-<i>/ (a run each), cv.json, cv.md

The folds train one after another: each takes the cluster's `scaling` workers, as a finetune does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from oikyo_ray.cluster import init_ray
from oikyo_ray.config import OikyoConfig, dump_yaml
from oikyo_ray.cv.folds import markdown, summarise, write_folds
from oikyo_ray.data.licenses import check_licenses
from oikyo_ray.data.paths import expand_paths
from oikyo_ray.data.prepared import load_split_rows
from oikyo_ray.data.ray_data import prepare
from oikyo_ray.errors import ConfigError
from oikyo_ray.eval import ray_eval
from oikyo_ray.eval.compare import check_eval
from oikyo_ray.eval.report import write_report
from oikyo_ray.model.load import load_tokenizer, resolve_model_path
from oikyo_ray.runs import store
from oikyo_ray.runs.rundir import create_run_dir, publishing
from oikyo_ray.train.checks import check_before_ray
from oikyo_ray.train.monitor import read_metrics
from oikyo_ray.train.ray_train import fit


def _check(cfg: OikyoConfig) -> None:
    check_before_ray(cfg)
    if cfg.eval.enabled:
        check_eval(cfg)  # eval.lm_eval_tasks: before the folds train, not after
    if cfg.data.packing:
        raise ConfigError(
            "data.packing: oikyo cv cuts folds out of the tokenised rows and does not pack them again yet",
            hint="set data.packing=false",
        )


def fold_metrics(cfg: OikyoConfig, run_dir: Path, report: dict | None) -> dict[str, float]:
    """What one fold contributes: its best val_loss, and the tuned model's test metrics."""
    vals = [r["val_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r]
    out = {"best_val_loss": min(vals)} if vals else {}
    for name, value in ((report or {}).get("tuned") or {}).items():
        if isinstance(value, (int, float)) and name != "n" and math.isfinite(value):
            out[f"test_{name}"] = float(value)
    return out


def run_cv(cfg: OikyoConfig, log=print) -> Path:
    _check(cfg)  # before Ray starts, like finetune
    model_path = resolve_model_path(cfg.model)
    load_tokenizer(cfg.model, model_path)
    expand_paths(cfg.data.paths)
    licenses = check_licenses(cfg, model_path, warn=log)
    k = cfg.cv.folds
    cv_dir = create_run_dir(cfg, cfg.run.name or f"cv-{cfg.config_hash()[:8]}")
    (cv_dir / "config.yaml").write_text(dump_yaml(cfg))
    log(f"[oikyo] cv: {k} folds in {store.join(cfg.run.root, cv_dir.name)}")
    with publishing(cfg, cv_dir, log) as publish:
        init_ray()
        prepare(cfg, model_path, cv_dir / "data")
        folds = write_folds(cv_dir / "data", cv_dir, k, cfg.cv.salt)
        publish()
        per_fold = []
        for i, (run_dir, manifest) in enumerate(folds):
            n = manifest["counts"]
            log(f"[oikyo] cv: fold {i + 1}/{k}: {n['train']} train, {n['val']} val rows")
            (run_dir / "config.yaml").write_text(dump_yaml(cfg))
            final = fit(cfg, run_dir, model_path, manifest, log=log)
            report = None
            if cfg.eval.enabled:
                rows = load_split_rows(run_dir / "data", "test")
                report = write_report(cfg, model_path, str(final), rows, run_dir / "eval", scorer=ray_eval.score)
            per_fold.append(fold_metrics(cfg, run_dir, report))
            publish()
        summary = summarise(per_fold)
        table = markdown(summary, k)
        result = {"folds": k, "salt": cfg.cv.salt, "per_fold": per_fold, "summary": summary, "licenses": licenses}
        (cv_dir / "cv.json").write_text(json.dumps(result, indent=2, default=str))
        (cv_dir / "cv.md").write_text(table + "\n")
        log(table)
    return cv_dir
