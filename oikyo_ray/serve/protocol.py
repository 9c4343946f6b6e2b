"""OpenAI-compatible request and response shapes (the subset oikyo honours)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator

from oikyo_ray.data.formats import tool_name
from oikyo_ray.model.reasoning import split as split_reasoning
from oikyo_ray.serve.tool_calls import split as split_tool_calls

# Sampling divides the logits by the temperature (in float32): a temperature near 0 multiplies
# them towards inf (inf - inf is NaN in softmax), so below MIN_TEMPERATURE only 0 (greedy) is
# accepted; above 2 (OpenAI's own ceiling) the distribution is already close to uniform.
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 2.0
MAX_SEED = 2**63 - 1  # a signed 64-bit seed, as OpenAI documents it and torch.manual_seed takes
MAX_N = 8  # choices per prompt
MAX_LOGPROBS = 5  # completions' top-k (OpenAI's own limit); chat's top_logprobs goes to 20
MAX_TOP_LOGPROBS = 20


def _listed(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


def _prompts(v: Any) -> Any:
    """OpenAI's prompt forms: a string, strings, token ids, or lists of token ids."""
    if isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(t, int) for t in v)):
        return [v]
    return v


# a string or a list of strings, held as a list: an error then names `stop.1`, not pydantic's
# union member (`stop.list[str].1`)
OneOrMany = Annotated[list[str], BeforeValidator(_listed)]
Prompts = Annotated[list[str | list[Annotated[int, Field(ge=0, lt=2**31)]]], BeforeValidator(_prompts)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """What both generation endpoints take: the model (adapter) and the decoding settings. Every
    number is bounded here, before the engine sees it (the server's own caps are `ServeConfig`'s,
    checked in `app.check_request`)."""

    # clients send fields we do not use (logprobs, user, ...): accept and ignore them;
    # allow_inf_nan=False: a float field refuses inf and NaN by name
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: str = Field(max_length=256)
    max_tokens: int = Field(16, ge=0)  # 0 only with completions' echo: score the prompt
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: OneOrMany | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    user: str | None = Field(None, max_length=256)  # OpenAI's end-user id: keeps a user on one variant
    # OpenAI's ranges and meaning (`eval.generate.OpenAIPenalties`)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)

    @field_validator("temperature")
    @classmethod
    def _greedy_or_finite_sampling(cls, v: float) -> float:
        if 0 < v < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return v

    @field_validator("n", mode="before")
    @classmethod
    def _n(cls, v: Any) -> Any:
        return 1 if v is None else v

    def stops(self) -> list[str]:
        return list(self.stop or [])

    def top_logprobs_k(self) -> int | None:
        """How many alternatives per token to return logprobs for; None: no logprobs."""
        return None

    def sampling(self, choice: int = 0) -> dict:
        """The engine's decoding settings for this request's `choice`-th choice (with a seed, each
        choice samples with its own, so n choices differ and repeat exactly)."""
        out: dict = {
            "max_new_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": None if self.seed is None else (self.seed + choice) % (MAX_SEED + 1),
            "stop": self.stops(),
        }
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):  # only when set: requests without them batch together
                out[name] = getattr(self, name)
        if self.top_logprobs_k() is not None:
            out["logprobs"] = self.top_logprobs_k()
        return out

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(GenerationRequest):
    prompt: Prompts
    best_of: int | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("only best_of=1 is supported (no server-side candidates)")
        return v

    def top_logprobs_k(self) -> int | None:
        return self.logprobs

    def sampling(self, choice: int = 0) -> dict:
        out = super().sampling(choice)
        if self.echo:
            out["echo"] = True
        return out


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"] = "function"
    function: NamedFunction

    def as_dict(self) -> dict:
        return {"type": "function", "function": {"name": self.function.name}}


class ChatMessage(BaseModel):
    """One OpenAI chat message: `content` is text or typed parts; an assistant message may carry
    `tool_calls` instead, and a `tool` message answers one (its `tool_call_id` is accepted; the
    template pairs results with calls by order). The parts and calls are checked where training
    reads the same shapes, `data/formats.py` (see `serve/prompts.py`), so they stay loose here."""

    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None  # function schemas, shown to the model by the template
    # "auto" (default with tools), "none" (tools not offered), "required", or one named function:
    # the last two start the answer inside a call (`tool_calls.prefix`)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true (as OpenAI's API requires)")
        return v

    def top_logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def tool_names(self) -> set[str]:
        """Names of the offered tools whose calls are read back (none for tool_choice "none")."""
        if not self.tools or self.tool_choice == "none":
            return set()
        return {n for t in self.tools if (n := tool_name(t))}


def usage(outs: list[dict]) -> dict:
    p = sum(o["prompt_tokens"] for o in outs)
    c = sum(o["completion_tokens"] for o in outs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_response(model: str, outs: list[dict]) -> dict:
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "usage": usage(outs),
        "choices": [
            {"index": i, "text": o["text"], "finish_reason": o["finish_reason"], "logprobs": o.get("logprobs")}
            for i, o in enumerate(outs)
        ],
    }


def chat_logprobs(lp: dict | None) -> dict | None:
    """Completions-shaped logprobs (`serve/logprobs.py`) in chat's shape."""
    if lp is None:
        return None

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**entry(t, p), "top_logprobs": [entry(k, v) for k, v in (top or {}).items()]}
            for t, p, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])
        ]
    }


def chat_message(
    out: dict, names: frozenset[str] | set[str], start: str = "", reasoning: bool = False
) -> tuple[dict, str]:
    """(message, finish_reason) of one answer: with `reasoning`, a trace that opens it becomes
    `reasoning_content` (an answer started inside a tool call has none); then its tool calls are
    read back when tools were offered."""
    text, trace = out["text"], None
    if reasoning and not start:
        trace, text = split_reasoning(text)
    message: dict = {"role": "assistant", "content": text}
    if trace is not None:
        message["reasoning_content"] = trace
    if not names:
        return message, out["finish_reason"]
    content, calls = split_tool_calls(start + text, names)
    if not calls:
        return {**message, "content": text if not start else content}, out["finish_reason"]
    return {**message, "content": content, "tool_calls": calls}, "tool_calls"


def chat_response(
    model: str,
    outs: list[dict],
    names: frozenset[str] | set[str] = frozenset(),
    start: str = "",
    reasoning: bool = False,
) -> dict:
    choices = []
    for i, o in enumerate(outs):
        message, finish = chat_message(o, names, start, reasoning)
        choices.append(
            {"index": i, "message": message, "finish_reason": finish, "logprobs": chat_logprobs(o.get("logprobs"))}
        )
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "usage": usage(outs),
        "choices": choices,
    }


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def completion_chunk(rid: str, model: str, text: str | None, finish: str | None = None) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}],
    }


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None = None) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def usage_chunk(rid: str, model: str, chat: bool, counts: dict) -> dict:
    """The last chunk of a stream asked for `stream_options.include_usage`: no choices, the usage."""
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage([counts]),
    }


def sse(obj: dict) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(obj)}\n\n"
