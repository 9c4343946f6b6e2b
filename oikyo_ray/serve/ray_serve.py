"""The serve stage on Ray Serve (its one Ray adapter): an ingress deployment running the Ray-free
FastAPI app (`app.py`) in front of model replicas (`replica.py`: one base model each, adapters
multiplexed LRU, mixed-adapter batches), and Prometheus metrics through Ray's metrics agent.

Run as:  RAY_AUTH_MODE=token serve run serve/oikyo.yaml   (import path oikyo_ray.serve.ray_serve:build_app)
   or:   oikyo serve CONFIG.yaml [key=value ...]
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

from ray import serve
from ray.serve import metrics
from ray.serve.context import _get_global_client  # private: see _running_proxy
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from oikyo_ray.config import OikyoConfig, load_config
from oikyo_ray.errors import ConfigError
from oikyo_ray.model.load import load_tokenizer, resolve_model_path
from oikyo_ray.runs import store
from oikyo_ray.serve.adapters import AdapterNotFound, BadAdapterName
from oikyo_ray.serve.app import NO_LABEL, Service, create_app
from oikyo_ray.serve.auth import load_token
from oikyo_ray.serve.continuous import ContinuousEngine
from oikyo_ray.serve.demo_call import ask, ephemeral_token
from oikyo_ray.serve.drift_view import drift_values
from oikyo_ray.serve.engine import Engine
from oikyo_ray.serve.feedback import Answered
from oikyo_ray.serve.http_errors import ServerBusy
from oikyo_ray.serve.labels import ModelLabels
from oikyo_ray.serve.published import Published
from oikyo_ray.serve.replica import ModelReplica, load_adapter
from oikyo_ray.serve.traffic import Traffic

LATENCY_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]
COUNTS = [1, 2, 4, 8, 16, 32, 64]


# ---- metrics (exported as ray_oikyo_*) ----------------------------------------------------------


class RequestMetrics:
    """Per-model (adapter) requests by HTTP status, tokens and end-to-end latency; the model label
    is bounded (`labels.ModelLabels`). Routed requests also carry the route they asked for and the
    role (alias) of the variant that answered, which the canary alert and `oikyo ab` compare by;
    both come from the config and the registry's traffic split, never from clients."""

    def __init__(self, labels: ModelLabels) -> None:
        self.label = labels
        tags = ("model", "status", "route", "role")
        self.requests = metrics.Counter(
            "oikyo_requests", description="Requests by model and HTTP status.", tag_keys=tags
        )
        self.token_count = metrics.Counter(
            "oikyo_tokens", description="Tokens by model and kind.", tag_keys=("model", "kind")
        )
        self.latency = metrics.Histogram(
            "oikyo_request_latency_ms", description="End-to-end latency.", boundaries=LATENCY_MS, tag_keys=tags
        )

    def request(self, model: str, status: int, seconds: float, route: str = NO_LABEL, role: str = NO_LABEL) -> None:
        tags = {"model": self.label(model, status), "status": str(status), "route": route, "role": role}
        self.requests.inc(1, tags=tags)
        self.latency.observe(seconds * 1000, tags=tags)

        self.feedback_count = metrics.Counter(
            "oikyo_feedback",
            description="Feedback posts by the answering model, route, role, kind and verdict.",
            tag_keys=("model", "route", "role", "kind", "verdict"),
        )
        self.capture_rows = metrics.Counter(
            "oikyo_capture_rows",
            description="Captured answers and feedback rows by stream and outcome "
            "(written, dropped_full, dropped_error, dropped_redaction).",
            tag_keys=("stream", "outcome"),
        )

    def tokens(self, model: str, outs: list[dict]) -> None:
        for o in outs:
            for kind in ("prompt", "completion"):
                if o.get(f"{kind}_tokens"):
                    self.token_count.inc(o[f"{kind}_tokens"], tags={"model": self.label(model, 200), "kind": kind})

    def feedback(self, answered: Answered, kind: str, verdict: str) -> None:
        tags = {"model": self.label(answered.model, 200), "route": answered.route, "role": answered.role}
        self.feedback_count.inc(1, tags={**tags, "kind": kind, "verdict": verdict})

    def captured(self, stream: str, outcome: str, rows: int) -> None:
        self.capture_rows.inc(rows, tags={"stream": stream, "outcome": outcome})


class DriftGauges:
    """`oikyo drift`'s latest verdicts as gauges, re-read every serve.capture.drift_poll_s by a
    daemon thread: ray_oikyo_drift_detected{model} (1 drifted, 0 not, -1 too few rows) and
    ray_oikyo_drift_ratio{model, check} (a check's figure over its threshold)."""

    def __init__(self, capture_root: str, every_s: float) -> None:
        self.root, self.every_s, self.stop = capture_root, every_s, threading.Event()
        self.detected = metrics.Gauge(
            "oikyo_drift_detected", description="Latest drift verdict per model.", tag_keys=("model",)
        )
        self.ratio = metrics.Gauge(
            "oikyo_drift_ratio", description="Drift check figure over its threshold.", tag_keys=("model", "check")
        )
        threading.Thread(target=self._run, name="oikyo-drift-gauges", daemon=True).start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for model, values in drift_values(self.root).items():
                self.detected.set(values.pop("detected"), tags={"model": model})
                for check, v in values.items():
                    self.ratio.set(v, tags={"model": model, "check": check})
            self.stop.wait(self.every_s)


class BatchMetrics:
    """Per replica: how full the engine's batches are, how mixed, and how long the engine takes."""

    def __init__(self) -> None:
        self.size = metrics.Histogram("oikyo_batch_size", description="Requests per engine call.", boundaries=COUNTS)
        self.models = metrics.Histogram(
            "oikyo_batch_models",
            boundaries=COUNTS,
            description="Distinct models (adapters, the base) per engine call; above 1 they shared one generate().",
        )
        self.engine = metrics.Histogram(
            "oikyo_engine_latency_ms", description="Wall time of an engine call.", boundaries=LATENCY_MS
        )

    def batch(self, adapters: list, seconds: float) -> None:
        self.size.observe(len(adapters))
        self.models.observe(len(set(adapters)))
        self.engine.observe(seconds * 1000)


def _variants(sc) -> set[str]:
    """The adapters routed names split between: labels known from the start."""
    return {name for weights in sc.routes.values() for name in weights}


# ---- deployments --------------------------------------------------------------------------------


@serve.deployment(name="Model", health_check_period_s=10)
class ModelServer:
    """One base model; adapters load on first use (from the static map or the adapter root)."""

    def __init__(self, config: dict, model_path: str):
        cfg = OikyoConfig.model_validate(config)
        sc = cfg.serve
        if sc.engine == "continuous":
            engine = ContinuousEngine(cfg.model, model_path, max_running=sc.max_batch_size)
            engine.request_timeout_s = sc.request_timeout_s  # the ingress answers 504 then: free the row too
        else:
            engine = Engine(cfg.model, model_path)
        self.engine = engine
        engine.token_timeout_s = self.stall_s = sc.stall_timeout_s

        failures = metrics.Counter(
            "oikyo_adapter_load_failures",
            description="Adapters that exist but failed to load (unknown names are not counted).",
            tag_keys=("model",),
        )

        async def load(name: str):  # a plain function: Serve keeps its LRU cache on it
            try:
                return await load_adapter(engine, name, sc, cfg.model.cache_dir, cfg.run.root)
            except (AdapterNotFound, BadAdapterName):
                raise  # the client's mistake, and unbounded names: not a label
            except Exception:
                # counted for the AdapterLoadFailures alert, then raised on: Serve's multiplexer
                # answers this request with it and retries the load on the next one
                failures.inc(tags={"model": name})
                raise

        acquire = serve.multiplexed(max_num_models_per_replica=sc.max_adapters_per_replica)(load)
        self.replica = ModelReplica(
            engine,
            acquire,
            sc.max_batch_size,
            sc.batch_wait_timeout_s,
            BatchMetrics().batch,
            max_adapters=sc.max_adapters_per_replica,
        )

    async def generate(self, prompt: str, sampling: dict) -> dict:
        return await self.replica.generate(serve.get_multiplexed_model_id() or None, prompt, sampling)

    async def stream(self, prompt: str, sampling: dict) -> AsyncIterator[str | dict]:
        async for piece in self.replica.stream(serve.get_multiplexed_model_id() or None, prompt, sampling):
            yield piece

    def health(self) -> dict:
        return {"ok": not self.replica.stalled(self.stall_s), "pending": self.replica.pending}

    def check_health(self) -> None:
        if self.replica.stalled(self.stall_s):
            raise RuntimeError(f"engine made no progress for {self.stall_s:.0f}s with requests waiting")
        if not self.engine.healthy():
            raise RuntimeError("model produced non-finite logits")


class ModelClient:
    """The app's backend: the Model deployment, the adapter sent as Serve's multiplexed model id
    (so requests go to replicas that hold it)."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def generate(self, adapter: str, prompt: str, sampling: dict) -> dict:
        with _busy_answers_503():
            return await self.handle.options(multiplexed_model_id=adapter).generate.remote(prompt, sampling)

    async def stream(self, adapter: str, prompt: str, sampling: dict) -> AsyncIterator[str | dict]:
        gen = self.handle.options(multiplexed_model_id=adapter, stream=True).stream.remote(prompt, sampling)
        with _busy_answers_503():
            async for piece in gen:
                yield piece

    async def health(self) -> dict:
        """A model replica's own view (one replica, picked by Serve): stalled or serving."""
        return await self.handle.health.remote()


@contextmanager
def _busy_answers_503() -> Iterator[None]:
    """Serve's full queue as the app's 503. (Serve puts its own plain-text handler for
    BackPressureError on the app, so it is translated here, where the handle raises it.)"""
    try:
        yield
    except BackPressureError:
        raise ServerBusy() from None


@serve.deployment(name="OpenAIIngress", max_ongoing_requests=256)
@serve.ingress()
class OpenAIIngress:
    """Auth, validation, SSE and metrics: `app.py`'s FastAPI app over the Model deployment."""

    def __init__(self, config: dict, model_path: str, model: DeploymentHandle):
        cfg = OikyoConfig.model_validate(config)
        request_metrics = RequestMetrics(
            ModelLabels({cfg.serve.base_model_name, *cfg.serve.adapters, *_variants(cfg.serve)})
        )
        self.service = Service(
            cfg.serve,
            load_tokenizer(cfg.model, model_path),
            load_token(cfg.serve),
            ModelClient(model),
            request_metrics,
            Published(cfg.run.root, cfg.serve.registry_models, cfg.serve.registry_poll_s)
            if cfg.serve.registry_models
            else None,
            Traffic(cfg.serve, capture_root(cfg), request_metrics.captured)
            if cfg.serve.capture.enabled or cfg.serve.feedback.enabled
            else None,
        )

        capture = cfg.serve.capture
        self.drift = DriftGauges(capture_root(cfg), capture.drift_poll_s) if capture.enabled else None

    def __del__(self):  # Serve calls it when the replica shuts down: write what capture queued
        if getattr(self, "drift", None) is not None:
            self.drift.stop.set()
        if getattr(self, "service", None) is not None and self.service.traffic is not None:
            self.service.traffic.close()

    def __serve_build_asgi_app__(self):  # Serve calls this after __init__, in the replica
        return create_app(self.service)


# ---- applications -------------------------------------------------------------------------------


def capture_root(cfg: OikyoConfig) -> str:
    """Where captured answers and feedback go: serve.capture.root, else <run.root>/capture."""
    return cfg.serve.capture.root or store.join(cfg.run.root, "capture")


def build(cfg: OikyoConfig, model_path: str):
    """The bound application for `serve.run` (deployment options come from `serve.*`)."""
    sc = cfg.serve
    conf = cfg.model_dump(mode="json")
    if not cfg.run.root.startswith("s3://"):  # replicas may run elsewhere: the registry's place, absolute
        conf["run"]["root"] = str(Path(cfg.run.root).expanduser().resolve())
    root = sc.capture.root
    if root and not root.startswith("s3://"):
        conf["serve"]["capture"]["root"] = str(Path(root).expanduser().resolve())
    autoscaling = None
    if sc.max_replicas > 1 or sc.min_replicas != 1:
        autoscaling = {
            "min_replicas": sc.min_replicas,
            "max_replicas": sc.max_replicas,
            "target_ongoing_requests": sc.target_ongoing_requests,
        }
    model = ModelServer.options(
        num_replicas="auto" if autoscaling else 1,
        autoscaling_config=autoscaling,
        max_ongoing_requests=sc.max_ongoing_requests,
        max_queued_requests=sc.max_queued_requests,
        ray_actor_options={"num_cpus": sc.cpus_per_replica, "num_gpus": sc.gpus_per_replica},
    ).bind(conf, model_path)
    return OpenAIIngress.options(ray_actor_options={"num_cpus": 0}).bind(conf, model_path, model)


def build_app(args: dict):
    """Application builder for `serve run`/`serve deploy`: args = {"config": path, "overrides": [...]}."""
    overrides = args.get("overrides") or []
    if isinstance(overrides, str):
        overrides = overrides.split()
    cfg = load_config(args.get("config"), overrides)
    if not cfg.serve.auth:
        # here Serve's http_options (serve run/deploy, a RayService) choose the bind address, not
        # serve.host: the loopback check that allows auth off cannot hold
        raise ConfigError(
            "serve.auth=false is refused under `serve run`/`serve deploy`: the proxy's bind address comes "
            "from http_options there, not serve.host",
            hint="keep serve.auth=true and give the token through serve.token_env or serve.token_file; "
            "auth can be off only with `oikyo serve` on a loopback serve.host",
        )
    return build(cfg, resolve_model_path(cfg.model))


def start(
    cfg: OikyoConfig, model_path: str, blocking: bool = False, name: str = "oikyo", reuse_proxy: bool = False
) -> str:
    """Start Serve's HTTP proxy on serve.host:port and deploy the app; returns its base URL.

    A cluster has one Serve proxy. When one already runs elsewhere than serve.host:port, Ray keeps it
    and only logs that the new options were ignored; here that is an error naming the field (the app
    would answer on a port nobody asked for), unless `reuse_proxy` (a staging app that only needs
    some route on the cluster's proxy): then the URL is the running proxy's."""
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    host, port = _running_proxy()
    if (host, port) != (cfg.serve.host, cfg.serve.port) and not reuse_proxy:
        raise ConfigError(
            f"Serve already runs on this cluster with its HTTP proxy on {host}:{port}; "
            f"serve.host={cfg.serve.host} serve.port={cfg.serve.port} cannot take effect",
            hint=f"set serve.host={host} serve.port={port} to add this app to that proxy, "
            "or stop the running one first (`serve shutdown`)",
        )
    serve.run(build(cfg, model_path), name=name, route_prefix=cfg.serve.route_prefix, blocking=blocking)
    if host in ("0.0.0.0", "::"):  # bound on every interface: reachable from here on loopback
        host = "127.0.0.1"
    return f"http://{host}:{port}{cfg.serve.route_prefix.rstrip('/')}"


def serve_running() -> bool:
    """Whether a Serve controller already runs on the connected cluster (starts nothing)."""
    return _get_global_client(raise_if_no_controller_running=False) is not None


def _running_proxy() -> tuple[str, int]:
    """The host and port the cluster's Serve proxy was started with. Ray has no public call for
    this (serve.status() omits it): read it from the controller client, which serve.start returns
    internally and keeps as the process's global client."""
    http = _get_global_client().http_config
    return http.host, http.port


def serve_and_ask(
    cfg: OikyoConfig, model_path: str, adapter_dir: Path, log=print, question: str = "What is the capital of Peru?"
) -> dict:
    """Serve a fresh adapter, ask it one question over real HTTP, shut Serve down (the demo's last step)."""
    name = adapter_dir.parent.name  # the run name selects the adapter
    token_file = ephemeral_token(cfg)
    scfg = cfg.model_copy(deep=True)
    scfg.serve.adapters = {name: str(adapter_dir)}
    scfg.serve.token_file = str(token_file)
    log(f"[oikyo] serve: base + adapter '{name}' on Ray Serve ...")
    try:
        url = start(scfg, model_path)
        answer = ask(url, name, question, token_file.read_text().strip())
        log(
            f"[oikyo] POST {url}/v1/chat/completions model={name!r}: {question!r} -> "
            f"{answer['choices'][0]['message']['content']!r}"
        )
        return answer
    finally:
        serve.shutdown()
        token_file.unlink(missing_ok=True)
