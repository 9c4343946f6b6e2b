"""`oikyo deploy` (the deploy stage's Ray adapter): a finished run becomes a version of a registry
model, must pass its eval gates and a staging load test on Ray Serve within `deploy.budgets`, and
only then takes the `champion` alias, or with `--canary PCT` the `challenger` alias and PCT% of
the model's traffic. Apps serving the model (`serve.registry_models`) pick the move up live.

Run as:  oikyo deploy RUN --model NAME [--canary PCT] [--config CONFIG.yaml] [key=value ...]

The staging app is the candidate alone, served with the production config (engine, batching,
replica size) on the cluster's Serve proxy under `/oikyo-staging`, reached over loopback; it is
deleted when the test ends, passed or not.
"""

from __future__ import annotations

import asyncio
import time

import httpx
from ray import serve

from oikyo_ray.cluster import init_ray
from oikyo_ray.config import OikyoConfig
from oikyo_ray.deploy.checks import budget_misses, gate_failures
from oikyo_ray.deploy.load import hourly_price, plan, replay, summarize
from oikyo_ray.errors import DeployRefused, OikyoError
from oikyo_ray.model.load import load_tokenizer, resolve_model_path
from oikyo_ray.registry import registry
from oikyo_ray.registry.registry import CHALLENGER, CHAMPION
from oikyo_ray.serve.demo_call import ephemeral_token
from oikyo_ray.serve.published import variant_name
from oikyo_ray.serve.ray_serve import serve_running, start

STAGING_APP, STAGING_PREFIX = "oikyo-staging", "/oikyo-staging"


def deploy(cfg: OikyoConfig, run: str, model: str, canary: float | None = None, log=print) -> dict:
    """Gate, stage and promote `run` as a version of `model`; returns what was done. Refusals
    raise `DeployRefused` with the reasons (gates: nothing is written; budgets: the version and
    its staging figures are kept, no alias moves)."""
    root = cfg.run.root
    if canary is not None and not 0 < canary < 100:
        raise OikyoError(f"--canary {canary}: give a share of traffic between 0 and 100 (exclusive)")
    summary = registry.run_summary(run)
    failed = gate_failures(summary, cfg.deploy.require_eval)
    if failed:
        raise DeployRefused(
            f"{summary['run']} is not deployed: " + "; ".join(failed),
            hint="fix the run (see its eval/report.md) and deploy the new run; nothing was written",
        )
    state = registry.load(root, model)
    if canary is not None and CHAMPION not in state.aliases:
        raise OikyoError(
            f"model {model!r} has no {CHAMPION} yet for a canary to be compared with",
            hint=f"deploy without --canary first: `oikyo deploy RUN --model {model}`",
        )
    same = [n for n, v in sorted(state.versions.items()) if v["run"] == summary["run"]]
    version = same[-1] if same else registry.register(root, model, run)["version"]
    log(f"[oikyo] deploy: {model} v{version} <- {summary['run']}: eval gates passed; staging load test ...")
    figures = stage(cfg, model, version, log)
    misses = budget_misses(figures, cfg.deploy.budgets)
    registry.record_staging(
        root,
        model,
        version,
        {
            "passed": not misses,
            "misses": misses,
            "figures": figures,
            "load": cfg.deploy.load.model_dump(mode="json"),
            "budgets": cfg.deploy.budgets.model_dump(mode="json"),
        },
    )
    log(f"[oikyo] staging: {describe(figures)}")
    if misses:
        raise DeployRefused(
            f"{model} v{version} is not deployed: the staging load test missed its budgets: " + "; ".join(misses),
            hint="the figures are kept with the version (`oikyo registry show`); change the model, the serving "
            "settings or deploy.budgets",
        )
    if canary is None:
        registry.set_alias(root, model, CHAMPION, version)
        log(f"[oikyo] {model}: {CHAMPION} -> v{version}")
    else:
        registry.set_alias(root, model, CHALLENGER, version)
        registry.set_traffic(root, model, {CHAMPION: 100 - canary, CHALLENGER: canary})
        log(f"[oikyo] {model}: {CHALLENGER} -> v{version} with {canary:g}% of the traffic")
    return {"model": model, "version": version, "canary": canary, "staging": figures}


def describe(f: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v:.0f} ms"

    cost = "-" if f["cost_per_1m_tokens"] is None else f"{f['cost_per_1m_tokens']:.2f}"
    return (
        f"{f['requests']} requests, error rate {f['error_rate']:.1%}, p50 {ms(f['p50_ms'])}, p99 {ms(f['p99_ms'])}, "
        f"{f['tokens_per_s']:.1f} tokens/s, cost per 1M tokens {cost} (at {f['price_per_hour']:.3f}/h)"
    )


def stage(cfg: OikyoConfig, model: str, version: int, log=print) -> dict:
    """Serve the candidate alone in a staging app, send it the configured load, return the figures."""
    load = cfg.deploy.load
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(cfg.model, model_path)
    requests = plan(load, len(tokenizer), set(tokenizer.all_special_ids))
    scfg = cfg.model_copy(deep=True)
    token_file = ephemeral_token(cfg)
    sc = scfg.serve
    sc.host, sc.route_prefix, sc.token_file, sc.auth = "127.0.0.1", STAGING_PREFIX, str(token_file), True
    sc.adapters, sc.routes, sc.registry_models, sc.adapter_root = {}, {}, [model], None
    init_ray()
    token, name = token_file.read_text().strip(), variant_name(model, version)
    ours = not serve_running()  # Serve started only for staging goes away with it
    try:
        url = start(scfg, model_path, name=STAGING_APP, reuse_proxy=True)
        _reachable(url)
        if load.warmup_requests:
            asyncio.run(replay(url, token, name, requests[: load.warmup_requests], load.concurrency))
        records = asyncio.run(replay(url, token, name, requests, load.concurrency))
    finally:
        if ours:
            serve.shutdown()
        else:
            serve.delete(STAGING_APP)
        token_file.unlink(missing_ok=True)
    price = hourly_price(cfg.serve, cfg.cost.cpu_hour, cfg.cost.gpu_hour)
    return summarize(records, load.duration_s, price)


def _reachable(url: str, wait_s: float = 60) -> None:
    """The staging app answers on its URL. Serve runs one proxy per cluster: when it was started
    on another port than serve.port, the app is there and not here, which this names."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise OikyoError(
                f"the staging app does not answer at {url}/healthz",
                hint="set serve.port to the port of the cluster's running Serve proxy",
            )
        time.sleep(0.5)
