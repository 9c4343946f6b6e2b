"""The sweep on Ray Tune (the sweep stage's only Ray module): each trial is a full oikyo training
run (ray_train.fit inside a Tune trial), ASHA stops weak trials early, the best completed trial is
promoted into the runs registry (report.py).

    run_sweep(cfg, resume=False) -> sweep_dir
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch  # imports without optuna; it is checked when chosen

from oikyo_ray.cluster import init_ray
from oikyo_ray.config import OikyoConfig, SearchDim, dump_yaml
from oikyo_ray.data.licenses import check_licenses
from oikyo_ray.data.paths import expand_paths
from oikyo_ray.data.prepared import load_split_rows
from oikyo_ray.data.ray_data import prepare
from oikyo_ray.errors import OikyoError
from oikyo_ray.eval import ray_eval
from oikyo_ray.eval.report import write_report
from oikyo_ray.model.load import load_tokenizer, resolve_model_path
from oikyo_ray.runs import store
from oikyo_ray.runs.rundir import create_run_dir, existing_run_dir, publishing, run_exists
from oikyo_ray.runs.rundir import publish as publish_run
from oikyo_ray.sweep.budget import max_t
from oikyo_ray.sweep.report import summarise, trial_rows
from oikyo_ray.sweep.space import validate_space, with_params
from oikyo_ray.tracking.tracker import Tracker, check_installed
from oikyo_ray.train.ray_train import fit
from oikyo_ray.train.steps import objective_counts

TRIAL_CPU = 0.01  # the trial function only waits on its TorchTrainer; workers hold the real CPUs


def _domain(d: SearchDim):
    if d.type == "choice":
        return tune.choice(list(d.values or []))
    low, high = float(d.low or 0), float(d.high or 0)  # set for every other type (config checks)
    if d.type == "loguniform":
        return tune.loguniform(low, high)
    if d.type == "uniform":
        return tune.uniform(low, high)
    return tune.randint(int(low), int(high))


def tune_domains(cfg: OikyoConfig) -> dict[str, Any]:
    """Ray Tune sampling domains keyed by dotted path."""
    return {path: _domain(d) for path, d in cfg.sweep.space.items()}


def _trial(tc: dict, base: dict, model_path: str, sweep_dir: str, manifest: dict) -> None:
    """One Tune trial: a whole training run in sweep_dir/trials/<trial id>, reporting to Tune.
    Only the sampled `params` are the trial's config; the rest is passed by `tune.with_parameters`,
    so a searcher (Optuna) sees just the space (it flattens the config by `/`, which paths hold)."""
    cfg = with_params(base, tc["params"])
    # ASHA compares the metric at each report: make every report an evaluation
    cfg.train.log_every = cfg.train.checkpoint_every = cfg.train.eval_every
    run_dir = Path(sweep_dir) / "trials" / tune.get_context().get_trial_id()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "data").exists():
        (run_dir / "data").symlink_to(Path(sweep_dir) / "data", target_is_directory=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    (run_dir / "params.json").write_text(json.dumps(tc["params"], indent=2))
    fit(
        cfg,
        run_dir,
        model_path,
        manifest,
        log=lambda s: None,
        callbacks=(TuneReportCallback(),),
        show_progress=False,  # a trial runs in a Tune actor: Tune reports its progress
    )


def _evaluate(cfg: OikyoConfig, model_path: str, final: Path, run_dir: Path) -> None:
    """The promoted trial's evaluation, as a finetune run's: base vs fine-tuned on the test split."""
    write_report(
        cfg, model_path, str(final), load_split_rows(run_dir / "data", "test"), run_dir / "eval", scorer=ray_eval.score
    )


def _concurrency(cfg: OikyoConfig) -> int:
    if cfg.sweep.max_concurrent_trials:
        return cfg.sweep.max_concurrent_trials
    sc, res = cfg.scaling, ray.cluster_resources()
    if sc.use_gpu:
        return max(1, int(res.get("GPU", 0) // sc.num_workers))
    # Ray Data's file-listing task takes one whole CPU (not configurable in Ray 2.60): keep one free
    spare = res.get("CPU", 1) - 1.0
    return max(1, int(spare // (sc.num_workers * sc.cpus_per_worker + TRIAL_CPU)))


def _search(cfg: OikyoConfig, concurrency: int):
    """The search algorithm, limited to `concurrency` live trials (an explicit searcher is not
    limited by TuneConfig.max_concurrent_trials). Optuna is given its objectives itself: with
    sweep.objectives, all of them (its TPE sampler is multi-objective then)."""
    sw = cfg.sweep
    if sw.search == "optuna":
        if importlib.util.find_spec("optuna") is None:
            raise OikyoError("sweep.search=optuna needs optuna: pip install 'oikyo-ray[optuna]'")
        metric: str | list[str] = [sw.metric, *(o.metric for o in sw.objectives)] if sw.objectives else sw.metric
        mode: str | list[str] = [sw.mode, *(o.mode for o in sw.objectives)] if sw.objectives else sw.mode
        searcher = OptunaSearch(metric=metric, mode=mode, seed=sw.seed)  # type: ignore[arg-type]
        return ConcurrencyLimiter(searcher, max_concurrent=concurrency)
    return BasicVariantGenerator(random_state=sw.seed, max_concurrent=concurrency)


def _asha(cfg: OikyoConfig, manifest: dict) -> ASHAScheduler:
    """ASHA on the `step` of each report, up to the steps a trial trains (budget.max_t)."""
    t = max_t(cfg, manifest)
    return ASHAScheduler(
        metric=cfg.sweep.metric,
        mode=cfg.sweep.mode,
        time_attr="step",
        max_t=t,
        grace_period=min(cfg.sweep.grace_period, t),
        reduction_factor=cfg.sweep.reduction_factor,
    )


def run_sweep(cfg: OikyoConfig, resume: bool = False, log=print) -> Path:
    validate_space(cfg)  # before Ray starts: bad paths and values name the field
    model_path = resolve_model_path(cfg.model)
    load_tokenizer(cfg.model, model_path)
    expand_paths(cfg.data.paths)
    check_licenses(cfg, model_path, warn=log)  # policy: refused before Ray starts
    check_installed(cfg)
    name = cfg.run.name or f"sweep-{cfg.config_hash()[:8]}"
    where = store.join(cfg.run.root, name)
    if not resume and run_exists(cfg, name):
        raise OikyoError(f"sweep directory exists: {where}", hint="pass --resume to continue it, or a new run.name")
    # an s3:// run.root: the sweep is staged locally and uploaded after data prep and at the end
    sweep_dir = existing_run_dir(cfg, name) if resume else create_run_dir(cfg, name)
    tune_dir = sweep_dir / "tune"
    if resume and not tune_dir.exists():
        raise OikyoError(f"nothing to resume in {where}")
    (sweep_dir / "config.yaml").write_text(dump_yaml(cfg))
    # the sweep as an MLflow parent run, its trials as nested runs (logged once Tune is done)
    tracker = Tracker.start(cfg, sweep_dir, log, wandb=False)
    status = "FAILED"
    try:
        with publishing(cfg, sweep_dir, log) as publish:
            out = _tune(cfg, sweep_dir, model_path, resume, publish, tracker, log)
        status = "FINISHED"
        return out
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)


def _tune(cfg: OikyoConfig, sweep_dir: Path, model_path: str, resume: bool, publish, tracker: Tracker, log) -> Path:
    tune_dir = sweep_dir / "tune"
    init_ray()
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # A trial restored after the driver died may end with a bare "done" result (its training had
    # already reached the last step); ASHA skips results without the metric, Tune must not fail.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")

    if not (sweep_dir / "data" / "manifest.json").exists():
        log("[oikyo] sweep: preparing data once for every trial")
        prepare(cfg, model_path, sweep_dir / "data")
        publish()
    # budgets count what the objective trains on, as each trial's fit does
    manifest = objective_counts(cfg, json.loads((sweep_dir / "data" / "manifest.json").read_text()), sweep_dir / "data")

    constants = {"base": cfg.model_dump(mode="json"), "model_path": model_path, "sweep_dir": str(sweep_dir)}
    trainable = tune.with_resources(tune.with_parameters(_trial, **constants, manifest=manifest), {"cpu": TRIAL_CPU})
    if resume and tune.Tuner.can_restore(str(tune_dir)):
        log(f"[oikyo] sweep: resuming {tune_dir}")
        tuner = tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        scheduler = _asha(cfg, manifest)
        conc = _concurrency(cfg)
        log(
            f"[oikyo] sweep: {cfg.sweep.num_samples} trials, up to {conc} at once, "
            f"ASHA over {max_t(cfg, manifest)} steps"
        )
        tuner = tune.Tuner(
            trainable,
            param_space={"params": tune_domains(cfg)},
            # no metric here: ASHA and the searcher are given theirs, a list of them for a
            # multi-objective Optuna search (Tune's own metric is one name)
            tune_config=tune.TuneConfig(
                num_samples=cfg.sweep.num_samples,
                scheduler=scheduler,
                search_alg=_search(cfg, conc),
            ),
            run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir)),
        )
    grid = tuner.fit()
    tracker.log_trials(cfg, trial_rows(cfg, sweep_dir, grid, manifest))
    summarise(cfg, sweep_dir, grid, manifest, model_path, evaluate=_evaluate, log=log)
    for name in ("results.md", "results.csv", "best.json", f"{cfg.sweep.metric}_vs_step.png"):
        tracker.log_file(sweep_dir / name)
    if tracker.sinks:  # the promoted run's tracking.json, so registering it mirrors to MLflow
        promoted = sweep_dir.parent / f"{sweep_dir.name}-best"
        tracker.log_promoted(json.loads((sweep_dir / "best.json").read_text())["trial"], promoted)
        publish_run(cfg, promoted)
    return sweep_dir
