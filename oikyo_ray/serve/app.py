"""The OpenAI-compatible Ray Serve app.

Run as:  serve run oikyo_ray.serve.app:build_app config=serve/oikyo.yaml
   or:   oikyo serve CONFIG.yaml [key=value ...]
Endpoints: GET /healthz, GET /v1/models, POST /v1/completions, POST /v1/chat/completions.
"""


import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve

from oikyo_ray.config import OikyoConfig
from oikyo_ray.serve.protocol import ChatRequest, CompletionRequest, chat_response, completion_response, error_body

api = FastAPI(title="oikyo", docs_url=None, redoc_url=None)


def _error(status: int, message: str, type_: str) -> JSONResponse:
    return JSONResponse(error_body(message, type_), status_code=status)


@serve.deployment(name="OpenAIServer", max_ongoing_requests=16)
@serve.ingress(api)
class OpenAIServer:
    def __init__(self, config: dict, model_path: str):
        from oikyo_ray.serve.auth import load_token
        from oikyo_ray.serve.engine import Engine

        self.cfg = OikyoConfig.model_validate(config)
        self.token = load_token(self.cfg.serve)
        self.engine = Engine(self.cfg.model, model_path, self.cfg.serve.adapters, self.cfg.serve.base_model_name)

    async def _parse(self, request: Request, schema):
        from oikyo_ray.serve.auth import authorized

        if not authorized(self.token, request.headers.get("authorization")):
            return None, _error(401, "missing or invalid bearer token", "authentication_error")
        try:
            body = await request.json()
        except ValueError:
            return None, _error(400, "request body is not valid JSON", "invalid_request_error")
        try:
            req = schema.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            return None, _error(400, f"{where}: {first['msg']}", "invalid_request_error")
        sc = self.cfg.serve
        if req.model not in self.engine.model_names():
            return None, _error(404, f"model '{req.model}' not found; available: {self.engine.model_names()}",
                                "model_not_found")
        if req.max_tokens > sc.max_tokens_limit:
            return None, _error(400, f"max_tokens {req.max_tokens} > limit {sc.max_tokens_limit}", "invalid_request_error")
        if req.stream:
            return None, _error(400, "stream=true is not supported by this server yet", "invalid_request_error")
        return req, None

    def _sampling(self, req) -> dict:
        return {"max_new_tokens": req.max_tokens, "temperature": req.temperature, "top_p": req.top_p,
                "seed": req.seed, "stop": req.stops()}

    def _too_long(self, prompts: list[str]) -> JSONResponse | None:
        limit = self.cfg.serve.max_prompt_tokens
        for p in prompts:
            n = self.engine.count_tokens(p)
            if n > limit:
                return _error(400, f"prompt has {n} tokens > limit {limit}", "invalid_request_error")
        return None

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok", "models": self.engine.model_names()}

    @api.get("/v1/models")
    async def models(self, request: Request):
        from oikyo_ray.serve.auth import authorized

        if not authorized(self.token, request.headers.get("authorization")):
            return _error(401, "missing or invalid bearer token", "authentication_error")
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "oikyo"}
                                           for m in self.engine.model_names()]}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        req, err = await self._parse(request, CompletionRequest)
        if err:
            return err
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if err := self._too_long(prompts):
            return err
        outs = await asyncio.to_thread(self.engine.complete, req.model, prompts, **self._sampling(req))
        return completion_response(req.model, outs)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        req, err = await self._parse(request, ChatRequest)
        if err:
            return err
        prompt = self.engine.render_chat([m.model_dump() for m in req.messages])
        if err := self._too_long([prompt]):
            return err
        outs = await asyncio.to_thread(self.engine.complete, req.model, [prompt], **self._sampling(req))
        return chat_response(req.model, outs[0])

    def check_health(self):
        # fails (and Serve replaces the replica) if the model can no longer produce a token
        self.engine.complete(self.engine.base_name, ["ok"], max_new_tokens=1)


def build_app(args: dict):
    """Application builder for `serve run`/`serve deploy`: args = {"config": path, "overrides": [...]}."""
    from oikyo_ray.config import load_config
    from oikyo_ray.model.load import resolve_model_path

    overrides = args.get("overrides") or []
    if isinstance(overrides, str):
        overrides = overrides.split()
    cfg = load_config(args.get("config"), overrides)
    return OpenAIServer.bind(cfg.model_dump(mode="json"), resolve_model_path(cfg.model))


def start(cfg: OikyoConfig, model_path: str, blocking: bool = False, name: str = "oikyo") -> str:
    """Start Serve's HTTP proxy on serve.host:port and deploy the app; returns its base URL."""
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(OpenAIServer.bind(cfg.model_dump(mode="json"), model_path), name=name,
              route_prefix=cfg.serve.route_prefix, blocking=blocking)
    return f"http://{cfg.serve.host}:{cfg.serve.port}{cfg.serve.route_prefix.rstrip('/')}"
