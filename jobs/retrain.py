"""Retrain a registry model from its captured traffic when its policy says so, on whatever Ray
cluster this runs in: the dataset from captured answers and feedback, training from the
champion's adapter, the judge against the champion, and the canary through `oikyo deploy`.

Run as:
    python jobs/retrain.py --model support-bot --config serve/serve_demo.yaml [--force] [key=value ...]
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/retrain.py --model support-bot --config serve/serve_demo.yaml run.root=/abs/shared/runs

--config is the serving config (serve.capture, deploy.load/budgets, retrain.*); run.root must be the
root the serving app reads its registry from. Meant to run on a schedule (cron, or
k8s/cronjob-retrain.yaml): when no retrain.* trigger is due it exits 0 having done nothing.
Exits 4 when the retrain failed (its report says why; nothing deployed), 5 with too few new rows.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir holds oikyo_ray

from oikyo_ray.cli import program  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the registry model")
    p.add_argument("--config", required=True, help="the serving config (serve.capture, deploy.*, retrain.*)")
    p.add_argument("--force", action="store_true", help="retrain even when no trigger is due")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. run.root=/mnt/oikyo/runs")
    return p.parse_args(argv)


def retrain_argv(args) -> list[str]:
    """The `oikyo retrain` command line this job runs."""
    return ["retrain", args.model, "--config", args.config, *(["--force"] if args.force else []), *args.overrides]


if __name__ == "__main__":
    program(retrain_argv(parse(sys.argv[1:])))
