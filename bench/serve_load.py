"""Serving benchmark: Serve overhead vs the engine called in-process, and 8 mixed adapters vs 1;
with --poisson, the continuous engine vs the static micro-batcher under open-loop arrivals.

Run as: python bench/serve_load.py [--requests 64] [--concurrency 8]
   or:  python bench/serve_load.py --poisson [--rate 4] [--duration 30] [--rounds 2] [--adapters 1]
Loopback only, bounded request counts. Writes bench/results/serve_overhead.json and
bench/results/serve_multi_adapter.json. The overhead result also records this machine's floor in
the same run: a do-nothing FastAPI echo deployed on Serve (one hop: proxy -> replica) vs the same
echo app on bare uvicorn, both with the same client, so "Serve costs X ms here" is measured, not
assumed.

--poisson deploys two apps on one Serve instance, `serve.engine=static` and `continuous`, and
replays the same seeded schedule against each in interleaved rounds: Poisson arrivals at --rate
requests/s for --duration s, max_tokens drawn log-uniformly from 8..256 (short ones, <= 32, are
the requests a micro-batcher makes wait behind long ones). Each round sends the schedule twice
per engine: plain requests (latency, tokens/s) and streamed ones (time to first token). Writes
bench/results/serve_continuous.json (or --name).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench._common import percentile, write_result

TOKEN = "bench-token-" + "x" * 24
PROMPT = "<|im_start|>user\nWhat is the capital of Peru?<|im_end|>\n<|im_start|>assistant\n"
MAX_TOKENS = 16


def make_adapters(model_path: str, root: Path, n: int) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    names = []
    for i in range(n):
        torch.manual_seed(i)
        m = get_peft_model(
            AutoModelForCausalLM.from_pretrained(model_path),
            LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False),
        )
        m.save_pretrained(root / f"a{i}")
        names.append(f"a{i}")
    return names


def direct_engine(model_path: str, adapter_dir: Path):
    """The baseline: the same engine, in-process, one thread (as a replica has)."""
    import torch

    from oikyo_ray.config import ModelConfig
    from oikyo_ray.serve.engine import Engine

    torch.set_num_threads(1)
    eng = Engine(ModelConfig(name_or_path=model_path), model_path)
    eng.add_adapter("a0", str(adapter_dir))
    direct_latencies(eng, 3)  # warm-up
    return eng


def direct_latencies(eng, n: int) -> list[float]:
    """n requests one at a time straight into the engine."""
    sampling = {"max_new_tokens": MAX_TOKENS, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": []}
    out = []
    for _ in range(n):
        t = time.perf_counter()
        eng.generate_many([{"adapter": "a0", "prompt": PROMPT, "sampling": sampling}])
        out.append((time.perf_counter() - t) * 1000)
    return out


def metrics_url() -> str:
    """Ray's Prometheus export of the (local, one-node) cluster."""
    import ray

    node = ray.nodes()[0]
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def engine_calls(url: str) -> tuple[float, float]:
    """(total ms, count) of the model replicas' engine calls so far (`ray_oikyo_engine_latency_ms`)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    total = count = 0.0
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        if family.name == "ray_oikyo_engine_latency_ms":
            for s in family.samples:
                total += s.value if s.name.endswith("_sum") else 0.0
                count += s.value if s.name.endswith("_count") else 0.0
    return total, count


def engine_mean_ms(url: str, before: tuple[float, float], calls: int, timeout_s: float = 60) -> float:
    """Mean engine time of the `calls` engine calls made since `before` (waits for Ray's export)."""
    deadline = time.time() + timeout_s
    while (now := engine_calls(url))[1] < before[1] + calls and time.time() < deadline:
        time.sleep(1)
    return (now[0] - before[0]) / max(1.0, now[1] - before[1])


def _echo_app():
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/e")
    async def echo(body: dict):
        return body

    return app


def _uvicorn_echo(port: int) -> None:  # a subprocess: the bare-HTTP side of the floor
    import uvicorn

    uvicorn.run(_echo_app(), host="127.0.0.1", port=port, log_level="error")


def sequential_ms(url: str, n: int = 200) -> float:
    """p50 of n sequential POSTs of a tiny JSON body (after 20 warm-up requests)."""
    import httpx

    out = []
    with httpx.Client(timeout=30) as c:
        for i in range(n + 20):
            t = time.perf_counter()
            c.post(url, json={"a": 1}).raise_for_status()
            if i >= 20:
                out.append((time.perf_counter() - t) * 1000)
    return percentile(out, 50)


def floor(port: int) -> dict:
    """The same trivial echo through Serve's proxy and on bare uvicorn (this machine's floor)."""
    import multiprocessing

    from ray import serve

    echo = serve.deployment(
        serve.ingress(_echo_app())(type("Echo", (), {})), name="Echo", ray_actor_options={"num_cpus": 0}
    )
    serve.run(echo.bind(), name="echo", route_prefix="/echo")
    served = sequential_ms(f"http://127.0.0.1:{port}/echo/e")
    serve.delete("echo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        bare_port = s.getsockname()[1]
    proc = multiprocessing.get_context("spawn").Process(target=_uvicorn_echo, args=(bare_port,), daemon=True)
    proc.start()
    try:
        for _ in range(100):  # wait for it to listen
            try:
                with socket.create_connection(("127.0.0.1", bare_port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.1)
        bare = sequential_ms(f"http://127.0.0.1:{bare_port}/e")
    finally:
        proc.terminate()
    return {"serve_echo_p50_ms": served, "uvicorn_echo_p50_ms": bare, "serve_floor_ms": served - bare}


async def load(url: str, models: list[str], requests: int, concurrency: int) -> dict:
    import httpx

    lat, tokens = [], 0
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300, headers={"Authorization": f"Bearer {TOKEN}"}) as c:

        async def one(i):
            nonlocal tokens
            async with sem:
                t = time.perf_counter()
                r = await c.post(
                    f"{url}/v1/completions",
                    json={
                        "model": models[i % len(models)],
                        "prompt": PROMPT,
                        "max_tokens": MAX_TOKENS,
                        "temperature": 0,
                    },
                )
                r.raise_for_status()
                lat.append((time.perf_counter() - t) * 1000)
                tokens += r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*[one(i) for i in range(requests)])
        wall = time.perf_counter() - t0
    return {
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "tokens_per_s": tokens / wall,
        "requests_per_s": requests / wall,
        "tokens_per_request": tokens / requests,
        "requests": requests,
        "concurrency": concurrency,
    }


def serve_tiny(work: Path, model_path: str, adapter_root: Path, overrides: list[str]) -> tuple[str, int]:
    """Start Ray (2 CPUs) and oikyo's app on a free loopback port with TOKEN; (base URL, port)."""
    from oikyo_ray.cluster import init_ray
    from oikyo_ray.config import load_config
    from oikyo_ray.serve.ray_serve import start

    (work / "token").write_text(TOKEN)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_ray(num_cpus=2)
    base = [f"model.name_or_path={model_path}", f"serve.port={port}", f"serve.token_file={work / 'token'}"]
    cfg = load_config(None, [*base, f"serve.adapter_root={adapter_root}", *overrides])
    return start(cfg, model_path), port


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (this box's speed drifts)")
    ap.add_argument("--poisson", action="store_true", help="continuous vs static engine, open-loop arrivals")
    ap.add_argument("--rate", type=float, default=4.0, help="--poisson: mean arrivals per second")
    ap.add_argument("--duration", type=float, default=30.0, help="--poisson: seconds of arrivals per phase")
    ap.add_argument("--adapters", type=int, default=1, help="--poisson: adapters the requests cycle over")
    ap.add_argument("--name", default="serve_continuous", help="--poisson: result file name")
    args = ap.parse_args()
    if args.poisson:
        from bench.serve_poisson import compare_engines

        compare_engines(args)
        return

    from ray import serve

    from oikyo_ray.model.tiny import ensure_tiny_model

    work = Path(tempfile.mkdtemp(prefix="oikyo-bench-"))
    model_path = str(ensure_tiny_model(work / "cache"))
    root = work / "adapters"
    names = make_adapters(model_path, root, 8)
    eng = direct_engine(model_path, root / "a0")

    url, port = serve_tiny(
        work,
        model_path,
        root,
        ["serve.max_adapters_per_replica=8", "serve.max_batch_size=8", "serve.batch_wait_timeout_s=0.005"],
    )
    asyncio.run(load(url, names, 16, 8))  # warm-up: loads every adapter once
    # rounds interleave every measurement, so a slow spell of the machine hits all of them alike
    direct, served, singles, mixes = [], [], [], []
    prometheus = metrics_url()
    engine_ms = []
    for _ in range(args.rounds):
        direct += direct_latencies(eng, 30)
        before = engine_calls(prometheus)
        served.append(asyncio.run(load(url, ["a0"], 30, 1)))
        # the engine's own time inside the replica (one call per sequential request): splits the
        # overhead into "replica slower than in-process" and "proxy + ingress + hops"
        engine_ms.append(engine_mean_ms(prometheus, before, 30))
        singles.append(asyncio.run(load(url, ["a0"], args.requests, args.concurrency)))
        mixes.append(asyncio.run(load(url, names, args.requests, args.concurrency)))
    machine_floor = floor(port)
    serve.shutdown()
    seq = {"p50_ms": statistics.median(r["p50_ms"] for r in served), "rounds": served}
    single = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in singles), "rounds": singles}
    mixed = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in mixes), "rounds": mixes}

    d50 = percentile(direct, 50)
    write_result(
        "serve_overhead",
        "ms p50 latency (lower is better)",
        seq["p50_ms"],
        d50,
        "Engine.generate_many called in-process",
        seq["p50_ms"] / d50,
        "serve p50 - direct p50 <= 5 ms",
        overhead_ms=seq["p50_ms"] - d50,
        direct_p99_ms=percentile(direct, 99),
        serve=seq,
        max_tokens=MAX_TOKENS,
        engine_in_replica_mean_ms=statistics.median(engine_ms),
        hops_ms=seq["p50_ms"] - statistics.median(engine_ms),
        floor=machine_floor,
    )
    write_result(
        "serve_multi_adapter",
        "completion tokens/s (higher is better)",
        mixed["tokens_per_s"],
        single["tokens_per_s"],
        "same load on 1 adapter",
        mixed["tokens_per_s"] / single["tokens_per_s"],
        ">= 0.8",
        single_adapter=single,
        eight_adapters=mixed,
        max_tokens=MAX_TOKENS,
    )


if __name__ == "__main__":
    main()
