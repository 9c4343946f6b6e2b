"""Hyperparameter sweep (ASHA on Ray Tune) on whatever Ray cluster this runs in.

Run as:
    python jobs/sweep.py --config jobs/configs/sweep_demo.yaml [key=value ...] [--resume]
    RAY_AUTH_MODE=token ray job submit --working-dir . -- \
        python jobs/sweep.py --config jobs/configs/sweep_demo.yaml run.root=/abs/shared/runs
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir holds oikyo_ray

from oikyo_ray.cli import program  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config with a sweep: section")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    a = p.parse_args()
    program(["sweep", a.config, *a.overrides, *(["--resume"] if a.resume else [])])
