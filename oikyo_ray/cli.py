"""The `oikyo` command line.

Run as:
    oikyo demo                                  # the whole pipeline on the embedded default
    oikyo finetune CONFIG.yaml [key=value ...]  # curate -> train -> evaluate (-> serve)
    oikyo data prepare CONFIG.yaml [key=value ...] / oikyo data inspect DIR
    oikyo serve CONFIG.yaml [key=value ...]     # OpenAI-compatible server until Ctrl-C
    oikyo runs list [--root runs]               # runs and their headline metrics
    oikyo config CONFIG.yaml [key=value ...]    # print the resolved config (or --fields)
"""

from __future__ import annotations

import argparse
import sys

from oikyo_ray.errors import OikyoError


def _load(args):
    from oikyo_ray.config import load_config

    return load_config(args.config, args.overrides)


def cmd_demo(args) -> int:
    from oikyo_ray.config import load_config
    from oikyo_ray.demo.run import DEMO_CONFIG
    from oikyo_ray.finetune import run_finetune

    cfg = load_config(DEMO_CONFIG, args.overrides)  # validated before Ray starts
    run_finetune(cfg)
    return 0


def cmd_finetune(args) -> int:
    from oikyo_ray.finetune import run_finetune

    cfg = _load(args)
    run_finetune(cfg)
    return 0


def cmd_serve(args) -> int:
    import time

    from oikyo_ray.cluster import init_ray
    from oikyo_ray.model.load import resolve_model_path
    from oikyo_ray.serve.app import start
    from oikyo_ray.serve.auth import load_token

    cfg = _load(args)
    load_token(cfg.serve)  # fail now, not in a replica, when no token is configured
    model_path = resolve_model_path(cfg.model)
    init_ray()
    url = start(cfg, model_path)
    print(f"[oikyo] serving {url}/v1 (models: {cfg.serve.base_model_name}, {', '.join(cfg.serve.adapters)}); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


def cmd_runs(args) -> int:
    from oikyo_ray.runs.rundir import list_runs

    rows = list_runs(args.root)
    if not rows:
        print(f"no runs under {args.root}")
        return 0
    cols = ["run", "base_model", "data", "base_em", "tuned_em", "tuned_loss"]
    print("\t".join(cols))
    for r in rows:
        print("\t".join(f"{r.get(c):.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols))
    return 0


def cmd_config(args) -> int:
    from oikyo_ray.config import describe_fields, dump_yaml

    if args.config and "=" in args.config:  # `oikyo config key=value`: no file, only overrides
        args.overrides, args.config = [args.config, *args.overrides], None
    if args.fields:
        print("\n".join(describe_fields()))
        return 0
    print(dump_yaml(_load(args)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oikyo", description="Fine-tune, evaluate and serve LLM adapters on Ray.")
    sub = p.add_subparsers(dest="cmd", required=True)
    from oikyo_ray.data.cli import add_data_commands

    add_data_commands(sub)

    d = sub.add_parser("demo", help="run the whole pipeline on the embedded tiny model and data")
    d.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    d.set_defaults(fn=cmd_demo)

    for name, fn, help_ in [("finetune", cmd_finetune, "curate, train, evaluate one config"),
                            ("serve", cmd_serve, "serve base + adapters (OpenAI API)")]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("config", help="YAML config file")
        s.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4")
        s.set_defaults(fn=fn)

    c = sub.add_parser("config", help="print the resolved config, or every field with --fields")
    c.add_argument("config", nargs="?", help="YAML config file (default: built-in defaults)")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--fields", action="store_true", help="list every field with its default and meaning")
    c.set_defaults(fn=cmd_config)

    r = sub.add_parser("runs", help="list runs")
    r.add_argument("action", choices=["list"])
    r.add_argument("--root", default="runs")
    r.set_defaults(fn=cmd_runs)
    return p


def main(argv: list[str] | None = None) -> int:
    from oikyo_ray.cluster import default_auth_mode

    default_auth_mode()  # before anything imports ray
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except OikyoError as e:
        print(f"oikyo: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
