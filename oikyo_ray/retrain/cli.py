"""`oikyo retrain MODEL`: retrain a registry model's champion from its captured traffic.

oikyo retrain support-bot [--config CONFIG.yaml] [--force] [key=value ...]

The registry, the capture and the new run live under run.root (capture: serve.capture.root);
the policy and the challenger's bar are `retrain.*`, serving and staging `serve.*`/`deploy.*`.
Exits 0 when not due or canaried, 4 when the retrain failed (nothing deployed), 5 with too few rows.
"""

from __future__ import annotations

import json

from oikyo_ray.config import load_config
from oikyo_ray.registry import registry
from oikyo_ray.registry.registry import CHAMPION

EXIT = {"not_due": 0, "canaried": 0, "failed": 4, "too_few_rows": 5}


def cmd_retrain(args) -> int:
    from oikyo_ray.cluster import init_ray
    from oikyo_ray.retrain.ray_retrain import retrain

    cfg = load_config(args.config, args.overrides)  # invalid config fails before Ray
    registry.load(cfg.run.root, args.model).version(CHAMPION)  # so does a model without a champion
    init_ray()
    out = retrain(cfg, args.model, force=args.force)
    print(json.dumps({k: out.get(k) for k in ("model", "outcome", "reasons", "run", "figures", "deployed")}))
    return EXIT[out["outcome"]]


def add_retrain_commands(sub) -> None:
    r = sub.add_parser("retrain", help="retrain a registry model's champion from its traffic; canary it if it wins")
    r.add_argument("model", help="the registry model (served with serve.capture and serve.feedback)")
    r.add_argument("--config", help="config with run.root, serve.*, deploy.* and retrain.* (default: built-in)")
    r.add_argument("--force", action="store_true", help="retrain even when no retrain.* trigger says it is due")
    r.add_argument("overrides", nargs="*", help="key=value overrides, e.g. retrain.canary_percent=20")
    r.set_defaults(fn=cmd_retrain)
