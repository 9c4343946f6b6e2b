"""Evaluate one run directory (base vs fine-tuned, forgetting, probes, gates) on whatever Ray
cluster this runs in; writes <run>/eval/report.{json,md} and charts.

Run as:
    python jobs/evaluate.py --run-dir runs/<run-id> [key=value ...] [--fail-on-regression]
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/evaluate.py --run-dir /abs/shared/runs/<run-id> eval.backend=ray eval.num_actors=4

The run directory must be on storage the job's driver sees. With eval.backend=ray the test rows,
general-text chunks and probes are scored by Ray Data actors (one model load each); the job fails
(exit 3) with --fail-on-regression when a gate in the run's eval config fails.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir holds oikyo_ray

from oikyo_ray.eval.cli import main  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="run directory written by `oikyo finetune`")
    p.add_argument("--fail-on-regression", action="store_true", help="exit 3 when a gate fails")
    p.add_argument("--tuned", default=None, help="adapter or merged-model dir to evaluate instead of the run's")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. eval.backend=ray")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse(sys.argv[1:])
    argv = [args.run_dir, *args.overrides]
    if args.fail_on_regression:
        argv.append("--fail-on-regression")
    if args.tuned:
        argv += ["--tuned", args.tuned]
    sys.exit(main(argv))
