"""Deploy one finished run as a registry model's champion or canary, on whatever Ray cluster this
runs in: its eval gates, a staging load test on a Serve app of this cluster, then the registry
move that the serving app (a RayService reading the same run root) follows live.

Run as:
    python jobs/deploy.py --config serve/serve_demo.yaml --run-dir runs/<run-id> --model support-bot \
        [--canary 10] [key=value ...]
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/deploy.py --config serve/serve_demo.yaml --run-dir /abs/shared/runs/<run-id> \
        --model support-bot run.root=/abs/shared/runs

--config is the serving config (the one the production app runs: model, replicas, deploy.load and
deploy.budgets); run.root must be the root the production app reads its registry from. Exits 1
with the reasons when the run fails its gates or misses a staging budget (nothing moves).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir holds oikyo_ray

from oikyo_ray.cli import program  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the serving config (e.g. serve/serve_demo.yaml)")
    p.add_argument("--run-dir", required=True, help="run directory (or s3:// run) written by `oikyo finetune`")
    p.add_argument("--model", required=True, help="the registry model to deploy it as")
    p.add_argument("--canary", type=float, help="give it this percent of the traffic as the challenger")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. run.root=/mnt/oikyo/runs")
    return p.parse_args(argv)


def deploy_argv(args) -> list[str]:
    """The `oikyo deploy` command line this job runs."""
    argv = ["deploy", args.run_dir, "--model", args.model, "--config", args.config]
    if args.canary is not None:
        argv += ["--canary", str(args.canary)]
    return [*argv, *args.overrides]


if __name__ == "__main__":
    program(deploy_argv(parse(sys.argv[1:])))
