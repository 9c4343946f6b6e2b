"""The staging test's load: a seeded open-loop request plan, sent over HTTP, and its figures (Ray-free).

Arrivals are a Poisson process at `deploy.load.rate_per_s`; each request asks for a prompt of a
drawn number of tokens (sent as token ids, so the length is exact whatever the tokenizer) and a
drawn `max_tokens`. A request is sent at its arrival time whatever is still running (open loop),
up to `concurrency` in flight; one that waits for a slot counts its wait in its latency, as a user
would, so saturation shows as latency instead of slowing the arrivals down.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import httpx
import numpy as np

from oikyo_ray.config import LoadProfile, ServeConfig


@dataclass(frozen=True)
class Planned:
    at_s: float  # arrival, from the start
    prompt: list[int]  # token ids
    max_tokens: int


def plan(profile: LoadProfile, vocab_size: int, skip_ids: set[int]) -> list[Planned]:
    """The requests of one staging test; the same for every deploy with the same profile.
    `skip_ids` (special tokens) never appear in prompts: they would end or restructure them."""
    rng, t, out = random.Random(profile.seed), 0.0, list[Planned]()
    ids = [i for i in range(vocab_size) if i not in skip_ids]
    while True:
        t += rng.expovariate(profile.rate_per_s)
        if t >= profile.duration_s:
            return out
        n = rng.randint(*profile.prompt_tokens)
        out.append(Planned(t, [rng.choice(ids) for _ in range(n)], rng.randint(*profile.max_tokens)))


async def replay(url: str, token: str, model: str, requests: list[Planned], concurrency: int) -> list[dict]:
    """Send each planned request at its time; one record per request (status, latency, tokens)."""
    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, headers={"Authorization": f"Bearer {token}"}, limits=limits) as client:
        start = time.perf_counter()

        async def send(p: Planned) -> dict:
            await asyncio.sleep(max(0.0, start + p.at_s - time.perf_counter()))
            t0 = time.perf_counter()
            async with slots:
                body = {"model": model, "prompt": p.prompt, "max_tokens": p.max_tokens, "temperature": 0}
                try:
                    r = await client.post(f"{url}/v1/completions", json=body)
                    status = r.status_code
                    tokens = r.json()["usage"]["completion_tokens"] if status == 200 else 0
                except httpx.HTTPError as e:  # a dropped connection is a failed request, not a crash
                    status, tokens = 0, 0
                    error: str | None = type(e).__name__
                else:
                    error = None if status == 200 else r.text[:200]
            done = time.perf_counter()
            ms = (done - t0) * 1000
            return {"status": status, "latency_ms": ms, "tokens": tokens, "done_s": done - start, "error": error}

        return await asyncio.gather(*(send(p) for p in requests))


def hourly_price(serve: ServeConfig, price_cpu_hour: float, price_gpu_hour: float) -> float:
    """What the serving replicas cost an hour (the autoscaling floor, at least one replica)."""
    replicas = max(1, serve.min_replicas)
    return replicas * (serve.cpus_per_replica * price_cpu_hour + serve.gpus_per_replica * price_gpu_hour)


def summarize(records: list[dict], duration_s: float, price_per_hour: float) -> dict:
    """p50/p99 latency of answered requests, completion tokens/s, error rate, and the cost of a
    million completion tokens at this load's throughput and the hardware's hourly price."""
    ok = [r for r in records if r["status"] == 200]
    latencies = np.array([r["latency_ms"] for r in ok]) if ok else None
    span = max([duration_s, *(r["done_s"] for r in records)])
    tokens_per_s = sum(r["tokens"] for r in ok) / span
    errors = [r for r in records if r["status"] != 200]
    return {
        "requests": len(records),
        "errors": len(errors),
        "error_rate": len(errors) / len(records) if records else 1.0,
        "first_errors": sorted({f"{r['status']}: {r['error']}" for r in errors})[:3],
        "p50_ms": None if latencies is None else float(np.percentile(latencies, 50)),
        "p99_ms": None if latencies is None else float(np.percentile(latencies, 99)),
        "tokens_per_s": tokens_per_s,
        "price_per_hour": price_per_hour,
        "cost_per_1m_tokens": price_per_hour / (tokens_per_s * 3600) * 1e6 if tokens_per_s > 0 else None,
        "duration_s": span,
    }
