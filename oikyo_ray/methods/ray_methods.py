"""Full fine-tuning vs PEFT on Ray (the methods stage's only Ray module): the data is prepared once
(Ray Data), then each method of compare_methods.methods trains on it for the same steps (Ray Train)
and is evaluated on the test split; table.py writes what each cost and bought.

    run_compare(cfg) -> (out_dir, failed)   <run.root>/<name>/: data/, <method>/ (a run each),
                                            methods.json, methods.md, methods.png

The methods train one after another, each with the config's `scaling` workers. A method that
cannot run here (qlora without bitsandbytes) is skipped with the reason; one that fails is
recorded with its error, and the others still run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from oikyo_ray.cluster import init_ray
from oikyo_ray.config import OikyoConfig, dump_yaml
from oikyo_ray.data.licenses import check_licenses
from oikyo_ray.data.paths import expand_paths
from oikyo_ray.data.prepared import load_split_rows
from oikyo_ray.data.ray_data import prepare
from oikyo_ray.errors import ConfigError, ModelError, OikyoError
from oikyo_ray.eval import ray_eval
from oikyo_ray.eval.compare import check_eval
from oikyo_ray.eval.report import write_report
from oikyo_ray.methods.table import method_row, write_table
from oikyo_ray.model.load import load_tokenizer, resolve_model_path
from oikyo_ray.model.methods import check_method
from oikyo_ray.runs import store
from oikyo_ray.runs.cost import train_cost
from oikyo_ray.runs.rundir import create_run_dir, publishing
from oikyo_ray.sweep.space import with_params
from oikyo_ray.train.checks import check_before_ray
from oikyo_ray.train.ray_train import fit


def method_configs(cfg: OikyoConfig) -> tuple[dict[str, OikyoConfig], dict[str, str]]:
    """Each method's config (the base one with method.type and its learning rate set), and the
    methods skipped with the reason; refused before Ray starts where the config cannot run."""
    cm = cfg.compare_methods
    if not cfg.eval.enabled:
        raise ConfigError("eval.enabled=false: oikyo compare-methods compares methods by their evaluation")
    check_eval(cfg)  # eval.lm_eval_tasks: before the methods train, not after
    base = cfg.model_dump(mode="json")
    out, skipped = {}, {}
    for m in cm.methods:
        params = {"method.type": m, "train.lr": cm.lr.get(m, cfg.train.lr)}
        variant = with_params(base, params)
        try:
            check_method(variant.method)
        except ModelError as e:
            skipped[m] = str(e).splitlines()[0]
            continue
        check_before_ray(variant)
        out[m] = variant
    if not out:
        raise ConfigError(f"compare_methods.methods: none can run here ({json.dumps(skipped)})")
    return out, skipped


def run_compare(cfg: OikyoConfig, log=print) -> tuple[Path, list[str]]:
    variants, skipped = method_configs(cfg)
    model_path = resolve_model_path(cfg.model)
    load_tokenizer(cfg.model, model_path)
    expand_paths(cfg.data.paths)
    check_licenses(cfg, model_path, warn=log)
    out_dir = create_run_dir(cfg, cfg.run.name or f"methods-{cfg.config_hash()[:8]}")
    (out_dir / "config.yaml").write_text(dump_yaml(cfg))
    log(f"[oikyo] compare-methods: {', '.join(variants)} in {store.join(cfg.run.root, out_dir.name)}")
    rows, failed = [], []
    with publishing(cfg, out_dir, log) as publish:
        init_ray()
        manifest = prepare(cfg, model_path, out_dir / "data")
        publish()
        for m, variant in variants.items():
            run_dir = out_dir / m
            run_dir.mkdir()
            (run_dir / "data").symlink_to(out_dir / "data", target_is_directory=True)
            (run_dir / "config.yaml").write_text(dump_yaml(variant))
            log(f"[oikyo] compare-methods: {m} (lr {variant.train.lr:g})")
            try:
                started = time.perf_counter()
                final = fit(variant, run_dir, model_path, manifest, log=log)
                seconds = time.perf_counter() - started
                rows_ = load_split_rows(out_dir / "data", "test")
                report = write_report(variant, model_path, str(final), rows_, run_dir / "eval", scorer=ray_eval.score)
            except OikyoError as e:  # one method's failure is recorded; the others still run
                skipped[m] = f"failed: {str(e).splitlines()[0]}"
                failed.append(m)
                continue
            cost = train_cost(variant.scaling, seconds, variant.cost)["cost"]
            rows.append(method_row(m, run_dir, Path(final), report, seconds, cost))
            publish()
        table = write_table(rows, skipped, out_dir)
        log(table)
    return out_dir, failed
