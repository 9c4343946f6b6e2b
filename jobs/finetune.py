"""Fine-tune one config end to end on whatever Ray cluster this runs in.

Run as:
    python jobs/finetune.py --config jobs/configs/demo.yaml [key=value ...]
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/finetune.py --config jobs/configs/demo.yaml run.root=/abs/runs
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir holds oikyo_ray

from oikyo_ray.cli import program  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (see jobs/configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse(sys.argv[1:])
    program(["finetune", args.config, *args.overrides])
