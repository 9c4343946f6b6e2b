"""Request bodies read and parsed defensively, before any pydantic model or the engine sees them
(Ray-free).

    read_body(request, limit) -> bytes      # 413 past `limit` bytes
    parse_json(raw, content_type) -> Any    # 400 for anything that is not sane JSON

The generation routes take their body through these (a FastAPI dependency in `app.py`) instead of
FastAPI's own body parsing, which reads a body of any size and hands `json.loads` any nesting (a
deep body then fails with RecursionError, a 500).
"""

from __future__ import annotations

import json
import math
from email.message import Message
from typing import Any

from starlette.requests import ClientDisconnect, Request

from oikyo_ray.serve.http_errors import APIError, InvalidRequest

# JSON nesting allowed in a body: a chat request with tool schemas needs about ten levels. The
# bound keeps pydantic, the template and the error path far from the interpreter's recursion limit.
MAX_DEPTH = 64
# integers beyond 64 bits are refused wherever they appear: no field takes them, and Python would
# otherwise carry arbitrarily big ones into validation and error messages
MAX_INT = 2**64


class BodyTooLarge(APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than {limit} bytes", "invalid_request_error")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused as soon as it is known to be over `limit`: from Content-Length when
    the client sends one, else while the chunks arrive (a chunked body has no length up front)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or len(declared) > 20):
        raise InvalidRequest("invalid Content-Length header")
    if declared is not None and int(declared) > limit:
        raise BodyTooLarge(limit)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise InvalidRequest("the client closed the connection before sending the whole body") from None
    return b"".join(chunks)


def _is_json(content_type: str | None) -> bool:
    # as FastAPI decides: no Content-Type is taken as JSON, else application/json or */*+json
    if not content_type:
        return True
    m = Message()
    m["content-type"] = content_type
    subtype = m.get_content_subtype()
    return m.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def parse_json(raw: bytes, content_type: str | None) -> Any:
    if not _is_json(content_type):
        raise InvalidRequest("the request body must be a JSON object sent as Content-Type: application/json")
    if not raw.strip():
        raise InvalidRequest("the request body must be a JSON object; it is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("request body is not valid UTF-8") from None
    try:
        data = json.loads(text)
    except RecursionError:  # json.loads has no depth limit of its own, only the interpreter's
        raise InvalidRequest(f"request body is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, or an integer past Python's digit limit
        what = "not valid JSON" if isinstance(e, json.JSONDecodeError) else "holding a number too large"
        raise InvalidRequest(f"request body is {what}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    check_values(data)
    return data


def check_values(data: dict) -> None:
    """Refuse nesting past MAX_DEPTH, non-finite numbers (JSON has none, `json.loads` accepts NaN,
    Infinity and 1e999), integers past MAX_INT and strings with lone surrogates (which cannot be
    encoded for the tokenizer), naming where. Iterative, so depth itself cannot exhaust the stack."""
    stack: list[tuple[dict | list, tuple, int]] = [(data, (), 1)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidRequest(f"request body is nested deeper than {MAX_DEPTH} levels")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, v in items:
            if isinstance(key, str):
                _check_str(key, path)
            if isinstance(v, (dict, list)):
                stack.append((v, (*path, key), depth + 1))
            elif isinstance(v, str):
                _check_str(v, (*path, key))
            elif isinstance(v, float) and not math.isfinite(v):
                raise _bad((*path, key), "number is not finite")
            elif isinstance(v, int) and abs(v) > MAX_INT:
                raise _bad((*path, key), "integer is too large")


def _check_str(s: str, path: tuple) -> None:
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise _bad(path, "string holds an unpaired surrogate") from None


def _bad(path: tuple, problem: str) -> InvalidRequest:
    where = ".".join(str(p) for p in path)
    return InvalidRequest(f"{where}: {problem}" if where else problem, param=where or None)
