"""The OpenAI-compatible HTTP app (FastAPI, Ray-free): auth, validation, prompts, SSE, metrics.

    create_app(Service(cfg.serve, tokenizer, token, backend, metrics)) -> FastAPI

The app answers; a `Backend` generates (the Model deployment under Ray Serve, see `ray_serve.py`;
a fake in tests). Auth is a dependency of every /v1 route, errors are answered by the exception
handlers of `http_errors.py`, and the generation routes count every answer per model and status.
Endpoints: GET /healthz, GET /v1/models, POST /v1/completions, POST /v1/chat/completions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from oikyo_ray.config import ServeConfig
from oikyo_ray.serve.adapters import list_root, validate_name
from oikyo_ray.serve.auth import authorized, bearer
from oikyo_ray.serve.body import parse_json, read_body
from oikyo_ray.serve.http_errors import (
    APIError,
    InvalidRequest,
    Unauthorized,
    api_error,
    install_error_handlers,
    invalid_fields,
    raise_for_error,
)
from oikyo_ray.serve.prompts import chat_prompt, check_prompt_length, check_prompt_size, completion_prompts, text_size
from oikyo_ray.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    GenerationRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    new_id,
    sse,
)

Req = TypeVar("Req", CompletionRequest, ChatRequest)


class Backend(Protocol):
    """Generates for the app; `adapter` is an adapter name, "" for the base model. Results and
    pieces may be error dicts (`http_errors.raise_for_error`)."""

    async def generate(self, adapter: str, prompt: str, sampling: dict) -> dict: ...

    def stream(self, adapter: str, prompt: str, sampling: dict) -> AsyncIterator[str | dict]: ...


class Metrics(Protocol):
    def request(self, model: str, status: int, seconds: float) -> None: ...

    def tokens(self, model: str, outs: list[dict]) -> None: ...


@dataclass
class Service:
    """What the app serves with (on `app.state.service`)."""

    cfg: ServeConfig
    tokenizer: Any  # counts prompt tokens, renders chat templates
    token: str | None  # the expected bearer token; None when auth is off
    backend: Backend
    metrics: Metrics


def service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(service)]


def require_token(
    svc: ServiceDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    if not authorized(svc.token, credentials.credentials if credentials else None):
        raise Unauthorized()


class MeteredRoute(APIRoute):
    """A generation route: every answer, errors included, is counted with its latency under the
    request's model (`request.state.model`, "?" before the body is valid); a stream when it ends."""

    def get_route_handler(self) -> Callable:
        handle = super().get_route_handler()

        async def metered(request: Request) -> Response:
            t0 = time.perf_counter()

            def record(status: int) -> None:
                model = getattr(request.state, "model", "?")
                request.app.state.service.metrics.request(model, status, time.perf_counter() - t0)

            try:
                response = await handle(request)
            except Exception as e:
                record(api_error(e).status)
                raise  # the exception handlers answer
            if isinstance(response, StreamingResponse):
                response.body_iterator = _then(response.body_iterator, lambda: record(response.status_code))
            else:
                record(response.status_code)
            return response

        return metered


async def _then(body: AsyncIterable, done: Callable[[], None]) -> AsyncIterator:
    try:
        async for chunk in body:
            yield chunk
    finally:
        done()


public = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_token)])
generation = APIRouter(prefix="/v1", dependencies=[Depends(require_token)], route_class=MeteredRoute)


@public.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@v1.get("/models")
async def models(svc: ServiceDep) -> dict:
    sc = svc.cfg
    names = [sc.base_model_name, *sorted(set(sc.adapters) | set(await asyncio.to_thread(list_root, sc.adapter_root)))]
    return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "oikyo"} for m in names]}


def body_of(model: type[Req]) -> Callable[..., Awaitable[Req]]:
    """A dependency that reads the body as `model`: bounded (`body.read_body`), parsed strictly
    (`body.parse_json`), then validated, naming the first bad field. It replaces FastAPI's own body
    parsing, which has no size or depth limit, and runs after the auth dependency, so a client
    without a token never gets its body read."""

    async def read(request: Request, svc: ServiceDep) -> Req:
        raw = await read_body(request, svc.cfg.max_body_bytes)
        data = parse_json(raw, request.headers.get("content-type"))
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise invalid_fields(e.errors(include_input=False, include_url=False)) from None

    return read


@generation.post("/completions")
async def completions(
    req: Annotated[CompletionRequest, Depends(body_of(CompletionRequest))], request: Request, svc: ServiceDep
) -> Any:
    check_request(svc.cfg, req)
    request.state.model = req.model
    prompts = completion_prompts(req)
    if not 1 <= len(prompts) <= svc.cfg.max_prompts_per_request:
        raise InvalidRequest(f"prompt: between 1 and {svc.cfg.max_prompts_per_request} prompts", param="prompt")
    for p in prompts:
        check_prompt_size(len(p.encode("utf-8")), svc.cfg.max_prompt_tokens, svc.cfg.max_prompt_bytes_per_token)
    return await _answer(svc, req, prompts, chat=False)


@generation.post("/chat/completions")
async def chat_completions(
    req: Annotated[ChatRequest, Depends(body_of(ChatRequest))], request: Request, svc: ServiceDep
) -> Any:
    check_request(svc.cfg, req)
    request.state.model = req.model
    cfg = svc.cfg
    if len(req.messages) > cfg.max_messages_per_request:
        raise InvalidRequest(f"messages: more than {cfg.max_messages_per_request} messages", param="messages")
    check_prompt_size(text_size(req), cfg.max_prompt_tokens, cfg.max_prompt_bytes_per_token)
    # the template renders off the event loop: a big conversation must not stall other requests
    prompt = await run_in_threadpool(chat_prompt, svc.tokenizer, req)
    check_prompt_size(len(prompt.encode("utf-8")), cfg.max_prompt_tokens, cfg.max_prompt_bytes_per_token)
    return await _answer(svc, req, [prompt], chat=True)


def check_request(cfg: ServeConfig, req: GenerationRequest) -> None:
    """The limits of this server (the body's own shape is checked by its pydantic model)."""
    if req.max_tokens > cfg.max_tokens_limit:
        raise InvalidRequest(f"max_tokens {req.max_tokens} > limit {cfg.max_tokens_limit}", param="max_tokens")
    stops = req.stops()
    if len(stops) > cfg.max_stop_sequences:
        raise InvalidRequest(f"stop: at most {cfg.max_stop_sequences} stop strings", param="stop")
    if any(not 1 <= len(s) <= cfg.max_stop_chars for s in stops):
        raise InvalidRequest(f"stop: each stop string must have 1 to {cfg.max_stop_chars} characters", param="stop")
    if req.model != cfg.base_model_name:
        validate_name(req.model)


async def _answer(svc: Service, req: GenerationRequest, prompts: list[str], chat: bool) -> Any:
    for p in prompts:
        # tokenising runs off the event loop (bounded by check_prompt_size, but still CPU work);
        # concurrent calls share the fast tokenizer, safe as none changes its truncation or padding
        await run_in_threadpool(check_prompt_length, svc.tokenizer, p, svc.cfg.max_prompt_tokens)
    adapter = "" if req.model == svc.cfg.base_model_name else req.model
    if req.stream:
        if len(prompts) != 1:
            raise InvalidRequest("stream=true takes a single prompt")
        return await _stream(svc, req, adapter, prompts[0], chat)
    outs = await asyncio.wait_for(
        asyncio.gather(*[svc.backend.generate(adapter, p, req.sampling()) for p in prompts]),
        timeout=svc.cfg.request_timeout_s,
    )
    for o in outs:
        raise_for_error(o)
    svc.metrics.tokens(req.model, outs)
    return chat_response(req.model, outs[0]) if chat else completion_response(req.model, outs)


async def _stream(svc: Service, req: GenerationRequest, adapter: str, prompt: str, chat: bool) -> StreamingResponse:
    pieces = svc.backend.stream(adapter, prompt, req.sampling()).__aiter__()
    # wait for the first piece: an unknown adapter or a full queue answers as JSON, not as SSE
    first = await anext(pieces, None)
    if isinstance(first, dict):
        raise APIError.from_dict(first)
    return StreamingResponse(_events(svc, req.model, first, pieces, chat), media_type="text/event-stream")


async def _events(svc: Service, model: str, first: str | None, rest: AsyncIterator, chat: bool) -> AsyncIterator[str]:
    make = chat_chunk if chat else completion_chunk
    rid = new_id("chatcmpl" if chat else "cmpl")
    if chat:
        yield sse(make(rid, model, None, role=True))
    n = 0
    if first is not None:
        n += 1
        yield sse(make(rid, model, first))
        async for piece in rest:
            n += 1
            yield sse(make(rid, model, piece))
    yield sse(make(rid, model, None, finish="stop"))
    yield "data: [DONE]\n\n"
    svc.metrics.tokens(model, [{"prompt_tokens": 0, "completion_tokens": n}])


def create_app(svc: Service) -> FastAPI:
    app = FastAPI(title="oikyo", docs_url=None, redoc_url=None)
    app.state.service = svc
    install_error_handlers(app)
    for router in (public, v1, generation):
        app.include_router(router)
    return app
