"""`oikyo retrain MODEL` (the retrain stage's Ray adapter): when the policy says it is due, a new
dataset version from the model's captured traffic and feedback (retrain/dataset.py), trained
from the champion's adapter by the normal pipeline (curation, Ray Train, eval), judged against the
champion on its test split and on a held-out live slice (retrain/judge.py, in a Ray task), and,
when it passes, deployed through the gates and staging of `oikyo deploy` as the canaried
challenger. A failing retrain deploys nothing and says why in its report.

Run as:  oikyo retrain MODEL [--config CONFIG.yaml] [--force] [key=value ...]

Writes <run.root>/retrain/<model>/<stamp>/{data/*.jsonl, report.json, report.md}; the new run is
<run.root>/<model>-retrain-<stamp> and its lineage.json names its parent version and data.
"""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import ray
import yaml

from oikyo_ray.cluster import init_ray
from oikyo_ray.config import OikyoConfig, apply_overrides, validate_config
from oikyo_ray.deploy.checks import gate_failures
from oikyo_ray.deploy.ray_deploy import deploy
from oikyo_ray.drift.run import capture_root, local_run
from oikyo_ray.errors import DeployRefused
from oikyo_ray.finetune import run_finetune
from oikyo_ray.model.load import load_tokenizer, resolve_model_path
from oikyo_ray.registry import registry
from oikyo_ray.registry.registry import CHAMPION
from oikyo_ray.retrain import dataset, judge, report
from oikyo_ray.retrain.policy import due, parse_time
from oikyo_ray.runs import store
from oikyo_ray.serve.capture import read_rows
from oikyo_ray.serve.redact import load_redactor


def retrain(cfg: OikyoConfig, model: str, force: bool = False, log=print) -> dict:
    """Check the policy and, when due (or forced), retrain, judge and canary; returns the report
    (`outcome`: not_due | too_few_rows | failed | canaried). A refusal of the deploy's gates or
    budgets is a failed retrain: reported, nothing deployed."""
    root, rc = cfg.run.root, cfg.retrain
    state = registry.load(root, model)
    champion = state.version(CHAMPION)
    cap = capture_root(cfg, root)
    since = max([parse_time(champion["at"]), *_last_retrains(root, model)])
    now = datetime.now(UTC)
    first_day = (now - timedelta(days=rc.window_days)).strftime("%Y-%m-%d")
    feedback = [r for r in read_rows(store.join(cap, "feedback")) if r.get("model") == model]
    rated = sum(1 for r in feedback if (r.get("created") or 0) >= since.timestamp())
    drift_text = store.read_text(store.join(cap, "drift", model, "report.json"))
    reasons = due(rc, since, now, json.loads(drift_text) if drift_text else None, champion["version"], rated)
    stamp = now.strftime("%Y%m%d-%H%M%S")
    out = {"model": model, "stamp": stamp, "created": now.isoformat(), "reasons": reasons, "forced": force}
    out["parent"] = {k: champion.get(k) for k in ("version", "run", "adapter", "data_content_hash")}
    if not reasons and not force:
        log(f"[oikyo] retrain: {model} is not due (retrain.* triggers: nothing since {since:%Y-%m-%d %H:%M})")
        return {**out, "outcome": "not_due"}
    where = store.join(root, "retrain", model, stamp)
    log(f"[oikyo] retrain: {model} v{champion['version']}: {', '.join(reasons) or 'forced'}")

    with tempfile.TemporaryDirectory() as tmp:
        parent_dir = local_run(champion["run"], Path(tmp) / "champion")
        parent_text = (parent_dir / "config.yaml").read_text()
        parent_cfg = validate_config(yaml.safe_load(parent_text) or {}, f"{champion['run']}/config.yaml")
        completions = [
            r
            for r in read_rows(store.join(cap, "completions"))
            if r.get("model") == model and str(r.get("date")) >= first_day
        ]
        redactor = load_redactor(cfg.serve.capture.redact_function)
        parts = dataset.build(completions, feedback, parent_dir / "data", rc, redactor, seed=parent_cfg.train.seed)
        out["dataset"] = {"where": store.join(where, "data"), **parts.summary()}
        log(f"[oikyo] retrain data: {json.dumps(parts.summary())}")
        if len(parts.live) < rc.min_new_rows:
            few = f"{len(parts.live)} new rows to train on, fewer than retrain.min_new_rows={rc.min_new_rows}"
            out["failures"] = [few]
            return _finish(where, {**out, "outcome": "too_few_rows"}, log)
        files = dataset.write(parts, store.join(where, "data"))
        out["dataset"]["files"] = files
        run_cfg = _run_config(parent_cfg, cfg, model, stamp, champion["adapter"], files)
        out["run"] = store.join(root, run_cfg.run.name or "")
        run_dir = run_finetune(run_cfg, log=log, lineage={"retrain": _lineage(out, rc)})

        summary = registry.run_summary(out["run"])
        failures = gate_failures(summary, cfg.deploy.require_eval)
        model_path = resolve_model_path(parent_cfg.model)
        tok = load_tokenizer(parent_cfg.model, model_path)
        items = {
            "test": judge.test_items(parent_dir / "data"),
            "live": judge.row_items(parts.live_eval, tok, run_cfg.data),
        }
        adapters = {"champion": str(parent_dir / "adapter"), "challenger": str(run_dir / "adapter")}
        out["figures"] = _judge(parent_cfg, model_path, adapters, items)
        failures += judge.verdict(out["figures"], rc)
        log(f"[oikyo] retrain judge: {json.dumps(out['figures'])}")
    if failures:
        out["failures"] = failures
        return _finish(where, {**out, "outcome": "failed"}, log)
    try:
        done = deploy(cfg, out["run"], model, canary=rc.canary_percent, log=log)
    except DeployRefused as e:
        out["failures"] = [str(e)]
        return _finish(where, {**out, "outcome": "failed"}, log)
    out["deployed"] = {"version": done["version"], "canary": done["canary"], "staging": done["staging"]}
    return _finish(where, {**out, "outcome": "canaried"}, log)


def _last_retrains(root: str, model: str) -> list[datetime]:
    """When earlier retrains of the model trained a challenger (passed or failed): what they saw
    does not trigger another."""
    base = store.join(root, "retrain", model)
    out = []
    for name in store.list_dirs(base) if store.exists(base) else []:
        text = store.read_text(store.join(base, name, "report.json"))
        if text and json.loads(text).get("outcome") in ("canaried", "failed"):
            out.append(datetime.strptime(name, "%Y%m%d-%H%M%S").replace(tzinfo=UTC))
    return out


def _run_config(
    parent: OikyoConfig, cfg: OikyoConfig, model: str, stamp: str, adapter: str, files: dict
) -> OikyoConfig:
    """The champion's config, trained on the new dataset from the champion's adapter, written
    where the registry lives; retrain.overrides on top."""
    base = parent.model_dump(mode="json")
    base["data"]["paths"] = [files[k] for k in ("live", "replay") if k in files]
    base["data"]["licenses"] = {}
    base["method"]["init_adapter"] = adapter
    if cfg.retrain.objective == "dpo":
        base["method"]["objective"] = "dpo"
    base["run"].update(root=cfg.run.root, name=f"{model}-retrain-{stamp}", serve_after=False)
    base["model"]["cache_dir"] = cfg.model.cache_dir
    base["retrain"] = cfg.retrain.model_dump(mode="json")
    return validate_config(apply_overrides(base, cfg.retrain.overrides), "retrain.overrides")


def _lineage(out: dict, rc) -> dict:
    return {
        "model": out["model"],
        "parent": out["parent"],
        "reasons": out["reasons"] or ["forced"],
        "dataset": out["dataset"],
        "policy": rc.model_dump(mode="json"),
    }


def _judge(cfg: OikyoConfig, model_path: str, adapters: dict, items: dict) -> dict:
    """judge.losses in a Ray task: on a GPU node when the run trains on GPUs."""
    gpus = 1 if cfg.scaling.use_gpu else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus)(judge.losses)
    init_ray()
    return ray.get(task.remote(cfg, model_path, adapters, items))


def _finish(where: str, out: dict, log) -> dict:
    out["finished"] = datetime.now(UTC).isoformat()
    report.write(where, out)
    verdict = {"canaried": "passed, canaried", "failed": "FAILED, nothing deployed", "too_few_rows": "not run"}
    log(f"[oikyo] retrain {out['model']}: {verdict[out['outcome']]}; report in {where}/report.md")
    for f in out.get("failures", []):
        log(f"[oikyo]   - {f}")
    return out
