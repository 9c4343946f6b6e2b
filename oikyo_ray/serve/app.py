"""The OpenAI-compatible HTTP app (FastAPI, Ray-free): auth, validation, prompts, SSE, metrics.

    create_app(Service(cfg.serve, tokenizer, token, backend, metrics)) -> FastAPI

The app answers; a `Backend` generates (the Model deployment under Ray Serve, see `ray_serve.py`;
a fake in tests). Auth is a dependency of every /v1 route, errors are answered by the exception
handlers of `http_errors.py`, and the generation routes count every answer per model and status.
Endpoints: GET /healthz, GET /v1/models, POST /v1/completions, POST /v1/chat/completions,
POST /v1/feedback (with serve.feedback). Answers go to `Service.traffic` (capture, feedback ids)
after they are made, off the request's path (`traffic.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from oikyo_ray.config import ServeConfig
from oikyo_ray.model.reasoning import ReasoningStream
from oikyo_ray.serve.adapters import list_root, validate_name
from oikyo_ray.serve.auth import authorized, bearer
from oikyo_ray.serve.body import parse_json, read_body
from oikyo_ray.serve.feedback import Answered, FeedbackRequest
from oikyo_ray.serve.http_errors import (
    APIError,
    InvalidRequest,
    NotFound,
    ServerBusy,
    TooManyRequests,
    Unauthorized,
    api_error,
    install_error_handlers,
    invalid_fields,
    raise_for_error,
)
from oikyo_ray.serve.prompts import (
    chat_prompt,
    check_prompt_ids,
    check_prompt_length,
    check_prompt_size,
    completion_prompts,
    text_size,
)
from oikyo_ray.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    GenerationRequest,
    NamedToolChoice,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    error_body,
    new_id,
    sse,
    usage_chunk,
)
from oikyo_ray.serve.published import Published
from oikyo_ray.serve.tool_calls import ToolCallStream
from oikyo_ray.serve.tool_calls import prefix as tool_call_prefix
from oikyo_ray.serve.traffic import Traffic
from oikyo_ray.serve.variants import pick

log = logging.getLogger(__name__)
Req = TypeVar("Req", CompletionRequest, ChatRequest, FeedbackRequest)
NO_LABEL = "-"  # the route or role label of a request for a name that is not routed


class Backend(Protocol):
    """Generates for the app; `adapter` is an adapter name, "" for the base model. Results and
    pieces may be error dicts (`http_errors.raise_for_error`)."""

    async def generate(self, adapter: str, prompt: str, sampling: dict) -> dict: ...

    def stream(self, adapter: str, prompt: str, sampling: dict) -> AsyncIterator[str | dict]: ...

    async def health(self) -> dict:
        """{"ok": bool, ...}: whether a model replica is serving (not stalled)."""
        ...


class Metrics(Protocol):
    def request(self, model: str, status: int, seconds: float, route: str = NO_LABEL, role: str = NO_LABEL) -> None:
        """`route`: the routed name the request asked for; `role`: the alias its variant serves as."""
        ...

    def tokens(self, model: str, outs: list[dict]) -> None: ...

    def feedback(self, answered: Answered, kind: str, verdict: str) -> None:
        """A feedback post on an answer of `answered.model` (under its route and role)."""
        ...


@dataclass
class Service:
    """What the app serves with (on `app.state.service`)."""

    cfg: ServeConfig
    tokenizer: Any  # counts prompt tokens, renders chat templates
    token: str | None  # the expected bearer token; None when auth is off
    backend: Backend
    metrics: Metrics
    published: Published | None = None  # registry models' routes (serve.registry_models)
    traffic: Traffic | None = None  # capture and feedback (serve.capture, serve.feedback)


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
                model, state = getattr(request.state, "model", "?"), request.state
                route, role = getattr(state, "route", NO_LABEL), getattr(state, "role", NO_LABEL)
                request.app.state.service.metrics.request(model, status, time.perf_counter() - t0, route, role)

            try:
                response = await handle(request)
            except Exception as e:
                record(api_error(e).status)
                raise  # the exception handlers answer
            if variant := getattr(request.state, "variant", None):
                response.headers["X-Oikyo-Model"] = variant
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
async def healthz(svc: ServiceDep) -> Response:
    """200 while a model replica answers and is not stalled, else 503 (for load balancers and
    probes: this proxy alone being up says nothing about the models)."""
    try:
        state = await asyncio.wait_for(svc.backend.health(), timeout=10)
    except Exception:  # noqa: BLE001 - no replica answered: not healthy, whatever the reason
        state = {"ok": False}
    ok = bool(state.get("ok"))
    return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)


@v1.get("/models")
async def models(svc: ServiceDep) -> dict:
    sc = svc.cfg
    served = set(sc.adapters) | set(sc.routes) | set(await asyncio.to_thread(list_root, sc.adapter_root))
    served |= set(sc.registry_models)
    names = [sc.base_model_name, *sorted(served)]
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
    await route(svc, req, request)
    check_request(svc.cfg, req)
    request.state.model = req.model
    cfg = svc.cfg
    prompts = completion_prompts(req)
    if not 1 <= len(prompts) * req.n <= cfg.max_prompts_per_request:
        raise InvalidRequest(f"prompt: between 1 and {cfg.max_prompts_per_request} prompts x n", param="prompt")
    if req.max_tokens == 0 and not req.echo:
        raise InvalidRequest("max_tokens: 0 only with echo (to score the prompt)", param="max_tokens")
    if req.stream and (req.echo or req.logprobs is not None):
        raise InvalidRequest("logprobs and echo are answered whole: use stream=false", param="stream")
    for p in prompts:
        if isinstance(p, list):
            check_prompt_ids(p, cfg.max_prompt_tokens, len(svc.tokenizer))
        else:
            check_prompt_size(len(p.encode("utf-8")), cfg.max_prompt_tokens, cfg.max_prompt_bytes_per_token)
    return await _answer(svc, req, prompts, request, chat=False)


@generation.post("/chat/completions")
async def chat_completions(
    req: Annotated[ChatRequest, Depends(body_of(ChatRequest))], request: Request, svc: ServiceDep
) -> Any:
    await route(svc, req, request)
    check_request(svc.cfg, req)
    request.state.model = req.model
    cfg = svc.cfg
    if req.max_tokens == 0:
        raise InvalidRequest("max_tokens: at least 1 (a chat answer has no prompt to score)", param="max_tokens")
    if len(req.messages) > cfg.max_messages_per_request:
        raise InvalidRequest(f"messages: more than {cfg.max_messages_per_request} messages", param="messages")
    if req.n > cfg.max_prompts_per_request:
        raise InvalidRequest(f"n: at most {cfg.max_prompts_per_request} choices", param="n")
    check_tool_choice(req)
    check_prompt_size(text_size(req), cfg.max_prompt_tokens, cfg.max_prompt_bytes_per_token)
    # the template renders off the event loop: a big conversation must not stall other requests
    prompt = await run_in_threadpool(chat_prompt, svc.tokenizer, req)
    prompt += _start(req)  # tool_choice required or named: the answer starts inside a call
    check_prompt_size(len(prompt.encode("utf-8")), cfg.max_prompt_tokens, cfg.max_prompt_bytes_per_token)
    return await _answer(svc, req, [prompt], request, chat=True)


async def route(svc: Service, req: GenerationRequest, request: Request) -> None:
    """A routed name (`serve.routes`, or a registry model: `published.py`) becomes the variant
    that answers: the request is served, answered and counted as that adapter's, under its route
    and role (the alias it serves as), and the X-Oikyo-Model header names it."""
    name = req.model
    weights, roles = svc.cfg.routes.get(name), {}
    if weights is None and svc.published is not None and (found := await svc.published.route(name)):
        weights, roles = found.weights, found.roles
    if weights is None:
        return
    user = req.user or request.headers.get("x-oikyo-user")
    req.model = request.state.variant = pick(name, weights, user)
    request.state.route, request.state.role = name, roles.get(req.model, NO_LABEL)


@v1.post("/feedback", status_code=202)
async def feedback(
    body: Annotated[FeedbackRequest, Depends(body_of(FeedbackRequest))], request: Request, svc: ServiceDep
) -> dict:
    """A rating, correction or comparison of a recent answer: stored beside the capture and
    counted for the answer's variant; 202 once queued (the write is asynchronous)."""
    traffic = svc.traffic
    if traffic is None or traffic.feedback is None or traffic.recent is None:
        raise NotFound("feedback is not enabled on this server (serve.feedback.enabled)")
    fb = svc.cfg.feedback
    if body.correction is not None and len(body.correction) > fb.max_correction_chars:
        raise InvalidRequest(f"correction: longer than {fb.max_correction_chars} characters", param="correction")
    answered = traffic.recent.get(body.id)
    if answered is None:
        raise NotFound(
            f"id: {body.id} is not a recent answer of this server (feedback names one of the last "
            f"{fb.recent_completions} completions, by the `id` of the response)",
            param="id",
        )
    if body.preferred_over is not None and traffic.recent.get(body.preferred_over) is None:
        missing = f"preferred_over: {body.preferred_over} is not a recent answer of this server"
        raise NotFound(missing, param="preferred_over")
    user = body.user or request.headers.get("x-oikyo-user")
    if not traffic.cap.allow(user or "-"):
        raise TooManyRequests(f"feedback: at most {fb.max_per_user_per_hour} posts per user an hour")
    if not traffic.feedback.offer(traffic.feedback_row(body, answered, user)):
        raise ServerBusy()  # the writer's queue is full: the client may retry
    svc.metrics.feedback(answered, body.kind(), body.verdict())
    return {"object": "feedback", "id": body.id, "model": answered.model, "accepted": True}


def check_request(cfg: ServeConfig, req: GenerationRequest) -> None:
    """The limits of this server (the body's own shape is checked by its pydantic model)."""
    if req.max_tokens > cfg.max_tokens_limit:
        raise InvalidRequest(f"max_tokens {req.max_tokens} > limit {cfg.max_tokens_limit}", param="max_tokens")
    stops = req.stops()
    if len(stops) > cfg.max_stop_sequences:
        raise InvalidRequest(f"stop: at most {cfg.max_stop_sequences} stop strings", param="stop")
    if any(not 1 <= len(s) <= cfg.max_stop_chars for s in stops):
        raise InvalidRequest(f"stop: each stop string must have 1 to {cfg.max_stop_chars} characters", param="stop")
    if req.stream and req.n > 1:
        raise InvalidRequest("n > 1 is answered whole: use stream=false", param="n")
    if req.model != cfg.base_model_name:
        validate_name(req.model)


def check_tool_choice(req: ChatRequest) -> None:
    choice = req.tool_choice
    if (choice == "required" or isinstance(choice, NamedToolChoice)) and not req.tools:
        raise InvalidRequest("tool_choice: needs tools", param="tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in req.tool_names():
        raise InvalidRequest(f"tool_choice: {choice.function.name!r} is not one of the tools", param="tool_choice")


def _start(req: GenerationRequest) -> str:
    """What the answer was started with (a tool-call prefix), to read its calls back whole."""
    if not isinstance(req, ChatRequest):
        return ""
    choice = req.tool_choice
    return tool_call_prefix(choice.as_dict() if isinstance(choice, NamedToolChoice) else choice)


async def _answer(svc: Service, req: GenerationRequest, prompts: list, request: Request, chat: bool) -> Any:
    counts = []
    for p in prompts:
        # tokenising runs off the event loop (bounded by check_prompt_size, but still CPU work);
        # concurrent calls share the fast tokenizer, safe as none changes its truncation or padding
        if isinstance(p, str):
            counts.append(await run_in_threadpool(check_prompt_length, svc.tokenizer, p, svc.cfg.max_prompt_tokens))
        else:
            counts.append(len(p))
    adapter = "" if req.model == svc.cfg.base_model_name else req.model
    if req.stream:
        if len(prompts) != 1:
            raise InvalidRequest("stream=true takes a single prompt")
        return await _stream(svc, req, adapter, prompts[0], counts[0], request, chat)
    # choices in OpenAI's order: every choice of the first prompt, then of the next; a timeout
    # cancels every one still running (wait_for cancels the gather)
    outs = await asyncio.wait_for(
        asyncio.gather(*[svc.backend.generate(adapter, p, req.sampling(j)) for p in prompts for j in range(req.n)]),
        timeout=svc.cfg.request_timeout_s,
    )
    for o in outs:
        raise_for_error(o)
    svc.metrics.tokens(req.model, outs)
    if not chat:
        answer = completion_response(req.model, outs)
    else:
        names = req.tool_names() if isinstance(req, ChatRequest) else set()
        answer = chat_response(req.model, outs, names, _start(req), svc.cfg.reasoning_parser == "think")
    texts = [o["text"] for o in outs]
    _keep(svc, req, request, answer["id"], prompts, texts, [o["finish_reason"] for o in outs], _token_counts(outs))
    return answer


def _token_counts(outs: list[dict]) -> dict:
    return {k: sum(o[k] for o in outs) for k in ("prompt_tokens", "completion_tokens")}


def _keep(
    svc: Service,
    req: GenerationRequest,
    request: Request,
    rid: str,
    prompts: list,
    texts: list[str],
    finishes: list[str],
    counts: dict,
) -> None:
    """Hand an answer that went out to the traffic recorder; a failure there is logged, never
    the request's (the answer is already made)."""
    if svc.traffic is None:
        return
    state = request.state
    info = Answered(req.model, getattr(state, "route", NO_LABEL), getattr(state, "role", NO_LABEL), time.time())

    def row() -> dict:
        if isinstance(req, ChatRequest):
            prompt = json.dumps([m.model_dump(exclude_none=True) for m in req.messages], ensure_ascii=False)
        else:
            prompt = prompts[0] if len(prompts) == 1 and isinstance(prompts[0], str) else json.dumps(prompts)
        return {
            "endpoint": "chat" if isinstance(req, ChatRequest) else "completions",
            "prompt": prompt,
            "completion": texts[0] if len(texts) == 1 else json.dumps(texts, ensure_ascii=False),
            "finish_reason": finishes[0] if len(finishes) == 1 else json.dumps(finishes),
            **counts,
            "params": {k: v for k, v in req.sampling().items() if v is not None and k != "seed"},
            "user": req.user or request.headers.get("x-oikyo-user"),
        }

    try:
        svc.traffic.answered(rid, info, row)
    except Exception:  # noqa: BLE001 - capture must never fail an answer that is made
        log.exception("traffic: recording answer %s failed", rid)


async def _stream(
    svc: Service, req: GenerationRequest, adapter: str, prompt, prompt_tokens: int, request: Request, chat: bool
) -> StreamingResponse:
    pieces = svc.backend.stream(adapter, prompt, req.sampling()).__aiter__()
    # wait for the first piece: an unknown adapter or a full queue answers as JSON, not as SSE
    first = await anext(pieces, None)
    if isinstance(first, dict) and "error" in first:
        raise APIError.from_dict(first)
    events = _events(svc, req, first, pieces, chat, prompt_tokens, request, prompt)
    return StreamingResponse(events, media_type="text/event-stream")


async def _events(
    svc: Service,
    req: GenerationRequest,
    first,
    rest: AsyncIterator,
    chat: bool,
    prompt_tokens: int,
    request: Request,
    prompt,
) -> AsyncIterator[str]:
    """The stream's events: text (chat: content and tool-call deltas), then the finish reason, the
    usage when asked for, [DONE]. A generation error midway ends it with an error event."""
    model, rid = req.model, new_id("chatcmpl" if chat else "cmpl")
    names = req.tool_names() if isinstance(req, ChatRequest) else set()
    calls = ToolCallStream(names, _start(req)) if names else None
    # a trace opening the answer streams as reasoning_content (not in an answer started inside a call)
    traces = ReasoningStream() if chat and svc.cfg.reasoning_parser == "think" and not _start(req) else None
    sent_calls, text, final = 0, "", {}

    def chunks(piece: str, end: bool = False) -> list[str]:
        nonlocal sent_calls
        if not chat:
            return [sse(completion_chunk(rid, model, piece))] if piece else []
        trace, piece = (traces.finish() if end else traces.feed(piece)) if traces else ("", piece)
        out = [sse(chat_chunk(rid, model, {"reasoning_content": trace}))] if trace else []
        if calls:
            content, found = calls.feed(piece)
            if end:
                rest, more = calls.finish()
                content, found = content + rest, found + more
        else:
            content, found = piece, []
        if content:
            out.append(sse(chat_chunk(rid, model, {"content": content})))
        for call in found:
            out.append(sse(chat_chunk(rid, model, {"tool_calls": [{"index": sent_calls, **call}]})))
            sent_calls += 1
        return out

    if chat:
        yield sse(chat_chunk(rid, model, {"role": "assistant", "content": ""}))
    pending = [first] if first is not None else []
    async for piece in _chain(pending, rest):
        if isinstance(piece, dict):
            if "error" in piece:  # the engine failed midway: say so, and end the stream
                err = piece["error"]
                yield sse(error_body(err["message"], err["type"]))
                yield "data: [DONE]\n\n"
                return
            final = piece  # the engine's last word: finish reason and token count
            continue
        text += piece
        for event in chunks(piece):
            yield event
    for event in chunks("", end=True):
        yield event
    completion_tokens = final.get("completion_tokens")
    if completion_tokens is None:
        completion_tokens = await run_in_threadpool(_count_tokens, svc.tokenizer, text)
    finish = "tool_calls" if sent_calls else final.get("finish_reason", "stop")
    make = chat_chunk if chat else completion_chunk
    yield sse(make(rid, model, {} if chat else None, finish=finish))  # type: ignore[arg-type]
    counts = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    if req.include_usage():
        yield sse(usage_chunk(rid, model, chat, counts))
    yield "data: [DONE]\n\n"
    svc.metrics.tokens(model, [counts])
    _keep(svc, req, request, rid, [prompt], [text], [finish], counts)


async def _chain(first: list, rest: AsyncIterator) -> AsyncIterator:
    for item in first:
        yield item
    async for item in rest:
        yield item


def _count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


def create_app(svc: Service) -> FastAPI:
    app = FastAPI(title="oikyo", docs_url=None, redoc_url=None)
    app.state.service = svc
    install_error_handlers(app)
    for router in (public, v1, generation):
        app.include_router(router)
    return app
