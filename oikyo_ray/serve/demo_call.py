"""The demo's HTTP call (Ray-free): a throwaway token, one chat request to a running server.
`ray_serve.serve_and_ask` starts the server around it."""

from __future__ import annotations

import json
import os
import secrets
import urllib.request
from pathlib import Path

from oikyo_ray.config import OikyoConfig


def ephemeral_token(cfg: OikyoConfig) -> Path:
    """A random token in a 0600 file under the cache dir: never in the config or the run dir."""
    p = Path(cfg.model.cache_dir).expanduser() / "serve-token"
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32))
    return p


def post_json(url: str, body: dict, token: str | None, timeout: float = 60) -> dict:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def ask(url: str, model: str, question: str, token: str | None) -> dict:
    """One short greedy chat completion from `model` (an adapter name or the base)."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 16, "temperature": 0}
    return post_json(f"{url}/v1/chat/completions", body, token)
