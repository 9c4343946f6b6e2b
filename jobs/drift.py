"""Check a registry model's captured traffic for drift on whatever Ray cluster this runs in.

Run as:
    python jobs/drift.py --model support-bot [--config CONFIG.yaml] [--fail-on-drift] [key=value ...]
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/drift.py --model support-bot run.root=/abs/shared/runs --fail-on-drift

The registry and the capture must be on storage the job's driver sees (run.root, serve.capture.root).
Writes <capture root>/drift/<model>/report.{json,md} and lengths.png; the serving app exports the
verdict as the ray_oikyo_drift_* gauges the OikyoDrift alert watches. Exits 3 with
--fail-on-drift when a check drifted (a scheduler can start a retrain on it).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir holds oikyo_ray

from oikyo_ray.cli import program  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the registry model")
    p.add_argument("--version", default="champion", help="the version whose run is the reference")
    p.add_argument("--config", help="YAML config (run.root, serve.capture, drift.*)")
    p.add_argument("--fail-on-drift", action="store_true", help="exit 3 when a check drifted")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse(sys.argv[1:])
    argv = ["drift", args.model, "--version", args.version, *(["--config", args.config] if args.config else [])]
    program([*argv, *(["--fail-on-drift"] if args.fail_on_drift else []), *args.overrides])
