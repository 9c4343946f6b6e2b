"""The OpenAI-compatible Ray Serve app: an ingress (auth, validation, SSE, metrics) in front of
model replicas (one base model each, adapters multiplexed LRU, mixed-adapter batches).

Run as:  RAY_AUTH_MODE=token serve run serve/oikyo.yaml      (import path oikyo_ray.serve.app:build_app)
   or:   oikyo serve CONFIG.yaml [key=value ...]
Endpoints: GET /healthz, GET /v1/models, POST /v1/completions, POST /v1/chat/completions.
"""

import asyncio
import time

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from oikyo_ray.config import OikyoConfig
from oikyo_ray.serve.batcher import MixedBatcher
from oikyo_ray.serve.http_errors import HTTPError, error_dict, exception_status
from oikyo_ray.serve.protocol import (ChatRequest, CompletionRequest, chat_chunk, chat_response,
                                      completion_chunk, completion_response)

api = FastAPI(title="oikyo", docs_url=None, redoc_url=None)


class _Loaded:
    """What the multiplexer caches per adapter; Serve calls __del__ on LRU eviction."""

    def __init__(self, engine, name: str):
        self.engine, self.name = engine, name

    def __del__(self):
        self.engine.remove_adapter(self.name)


@serve.deployment(name="Model", health_check_period_s=10)
class ModelServer:
    """One base model; adapters load on first use (from the static map or the adapter root)."""

    def __init__(self, config: dict, model_path: str):
        from oikyo_ray.serve.engine import Engine

        self.cfg = OikyoConfig.model_validate(config)
        self.engine = Engine(self.cfg.model, model_path)
        sc = self.cfg.serve
        async def load(name: str):  # a plain function: Serve keeps its LRU cache on it
            return await self._load_adapter(name)

        self._load = serve.multiplexed(max_num_models_per_replica=sc.max_adapters_per_replica)(load)
        self.batcher = MixedBatcher(self._run_batch, sc.max_batch_size, sc.batch_wait_timeout_s)
        self.batches: list[list] = []
        self.engine_ms: list[float] = []  # wall time of recent engine calls (overhead analysis)

    async def _load_adapter(self, name: str):
        from oikyo_ray.serve.adapters import resolve_adapter

        sc = self.cfg.serve
        path = await asyncio.to_thread(resolve_adapter, name, sc.adapters, sc.adapter_root, self.cfg.model.cache_dir)
        await asyncio.to_thread(self.engine.add_adapter, name, str(path))
        return _Loaded(self.engine, name)

    async def _adapter(self) -> str | None:
        name = serve.get_multiplexed_model_id()
        if not name:
            return None
        await self._load(name)
        return name

    async def generate(self, prompt: str, sampling: dict) -> dict:
        try:
            adapter = await self._adapter()
        except Exception as e:  # noqa: BLE001 - becomes a typed error dict for the ingress
            return error_dict(e)
        return await self.batcher.submit({"adapter": adapter, "prompt": prompt, "sampling": sampling})

    async def _run_batch(self, items: list[dict]) -> list[dict]:
        for it in items:  # an LRU eviction may have raced this batch: reload quietly
            if it["adapter"] and it["adapter"] not in self.engine.loaded:
                await self._load(it["adapter"])
        self.batches = (self.batches + [[it["adapter"] for it in items]])[-50:]
        t0 = time.perf_counter()
        outs = await asyncio.to_thread(self.engine.generate_many, items)
        self.engine_ms = (self.engine_ms + [(time.perf_counter() - t0) * 1000])[-200:]
        return outs

    def stats(self) -> dict:
        """For tests and debugging: loaded adapters and the adapters of recent batches."""
        return {"loaded": list(self.engine.loaded), "batches": self.batches, "engine_ms": self.engine_ms}

    async def stream(self, prompt: str, sampling: dict):
        try:
            adapter = await self._adapter()
        except Exception as e:  # noqa: BLE001
            yield error_dict(e)
            return
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def produce():
            try:
                for piece in self.engine.stream(adapter, prompt, sampling):
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        task = loop.run_in_executor(None, produce)
        while (piece := await queue.get()) is not None:
            yield piece
        await task

    def check_health(self):
        if not self.engine.healthy():
            raise RuntimeError("model produced non-finite logits")


@serve.deployment(name="OpenAIIngress", max_ongoing_requests=256)
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, config: dict, model_path: str, model: DeploymentHandle):
        from oikyo_ray.model.load import load_tokenizer
        from oikyo_ray.serve.auth import load_token
        from oikyo_ray.serve.metrics import ServeMetrics

        self.cfg = OikyoConfig.model_validate(config)
        self.token = load_token(self.cfg.serve)
        self.model = model
        self.tokenizer = load_tokenizer(self.cfg.model, model_path)
        self.metrics = ServeMetrics()

    # request checks -------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        from oikyo_ray.serve.auth import authorized

        if not authorized(self.token, request.headers.get("authorization")):
            raise HTTPError(401, "missing or invalid bearer token", "authentication_error",
                            {"WWW-Authenticate": "Bearer"})

    async def _parse(self, request: Request, schema):
        self._auth(request)
        try:
            body = await request.json()
        except ValueError:
            raise HTTPError(400, "request body is not valid JSON", "invalid_request_error") from None
        try:
            req = schema.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise HTTPError(400, f"{where}: {first['msg']}", "invalid_request_error") from None
        sc = self.cfg.serve
        if req.max_tokens > sc.max_tokens_limit:
            raise HTTPError(400, f"max_tokens {req.max_tokens} > limit {sc.max_tokens_limit}", "invalid_request_error")
        if req.model != sc.base_model_name:
            from oikyo_ray.serve.adapters import BadAdapterName, validate_name

            try:
                validate_name(req.model)
            except BadAdapterName as e:
                raise HTTPError(400, str(e), "invalid_request_error") from None
        return req

    def _check_prompt(self, prompt: str) -> None:
        n = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if n > self.cfg.serve.max_prompt_tokens:
            raise HTTPError(400, f"prompt has {n} tokens > limit {self.cfg.serve.max_prompt_tokens}",
                            "invalid_request_error")

    def _handle(self, req):
        adapter = "" if req.model == self.cfg.serve.base_model_name else req.model
        return self.model.options(multiplexed_model_id=adapter)

    @staticmethod
    def _sampling(req) -> dict:
        return {"max_new_tokens": req.max_tokens, "temperature": req.temperature, "top_p": req.top_p,
                "seed": req.seed, "stop": req.stops()}

    # endpoints ------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request):
        from oikyo_ray.serve.adapters import list_root

        try:
            self._auth(request)
        except HTTPError as e:
            return e.response()
        sc = self.cfg.serve
        names = [sc.base_model_name, *sorted(set(sc.adapters) | set(await asyncio.to_thread(list_root, sc.adapter_root)))]
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "oikyo"} for m in names]}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, CompletionRequest, chat=False)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self._serve(request, ChatRequest, chat=True)

    async def _serve(self, request: Request, schema, chat: bool):
        t0 = time.perf_counter()
        model = "?"
        try:
            req = await self._parse(request, schema)
            model = req.model
            if chat:
                prompts = [self.tokenizer.apply_chat_template([m.model_dump() for m in req.messages],
                                                              tokenize=False, add_generation_prompt=True)]
            else:
                prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
            for p in prompts:
                self._check_prompt(p)
            if req.stream:
                if len(prompts) != 1:
                    raise HTTPError(400, "stream=true takes a single prompt", "invalid_request_error")
                return await self._stream(req, prompts[0], chat, t0)
            outs = await asyncio.wait_for(
                asyncio.gather(*[self._handle(req).generate.remote(p, self._sampling(req)) for p in prompts]),
                timeout=self.cfg.serve.request_timeout_s)
            for o in outs:
                if "error" in o:
                    raise HTTPError(o["error"]["status"], o["error"]["message"], o["error"]["type"])
            self.metrics.done(model, 200, t0, outs)
            return chat_response(model, outs[0]) if chat else completion_response(model, outs)
        except HTTPError as e:
            self.metrics.done(model, e.status, t0)
            return e.response()
        except Exception as e:  # noqa: BLE001 - backpressure and timeouts become HTTP answers
            status, err = exception_status(e)
            self.metrics.done(model, status, t0)
            return err.response()

    async def _stream(self, req, prompt: str, chat: bool, t0: float):
        gen = self._handle(req).options(stream=True).stream.remote(prompt, self._sampling(req))
        first = await gen.__anext__()  # surfaces errors (unknown adapter, backpressure) as JSON, not SSE
        if isinstance(first, dict) and "error" in first:
            raise HTTPError(first["error"]["status"], first["error"]["message"], first["error"]["type"])
        make = chat_chunk if chat else completion_chunk

        async def events():
            from oikyo_ray.serve.protocol import sse as _sse  # local: Serve pickles this class by value

            n = 0
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{int(t0 * 1e6):x}"
            if chat:
                yield _sse(make(rid, req.model, None, role=True))
            piece = first
            while True:
                n += 1
                yield _sse(make(rid, req.model, piece))
                try:
                    piece = await gen.__anext__()
                except StopAsyncIteration:
                    break
            yield _sse(make(rid, req.model, None, finish="stop"))
            yield "data: [DONE]\n\n"
            self.metrics.done(req.model, 200, t0, [{"prompt_tokens": 0, "completion_tokens": n}])

        return StreamingResponse(events(), media_type="text/event-stream")


def build(cfg: OikyoConfig, model_path: str):
    """The bound application for `serve.run` (deployment options come from `serve.*`)."""
    sc = cfg.serve
    conf = cfg.model_dump(mode="json")
    autoscaling = None
    if sc.max_replicas > 1 or sc.min_replicas != 1:
        autoscaling = {"min_replicas": sc.min_replicas, "max_replicas": sc.max_replicas,
                       "target_ongoing_requests": sc.target_ongoing_requests}
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
    from oikyo_ray.config import load_config
    from oikyo_ray.model.load import resolve_model_path

    overrides = args.get("overrides") or []
    if isinstance(overrides, str):
        overrides = overrides.split()
    cfg = load_config(args.get("config"), overrides)
    return build(cfg, resolve_model_path(cfg.model))


def start(cfg: OikyoConfig, model_path: str, blocking: bool = False, name: str = "oikyo") -> str:
    """Start Serve's HTTP proxy on serve.host:port and deploy the app; returns its base URL."""
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build(cfg, model_path), name=name, route_prefix=cfg.serve.route_prefix, blocking=blocking)
    return f"http://{cfg.serve.host}:{cfg.serve.port}{cfg.serve.route_prefix.rstrip('/')}"
