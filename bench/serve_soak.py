"""Serving soak: valid requests with hostile ones mixed in, against the same load without them.

Run as: python bench/serve_soak.py [--seconds 60] [--concurrency 16] [--hostile 0.15]
Loopback only, bounded. One `oikyo serve`-equivalent app (tiny model, one adapter) takes a clean
phase (valid requests only: the baseline a user compares with) and a hostile phase of the same
length where a share of requests are bad: bodies nested too deep, not JSON, invalid UTF-8, over
the byte limit, huge prompts, out-of-range sampling values, too many prompts, unknown models,
wrong tokens, streams the client drops. Writes bench/results/serve_soak.json: p50/p99 latency of
valid requests in both phases, 5xx and timeouts among valid requests (target: 0), the hostile
requests' status counts, and the replicas' memory before and after (target: flat).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench._common import percentile, write_result
from bench.serve_load import TOKEN, make_adapters, serve_tiny

VALID = {"model": "a0", "prompt": "What is the capital of Peru?", "max_tokens": 8, "temperature": 0}


def _nested(depth: int) -> bytes:
    return ("[" * depth + "]" * depth).encode()


# (name, method that sends one hostile request with the client `c` to `url`)
def hostile_requests(url: str):
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    body = lambda **kw: json.dumps({**VALID, **kw}).encode()
    cases = {
        "nested": lambda c: c.post(f"{url}/v1/completions", content=_nested(50_000), headers=auth),
        "not_json": lambda c: c.post(f"{url}/v1/completions", content=b"{oops", headers=auth),
        "bad_utf8": lambda c: c.post(f"{url}/v1/completions", content=b'{"prompt": "\xff\xfe"}', headers=auth),
        "too_big": lambda c: c.post(f"{url}/v1/completions", content=b" " * (8 << 20), headers=auth),
        "huge_prompt": lambda c: c.post(f"{url}/v1/completions", content=body(prompt="word " * 400_000), headers=auth),
        "bad_temperature": lambda c: c.post(f"{url}/v1/completions", content=body(temperature=1e-30), headers=auth),
        "huge_number": lambda c: c.post(f"{url}/v1/completions", content=body(seed=10**400), headers=auth),
        "many_prompts": lambda c: c.post(f"{url}/v1/completions", content=body(prompt=["hi"] * 5000), headers=auth),
        "unknown_model": lambda c: c.post(f"{url}/v1/completions", content=body(model="nope"), headers=auth),
        "bad_token": lambda c: c.post(
            f"{url}/v1/completions", content=body(), headers={**auth, "Authorization": "Bearer wrong"}
        ),
        "dropped_stream": None,  # handled in `_dropped_stream`
    }
    return cases


async def _dropped_stream(c, url: str) -> int:
    """Start a long stream and leave after its first event (a client that disconnects)."""
    req = {**VALID, "max_tokens": 200, "stream": True}
    async with c.stream("POST", f"{url}/v1/completions", json=req, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        async for _ in r.aiter_lines():
            break
        return r.status_code


def replica_memory_mb() -> float:
    """RSS of Serve's replica and proxy processes on this machine."""
    import psutil

    total = 0
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ServeReplica" in cmd or "ProxyActor" in cmd:
            total += p.info["memory_info"].rss
    return total / 2**20


async def phase(url: str, seconds: float, concurrency: int, hostile_share: float, seed: int) -> dict:
    import httpx

    rng = random.Random(seed)
    cases = hostile_requests(url)
    valid_ms: list[float] = []
    valid_5xx = valid_timeouts = 0
    hostile: Counter = Counter()
    end = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as c:

        async def worker() -> None:
            nonlocal valid_5xx, valid_timeouts
            while time.monotonic() < end:
                if rng.random() < hostile_share:
                    name = rng.choice(sorted(cases))
                    try:
                        if name == "dropped_stream":
                            status = await _dropped_stream(c, url)
                        else:
                            status = (await cases[name](c)).status_code
                        hostile[f"{name}:{status}"] += 1
                    except httpx.HTTPError as e:
                        hostile[f"{name}:{type(e).__name__}"] += 1
                    continue
                t = time.perf_counter()
                try:
                    r = await c.post(f"{url}/v1/completions", json=VALID)
                except httpx.TimeoutException:
                    valid_timeouts += 1
                    continue
                if r.status_code >= 500:
                    valid_5xx += 1
                elif r.status_code == 200:
                    valid_ms.append((time.perf_counter() - t) * 1000)

        await asyncio.gather(*[worker() for _ in range(concurrency)])
    return {
        "valid_requests": len(valid_ms) + valid_5xx + valid_timeouts,
        "valid_p50_ms": percentile(valid_ms, 50) if valid_ms else None,
        "valid_p99_ms": percentile(valid_ms, 99) if valid_ms else None,
        "valid_5xx": valid_5xx,
        "valid_timeouts": valid_timeouts,
        "hostile": dict(sorted(hostile.items())),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--hostile", type=float, default=0.15, help="share of hostile requests in the hostile phase")
    args = ap.parse_args()

    from ray import serve

    from oikyo_ray.model.tiny import ensure_tiny_model

    work = Path(tempfile.mkdtemp(prefix="oikyo-soak-"))
    model_path = str(ensure_tiny_model(work / "cache"))
    make_adapters(model_path, work / "adapters", 1)
    url, _ = serve_tiny(work, model_path, work / "adapters", [])
    asyncio.run(phase(url, 5, 4, 0.0, 0))  # warm-up: loads the adapter
    mem_before = replica_memory_mb()
    clean = asyncio.run(phase(url, args.seconds, args.concurrency, 0.0, 1))
    hostile = asyncio.run(phase(url, args.seconds, args.concurrency, args.hostile, 2))
    mem_after = replica_memory_mb()
    serve.shutdown()
    failures = hostile["valid_5xx"] + hostile["valid_timeouts"]
    write_result(
        "serve_soak",
        "valid-request p99 ms with hostile traffic (lower is better)",
        hostile["valid_p99_ms"],
        clean["valid_p99_ms"],
        "the same load without hostile requests",
        (hostile["valid_p99_ms"] or 0) / (clean["valid_p99_ms"] or 1),
        "valid 5xx = 0 and timeouts = 0; replica memory flat (within 10%); p99 within 1.5x of clean",
        valid_failures=failures,
        memory_mb_before=round(mem_before, 1),
        memory_mb_after=round(mem_after, 1),
        clean=clean,
        with_hostile=hostile,
        settings={"seconds": args.seconds, "concurrency": args.concurrency, "hostile_share": args.hostile},
    )


if __name__ == "__main__":
    main()
