"""Bearer-token auth: the token comes from an env var or a file, never from the config file."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from oikyo_ray.config import ServeConfig
from oikyo_ray.errors import ConfigError


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


def authorized(expected: str | None, header: str | None) -> bool:
    if expected is None:
        return True
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].strip().encode(), expected.encode())
