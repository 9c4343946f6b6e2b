"""Capture soak: the same load against the app without capture and with every answer captured
(sample rate 1, redaction on), interleaved in rounds (this box's speed drifts).

Run as: python bench/capture_soak.py [--seconds 30] [--concurrency 16] [--rounds 2]
Loopback only. Each phase starts the app fresh (tiny model, one adapter) with serve.capture off
(the baseline: what a user runs today) or on, and sends valid completions from `concurrency`
clients for `seconds`. Writes bench/results/capture_soak.json: per phase p50/p99 of valid
requests, 5xx and timeouts (target: 0 with capture), and for capture the rows written and dropped
(from the parquet files and the app's oikyo_capture_rows counter).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench._common import write_result
from bench.serve_load import make_adapters, serve_tiny
from bench.serve_soak import phase


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    from ray import serve

    from oikyo_ray.model.tiny import ensure_tiny_model
    from oikyo_ray.serve.capture import read_rows

    work = Path(tempfile.mkdtemp(prefix="oikyo-capture-soak-"))
    model_path = str(ensure_tiny_model(work / "cache"))
    make_adapters(model_path, work / "adapters", 1)
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for r in range(args.rounds):
        for mode in ("off", "on"):
            root = work / f"capture-{r}"
            extra = [f"serve.capture.enabled={mode == 'on'}", f"serve.capture.root={root}", "serve.capture.flush_s=1"]
            url, _ = serve_tiny(work, model_path, work / "adapters", extra)
            warm = asyncio.run(phase(url, 5, 4, 0.0, 0))  # warm-up: loads the adapter (captured too)
            result = asyncio.run(phase(url, args.seconds, args.concurrency, 0.0, 1 + r))
            serve.shutdown()  # the ingress writes what it queued as it stops
            if mode == "on":
                written = len(read_rows(str(root / "completions")))
                answered = sum(x["valid_requests"] - x["valid_5xx"] - x["valid_timeouts"] for x in (warm, result))
                result.update(rows_written=written, answered_incl_warmup=answered, all_captured=written == answered)
            runs[mode].append(result)
            print(mode, result, flush=True)
    p99 = lambda mode: sum(x["valid_p99_ms"] for x in runs[mode]) / len(runs[mode])  # noqa: E731
    failures = sum(x["valid_5xx"] + x["valid_timeouts"] for x in runs["on"])
    write_result(
        "capture_soak",
        "valid-request p99 ms with every answer captured (lower is better), mean over rounds",
        p99("on"),
        p99("off"),
        "the same load with serve.capture off",
        p99("on") / p99("off"),
        "with capture: 5xx = 0 and timeouts = 0; p99 within 1.2x of no capture; every answer captured",
        valid_failures_with_capture=failures,
        every_answer_captured=all(x["all_captured"] for x in runs["on"]),
        runs=runs,
        settings={"seconds": args.seconds, "concurrency": args.concurrency, "rounds": args.rounds},
    )


if __name__ == "__main__":
    main()
