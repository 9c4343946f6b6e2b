"""Errors as OpenAI-shaped JSON answers, and the FastAPI exception handlers that write them
(Ray-free).

Every failure becomes an `APIError` (`api_error` is the one mapping): the handlers answer with it,
the metered routes count its status. A body never carries a path or an exception's own text:
adapter errors answer with their path-free `public` message, unexpected errors are logged with
their traceback and answered "internal error".
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from oikyo_ray.data.formats import RowError
from oikyo_ray.serve.adapters import AdapterError
from oikyo_ray.serve.protocol import error_body

log = logging.getLogger(__name__)

INTERNAL = "internal error; the server log has the details"


class APIError(Exception):
    """An answer other than 200: HTTP status, OpenAI error type, a message the client can act on."""

    def __init__(
        self, status: int, message: str, type_: str, headers: dict[str, str] | None = None, param: str | None = None
    ):
        super().__init__(message)
        self.status, self.type, self.headers, self.param = status, type_, headers or {}, param

    @classmethod
    def from_dict(cls, out: dict) -> APIError:
        """The error a replica's error dict carries (see `raise_for_error`)."""
        err = out["error"]
        return cls(err["status"], err["message"], err["type"])

    def response(self) -> JSONResponse:
        body = error_body(str(self), self.type, param=self.param)
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class InvalidRequest(APIError):
    """400; `param` names the offending field (OpenAI's `error.param`), e.g. `messages.0.role`."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(400, message, "invalid_request_error", param=param)


class Unauthorized(APIError):
    def __init__(self) -> None:
        super().__init__(401, "missing or invalid bearer token", "authentication_error", {"WWW-Authenticate": "Bearer"})


class NotFound(APIError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(404, message, "not_found_error", param=param)


class TooManyRequests(APIError):
    def __init__(self, message: str, retry_after_s: int = 60):
        super().__init__(429, message, "rate_limit_exceeded", {"Retry-After": str(retry_after_s)})


class ServerBusy(APIError):
    def __init__(self) -> None:
        super().__init__(
            503, "server busy: too many queued requests, retry shortly", "server_busy", {"Retry-After": "1"}
        )


def invalid_fields(errors: Sequence[Any]) -> InvalidRequest:
    """The first problem of a request body, naming its field (`messages.0.role: Field required`);
    `errors` as pydantic lists them (its message texts hold no input values)."""
    first = errors[0]
    if first["type"] == "json_invalid":
        return InvalidRequest("request body is not valid JSON")
    loc = [str(p) for p in first["loc"] if not _union_tag(p)]
    where = ".".join(loc[1:] if loc[:1] == ["body"] else loc)
    if not where:  # no body, or one that is not JSON (FastAPI parses only application/json)
        msg = f"the request body must be a JSON object sent as Content-Type: application/json ({first['msg']})"
        return InvalidRequest(msg)
    # our own validators' words, without pydantic's "Value error, " in front
    msg = str(first["ctx"]["error"]) if first["type"] == "value_error" and "ctx" in first else first["msg"]
    return InvalidRequest(f"{where}: {msg}", param=where)


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


def _union_tag(part: Any) -> bool:
    """pydantic names the union member in an error's location (`prompt.0.str`, `tool_choice.
    literal['none','auto']`, `NamedToolChoice`); a client knows fields, not our types."""
    if isinstance(part, int):
        return False
    return not re.fullmatch(r"[a-z_][a-z0-9_]*", part) or part in _TYPE_NAMES


def _adapter_error(e: AdapterError) -> APIError:
    return APIError(e.status, e.public, "model_not_found" if e.status == 404 else "invalid_request_error")


def adapter_error_dict(e: AdapterError) -> dict:
    """An adapter failure as data: a replica's exceptions reach the ingress wrapped with their
    traceback, so replicas return this instead (see `raise_for_error`)."""
    err = _adapter_error(e)
    return {"error": {"status": err.status, "message": str(err), "type": err.type}}


def internal_error_dict() -> dict:
    return {"error": {"status": 500, "message": INTERNAL, "type": "server_error"}}


def raise_for_error(out: dict) -> dict:
    """A replica's answer, or the APIError it carries."""
    if "error" in out:
        raise APIError.from_dict(out)
    return out


def api_error(e: Exception) -> APIError:
    """What a failure answers."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, RequestValidationError):
        return invalid_fields(e.errors())
    if isinstance(e, RowError):  # invalid chat messages: formats names the message and field
        return InvalidRequest(str(e))
    if isinstance(e, AdapterError):
        return _adapter_error(e)
    if isinstance(e, HTTPException):  # FastAPI's own: unknown path, wrong method
        return APIError(e.status_code, str(e.detail), "invalid_request_error", dict(e.headers or {}))
    if isinstance(e, asyncio.TimeoutError):
        return APIError(504, "request timed out", "timeout")
    return APIError(500, INTERNAL, "server_error")


async def answer_error(request: Request, e: Exception) -> JSONResponse:
    err = api_error(e)
    if err.status == 500 and not isinstance(e, APIError):
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
    return err.response()


def install_error_handlers(app: FastAPI) -> None:
    for kind in (
        APIError,
        RequestValidationError,
        RowError,
        AdapterError,
        HTTPException,
        asyncio.TimeoutError,
        Exception,
    ):
        app.add_exception_handler(kind, answer_error)
