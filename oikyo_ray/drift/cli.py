"""`oikyo drift MODEL`: captured traffic against the champion's training prompts.

oikyo drift support-bot [--version champion] [--config CONFIG.yaml] [--fail-on-drift] [key=value ...]

The registry and capture live under run.root (capture: serve.capture.root, default
<run.root>/capture); thresholds are `drift.*`. Writes <capture root>/drift/<model>/report.{json,md}
and lengths.png, prints the verdict; exits 3 with --fail-on-drift when a check drifted.
"""

from __future__ import annotations

import json

from oikyo_ray.config import load_config
from oikyo_ray.registry import registry

DRIFT_EXIT_CODE = 3


def cmd_drift(args) -> int:
    from oikyo_ray.cluster import init_ray
    from oikyo_ray.drift.ray_drift import live_side
    from oikyo_ray.drift.run import capture_root, drift

    cfg = load_config(args.config, args.overrides)  # invalid config fails before Ray
    registry.load(cfg.run.root, args.model).version(args.version)  # so does an unknown model or version
    init_ray()
    report = drift(cfg, cfg.run.root, args.model, args.version, live=live_side)
    where = f"{capture_root(cfg, cfg.run.root)}/drift/{args.model}"
    drifted = [c["check"] for c in report["checks"] if c["drifted"]]
    verdict = {True: f"DRIFTED ({', '.join(drifted)})", False: "no drift", None: "too few captured prompts"}
    print(f"[oikyo] drift: {args.model} v{report['version']}: {verdict[report['drifted']]}; report in {where}")
    print(json.dumps({"model": args.model, "drifted": report["drifted"], "checks": report["checks"]}))
    return DRIFT_EXIT_CODE if args.fail_on_drift and report["drifted"] else 0


def add_drift_commands(sub) -> None:
    d = sub.add_parser("drift", help="compare a registry model's captured traffic with its training prompts")
    d.add_argument("model", help="the registry model (its traffic captured with serve.capture)")
    d.add_argument("--version", default="champion", help="the version whose run is the reference (or an alias)")
    d.add_argument("--config", help="config with run.root, serve.capture and drift.* (default: built-in)")
    d.add_argument("--fail-on-drift", action="store_true", help=f"exit {DRIFT_EXIT_CODE} when a check drifted")
    d.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.root=/mnt/oikyo/runs")
    d.set_defaults(fn=cmd_drift)
