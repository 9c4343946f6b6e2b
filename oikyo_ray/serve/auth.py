"""Bearer-token auth: the token comes from an env var or a file, never from the config file."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from fastapi.security import HTTPBearer

from oikyo_ray.config import ServeConfig
from oikyo_ray.errors import ConfigError

# `Authorization: <scheme> <token>` with the scheme matched case-insensitively (RFC 7235); no
# header or another scheme gives None (auto_error=False), so the app answers in OpenAI's shape
bearer = HTTPBearer(auto_error=False)


def load_token(cfg: ServeConfig) -> str | None:
    """The expected token, or None when auth is explicitly off (loopback only, checked by config)."""
    if not cfg.auth:
        return None
    token = os.environ.get(cfg.token_env, "").strip()
    if not token and cfg.token_file:
        p = Path(cfg.token_file).expanduser()
        if not p.is_file():
            raise ConfigError(f"serve.token_file: {p} does not exist")
        token = p.read_text(encoding="utf-8").strip()
    if not token:
        raise ConfigError(
            f"serve.auth is on but no token is set: export {cfg.token_env}=... or set serve.token_file",
            hint="for a loopback-only dev server you may set serve.auth=false",
        )
    return token


def authorized(expected: str | None, given: str | None) -> bool:
    """Does the bearer token `given` (None: none sent) match? Compared in constant time."""
    if expected is None:
        return True
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())
