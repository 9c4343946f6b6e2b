"""OpenAI-compatible request and response shapes (the subset oikyo honours)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

# Sampling divides the logits by the temperature (in float32): a temperature near 0 multiplies
# them towards inf (inf - inf is NaN in softmax), so below MIN_TEMPERATURE only 0 (greedy) is
# accepted; above 2 (OpenAI's own ceiling) the distribution is already close to uniform.
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 2.0
MAX_SEED = 2**63 - 1  # a signed 64-bit seed, as OpenAI documents it and torch.manual_seed takes


def _listed(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


# a string or a list of strings, held as a list: an error then names `stop.1`, not pydantic's
# union member (`stop.list[str].1`)
OneOrMany = Annotated[list[str], BeforeValidator(_listed)]


class GenerationRequest(BaseModel):
    """What both generation endpoints take: the model (adapter) and the decoding settings. Every
    number is bounded here, before the engine sees it (the server's own caps are `ServeConfig`'s,
    checked in `app.check_request`)."""

    # clients send fields we do not use (logprobs, user, ...): accept and ignore them;
    # allow_inf_nan=False: a float field refuses inf and NaN by name
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: str = Field(max_length=256)
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: OneOrMany | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    n: int | None = 1
    # OpenAI's ranges; checked so a client learns of a bad value, but the engine does not apply them
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)

    @field_validator("temperature")
    @classmethod
    def _greedy_or_finite_sampling(cls, v: float) -> float:
        if 0 < v < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return v

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("only n=1 is supported (one choice per prompt)")
        return v

    def stops(self) -> list[str]:
        return list(self.stop or [])

    def sampling(self) -> dict:
        """The engine's decoding settings for this request."""
        return {
            "max_new_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self.stops(),
        }


class CompletionRequest(GenerationRequest):
    prompt: OneOrMany
    best_of: int | None = None

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("only best_of=1 is supported (no server-side candidates)")
        return v


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
    # accepted for compatibility; not enforced: the template offers every tool and the model decides
    tool_choice: str | dict[str, Any] | None = None


def _usage(outs: list[dict]) -> dict:
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
        "usage": _usage(outs),
        "choices": [
            {"index": i, "text": o["text"], "finish_reason": o["finish_reason"], "logprobs": None}
            for i, o in enumerate(outs)
        ],
    }


def chat_response(model: str, out: dict) -> dict:
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "usage": _usage([out]),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": out["text"]},
                "finish_reason": out["finish_reason"],
            }
        ],
    }


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def completion_chunk(rid: str, model: str, text: str | None, finish: str | None = None, role: bool = False) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}],
    }


def chat_chunk(rid: str, model: str, text: str | None, finish: str | None = None, role: bool = False) -> dict:
    delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def sse(obj: dict) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(obj)}\n\n"
