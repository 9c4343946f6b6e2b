"""Open-loop Poisson load against both serving engines in one run (`serve_load.py --poisson`).

The same seeded schedule (arrival times, max_tokens, model) goes to an app with
`serve.engine=static` and one with `serve.engine=continuous` on the same Serve instance, in
interleaved rounds. A request is sent at its arrival time whatever is still running (open loop),
so queueing shows in the latencies instead of slowing the arrivals.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

from bench._common import percentile, write_result
from bench.serve_load import PROMPT, TOKEN, make_adapters, serve_tiny

SHORT = 32  # max_tokens at or below this: a "short" request
ENGINES = ("static", "continuous")


def schedule(rate: float, duration: float, models: list[str], seed: int = 0) -> list[tuple[float, int, str]]:
    """(arrival offset s, max_tokens, model) per request: exponential gaps, max_tokens log-uniform on 8..256."""
    rng, t, out = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        out.append((t, int(round(8 * math.exp(rng.random() * math.log(32)))), models[len(out) % len(models)]))


async def _one(client, url: str, max_tokens: int, model: str, stream: bool) -> dict:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    t0 = time.perf_counter()
    if not stream:
        r = await client.post(f"{url}/v1/completions", json=body)
        done = time.perf_counter()
        tokens = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
        return {"status": r.status_code, "latency_ms": (done - t0) * 1000, "tokens": tokens, "done": done}
    first, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if first is None and event.get("choices") and event["choices"][0].get("text"):
                first = time.perf_counter()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
        status = r.status_code
    done = time.perf_counter()
    ttft = None if first is None else (first - t0) * 1000
    return {"status": status, "latency_ms": (done - t0) * 1000, "ttft_ms": ttft, "tokens": tokens, "done": done}


async def replay(url: str, plan: list[tuple[float, int, str]], stream: bool) -> list[dict]:
    """Send each request of `plan` at its arrival time; one record per request, with its max_tokens."""
    import httpx

    limits = httpx.Limits(max_connections=len(plan) + 1, max_keepalive_connections=64)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(timeout=600, headers=headers, limits=limits) as client:
        start = time.perf_counter()

        async def at(offset: float, max_tokens: int, model: str) -> dict:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            rec = await _one(client, url, max_tokens, model, stream)
            return {**rec, "max_tokens": max_tokens, "done": rec["done"] - start}

        return await asyncio.gather(*[at(*p) for p in plan])


def summary(records: list[dict], duration: float) -> dict:
    """tokens/s over the whole phase, latencies of all and of short requests, TTFT when streamed."""
    ok = [r for r in records if r["status"] == 200]
    short = [r["latency_ms"] for r in ok if r["max_tokens"] <= SHORT]
    span = max([r["done"] for r in ok], default=duration)
    out = {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "tokens_per_s": sum(r["tokens"] for r in ok) / max(span, duration),
        "p50_ms": percentile([r["latency_ms"] for r in ok], 50) if ok else None,
        "p99_ms": percentile([r["latency_ms"] for r in ok], 99) if ok else None,
        "short_requests": len(short),
        "short_p50_ms": percentile(short, 50) if short else None,
        "short_p99_ms": percentile(short, 99) if short else None,
    }
    ttft = [r["ttft_ms"] for r in ok if r.get("ttft_ms") is not None]
    if ttft:
        out.update(ttft_p50_ms=percentile(ttft, 50), ttft_p99_ms=percentile(ttft, 99))
    return out


def _median(rounds: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rounds if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def compare_engines(args) -> dict:
    from ray import serve

    from oikyo_ray.config import load_config
    from oikyo_ray.model.tiny import ensure_tiny_model
    from oikyo_ray.serve.ray_serve import start

    work = Path(tempfile.mkdtemp(prefix="oikyo-bench-"))
    model_path = str(ensure_tiny_model(work / "cache"))
    root = work / "adapters"
    names = make_adapters(model_path, root, args.adapters)
    settings = [f"serve.max_adapters_per_replica={max(1, args.adapters)}", "serve.cpus_per_replica=1"]
    urls = {"static": serve_tiny(work, model_path, root, [*settings, "serve.engine=static"])[0]}
    port = int(urls["static"].rsplit(":", 1)[1])
    cfg = load_config(
        None,
        [
            f"model.name_or_path={model_path}",
            f"serve.port={port}",
            f"serve.token_file={work / 'token'}",
            f"serve.adapter_root={root}",
            "serve.route_prefix=/continuous",
            *settings,
            "serve.engine=continuous",
        ],
    )
    urls["continuous"] = start(cfg, model_path, name="continuous")
    plan = schedule(args.rate, args.duration, names)
    warm = schedule(2.0, 3.0, names, seed=1)
    for engine in ENGINES:
        asyncio.run(replay(urls[engine], warm, stream=False))  # loads the adapters, warms the model
    phases: dict = {e: {"plain": [], "streamed": []} for e in ENGINES}
    for _ in range(args.rounds):  # interleaved: a slow spell of the machine hits both engines alike
        for engine in ENGINES:
            phases[engine]["plain"].append(summary(asyncio.run(replay(urls[engine], plan, False)), args.duration))
            phases[engine]["streamed"].append(summary(asyncio.run(replay(urls[engine], plan, True)), args.duration))
    serve.shutdown()
    res = {
        e: {
            "tokens_per_s": _median(phases[e]["plain"], "tokens_per_s"),
            "short_p50_ms": _median(phases[e]["plain"], "short_p50_ms"),
            "p50_ms": _median(phases[e]["plain"], "p50_ms"),
            "ttft_p50_ms": _median(phases[e]["streamed"], "ttft_p50_ms"),
            "ttft_p99_ms": _median(phases[e]["streamed"], "ttft_p99_ms"),
            "rounds": phases[e],
        }
        for e in ENGINES
    }
    cont, stat = res["continuous"], res["static"]
    return write_result(
        args.name,
        "completion tokens/s (higher is better)",
        cont["tokens_per_s"],
        stat["tokens_per_s"],
        "static micro-batcher (serve.engine=static), same arrivals",
        cont["tokens_per_s"] / stat["tokens_per_s"],
        ">= 2x tokens/s and >= 3x lower p50 latency of short requests",
        short_p50_speedup=stat["short_p50_ms"] / cont["short_p50_ms"],
        continuous=cont,
        static=stat,
        rate_per_s=args.rate,
        duration_s=args.duration,
        requests_per_phase=len(plan),
        max_tokens="log-uniform 8..256",
        short_means=f"max_tokens <= {SHORT}",
        adapters=args.adapters,
        settings=settings,
    )
