"""HTTP error shapes of the Serve app (kept apart: Serve pickles the ingress class by value
when it is decorated, so helpers it calls must be importable, not defined after it)."""

import asyncio

from fastapi.responses import JSONResponse

from oikyo_ray.serve.protocol import error_body


class HTTPError(Exception):
    def __init__(self, status: int, message: str, type_: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.headers = status, type_, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(str(self), self.type), status_code=self.status, headers=self.headers)


def error_dict(e: Exception) -> dict:
    from oikyo_ray.errors import OikyoError
    from oikyo_ray.serve.adapters import AdapterNotFound

    # not found -> 404; any other refusal we raised (bad name, escape, pickled weights) -> 400
    status = 404 if isinstance(e, AdapterNotFound) else 400 if isinstance(e, OikyoError) else 500
    kind = {404: "model_not_found", 400: "invalid_request_error"}.get(status, "server_error")
    return {"error": {"status": status, "message": str(e).split("\n")[0], "type": kind}}


def exception_status(e: Exception) -> tuple[int, HTTPError]:
    from ray.serve.exceptions import BackPressureError

    if isinstance(e, BackPressureError):
        return 503, HTTPError(503, "server busy: too many queued requests, retry shortly", "server_busy",
                              {"Retry-After": "1"})
    if isinstance(e, asyncio.TimeoutError):
        return 504, HTTPError(504, "request timed out", "timeout")
    return 500, HTTPError(500, f"internal error: {type(e).__name__}", "server_error")
