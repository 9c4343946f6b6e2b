"""`oikyo deploy` and `oikyo ab report|promote|rollback`.

oikyo deploy RUN --model NAME [--canary PCT] [--config CONFIG.yaml] [key=value ...]
oikyo ab report NAME --prometheus URL [--window 1h] [--root DIR|s3://...]
oikyo ab promote NAME [--root ...]     # the challenger becomes the champion
oikyo ab rollback NAME [--root ...]    # end the canary, or move the champion back
"""

from __future__ import annotations

import json

import yaml

from oikyo_ray.config import OikyoConfig, apply_overrides, load_config, validate_config
from oikyo_ray.errors import ConfigError
from oikyo_ray.runs import store


def deploy_config(run: str, config: str | None, overrides: list[str]) -> OikyoConfig:
    """The given config file, else the run's own config.yaml, with the overrides applied."""
    if config:
        return load_config(config, overrides)
    text = store.read_text(store.join(run, "config.yaml"))
    if text is None:
        raise ConfigError(f"{run} has no config.yaml", hint="pass --config CONFIG.yaml, or a run directory")
    return validate_config(apply_overrides(yaml.safe_load(text) or {}, overrides), f"{run}/config.yaml")


def cmd_deploy(args) -> int:
    from oikyo_ray.deploy.ray_deploy import deploy

    cfg = deploy_config(args.run, args.config, args.overrides)  # invalid config fails before Ray
    done = deploy(cfg, args.run, args.model, canary=args.canary)
    print(json.dumps({k: done[k] for k in ("model", "version", "canary")}))
    return 0


def cmd_ab_report(args) -> int:
    from oikyo_ray.deploy.ab import readout, recommend, report_text
    from oikyo_ray.registry import registry

    state = registry.load(args.root, args.model)
    roles = readout(args.prometheus, args.model, args.window)
    verdict = recommend(roles, args.min_requests, args.latency_ratio)
    print(report_text(args.model, state, roles, verdict))
    return 0


def cmd_ab_promote(args) -> int:
    from oikyo_ray.deploy.ab import promote

    print(f"[oikyo] {args.model}: champion -> v{promote(args.root, args.model)}, all traffic")
    return 0


def cmd_ab_rollback(args) -> int:
    from oikyo_ray.deploy.ab import rollback

    print(f"[oikyo] {args.model}: champion v{rollback(args.root, args.model)} serves all traffic")
    return 0


def add_deploy_commands(sub) -> None:
    d = sub.add_parser("deploy", help="gate, stage and promote a run as a registry model's champion or canary")
    d.add_argument("run", help="a finished run directory or s3:// run")
    d.add_argument("--model", required=True, help="the registry model to deploy it as")
    d.add_argument("--canary", type=float, help="give it this percent of the traffic as the challenger")
    d.add_argument("--config", help="config for serving, the staging load and budgets (default: the run's)")
    d.add_argument("overrides", nargs="*", help="key=value overrides (e.g. deploy.budgets.p99_ms=500)")
    d.set_defaults(fn=cmd_deploy)

    a = sub.add_parser("ab", help="a canary's readout (from Prometheus), promotion or rollback")
    s = a.add_subparsers(dest="ab_cmd", required=True)

    def parser(name: str, help_: str, fn):
        p = s.add_parser(name, help=help_)
        p.add_argument("model")
        p.add_argument("--root", default="runs", help="the run root holding registry/ (a directory or s3://...)")
        p.set_defaults(fn=fn)
        return p

    p = parser("report", "per variant requests, errors and latency with intervals, and a recommendation", cmd_ab_report)
    p.add_argument("--prometheus", required=True, help="Prometheus URL (it scrapes the serving app)")
    p.add_argument("--window", default="1h", help="how far back to look (a PromQL duration: 30m, 1h, 1d)")
    p.add_argument("--min-requests", type=int, default=100, help="fewest requests per variant to recommend promote")
    p.add_argument("--latency-ratio", type=float, default=1.25, help="challenger p99 over this x champion's: worse")
    parser("promote", "the challenger becomes the champion and takes all traffic", cmd_ab_promote)
    parser("rollback", "end the canary, or move the champion back to its previous version", cmd_ab_rollback)
