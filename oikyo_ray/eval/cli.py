"""`oikyo eval RUN_DIR`.

Run as:
    oikyo eval RUN_DIR [key=value ...] [--fail-on-regression] [--tuned DIR]

`oikyo eval` re-reads RUN_DIR/config.yaml (overrides apply on top, e.g. eval.backend=ray
eval.max_samples=500), evaluates base vs fine-tuned on RUN_DIR/data/test and rewrites RUN_DIR/eval/.
With --fail-on-regression it exits 3 when a gate fails (0 otherwise); user errors exit 2.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from oikyo_ray.cluster import default_auth_mode
from oikyo_ray.config import load_config
from oikyo_ray.data.prepared import load_split_rows
from oikyo_ray.errors import OikyoError
from oikyo_ray.eval.gates import GATE_EXIT_CODE
from oikyo_ray.runs import store


def tuned_dir_of(run_dir: Path, cfg) -> Path:
    """The run's fine-tuned weights: adapter/ (lora, dora) or model/ (full)."""
    return run_dir / ("model" if cfg.method.type == "full" else "adapter")


def evaluate_run(run_dir: str | Path, overrides: list[str] | None = None, tuned: str | None = None, log=print) -> dict:
    """Evaluate one run directory (or s3:// run: fetched, then its eval/ uploaded) and write its
    eval/ report; returns the report."""
    if store.is_remote(run_dir):
        if not store.exists(store.join(run_dir, "config.yaml")):
            raise OikyoError(f"not a run directory (no config.yaml): {run_dir}")
        with tempfile.TemporaryDirectory(prefix="oikyo-eval-") as tmp:
            local = store.download(
                str(run_dir), Path(tmp) / store.run_name(run_dir), skip=("checkpoints", "tensorboard")
            )
            report = evaluate_run(local, overrides, tuned, log)
            store.upload(local, store.join(run_dir))
            log(f"[oikyo] uploaded the report to {store.join(run_dir, 'eval')}")
            return report

    # the model stack and Ray take seconds to import, and Ray must come after default_auth_mode()
    # (`main`): imported when a run is evaluated, not whenever `oikyo` builds its parser
    from oikyo_ray.eval import ray_eval  # noqa: PLC0415
    from oikyo_ray.eval.compare import check_eval  # noqa: PLC0415
    from oikyo_ray.eval.report import write_report  # noqa: PLC0415
    from oikyo_ray.model.load import resolve_model_path  # noqa: PLC0415

    run = Path(run_dir).expanduser().resolve()
    if not (run / "config.yaml").is_file():
        raise OikyoError(
            f"not a run directory (no config.yaml): {run}", hint="pass runs/<run-id> as written by `oikyo finetune`"
        )
    cfg = load_config(run / "config.yaml", overrides)
    check_eval(cfg)  # eval.lm_eval_tasks: files and names, before a model loads or Ray starts
    tuned_dir = Path(tuned).expanduser() if tuned else tuned_dir_of(run, cfg)
    if not tuned_dir.is_dir():
        raise OikyoError(
            f"fine-tuned weights not found: {tuned_dir}",
            hint="did training finish? or pass --tuned DIR (an adapter or merged model dir)",
        )
    rows = load_split_rows(run / "data", "test")
    report = write_report(cfg, resolve_model_path(cfg.model), str(tuned_dir), rows, run / "eval", scorer=ray_eval.score)
    log(report["table"])
    log(f"[oikyo] report: {run / 'eval' / 'report.md'}")
    return report


def cmd_eval(args) -> int:
    report = evaluate_run(args.run_dir, args.overrides, args.tuned)
    if args.fail_on_regression and not report["passed"]:
        failed = ", ".join(g["name"] for g in report["gates"] if not g["passed"])
        print(f"oikyo: regression gate(s) failed: {failed}")
        return GATE_EXIT_CODE
    return 0


def add_eval_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("run_dir", help="run directory (runs/<run-id>)")
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotted key=value overrides of the run's config, e.g. eval.backend=ray eval.max_samples=500",
    )
    p.add_argument(
        "--fail-on-regression",
        action="store_true",
        help=f"exit {GATE_EXIT_CODE} when a gate (eval.min_improvement, eval.min_tuned, "
        "eval.max_forgetting, eval.max_probe_drop, eval.lm_eval_max_drop) fails",
    )
    p.add_argument("--tuned", default=None, help="evaluate this adapter or merged-model dir instead of the run's")
    p.set_defaults(fn=cmd_eval)
    return p


def add_eval_commands(subparsers) -> None:
    """Register `eval` on the `oikyo` sub-command parser."""
    p = subparsers.add_parser("eval", help="evaluate a run: base vs fine-tuned, forgetting, probes, gates")
    add_eval_arguments(p)


def main(argv: list[str] | None = None) -> int:
    """`oikyo eval` on its own (what jobs/evaluate.py runs)."""
    default_auth_mode()
    args = add_eval_arguments(argparse.ArgumentParser(prog="oikyo eval")).parse_intermixed_args(argv)
    try:
        return args.fn(args)
    except OikyoError as e:
        print(f"oikyo: error: {e}", file=sys.stderr)
        return e.exit_code
