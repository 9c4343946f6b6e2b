"""The whole pipeline for one config: curate (Ray Data) -> train (Ray Train) -> evaluate -> serve.

    run_finetune(cfg) -> run_dir
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from oikyo_ray.config import OikyoConfig


def _step(log, name: str):
    t0 = time.perf_counter()
    log(f"[oikyo] {name} ...")
    return lambda extra="": log(f"[oikyo] {name} done in {time.perf_counter() - t0:.1f}s {extra}".rstrip())


def run_finetune(cfg: OikyoConfig, log=print) -> Path:
    from oikyo_ray.cluster import init_ray
    from oikyo_ray.data.pipeline import expand_paths, load_split_rows, prepare
    from oikyo_ray.model.load import load_tokenizer, resolve_model_path
    from oikyo_ray.runs.rundir import create_run_dir, write_lineage
    from oikyo_ray.train.trainer import fit

    # Everything a user can get wrong is checked here, before Ray starts and before a run dir exists.
    done = _step(log, "base model")
    model_path = resolve_model_path(cfg.model)
    load_tokenizer(cfg.model, model_path)
    done(f"({model_path})")
    expand_paths(cfg.data.paths)
    run_dir = create_run_dir(cfg)
    log(f"[oikyo] run directory: {run_dir}")
    init_ray()

    done = _step(log, "data: read, normalise, validate, split, tokenise (Ray Data)")
    manifest = prepare(cfg, model_path, run_dir / "data")
    done(json.dumps(manifest["counts"]))
    write_lineage(run_dir, cfg, manifest, model_path)

    done = _step(log, "train (Ray Train)")
    final = fit(cfg, run_dir, model_path, manifest, log=log)
    done(f"-> {final}")

    if cfg.eval.enabled:
        from oikyo_ray.eval.report import write_report

        done = _step(log, "evaluate base vs fine-tuned on the test split")
        rows = load_split_rows(run_dir / "data", "test")
        report = write_report(cfg, model_path, str(final), rows, run_dir / "eval")
        done()
        log(report["table"])

    if cfg.run.serve_after:
        from oikyo_ray.serve.demo_call import serve_and_ask

        serve_and_ask(cfg, model_path, final, log=log)
    return run_dir
