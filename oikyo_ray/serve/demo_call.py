"""Serve a fresh adapter, ask it one question over real HTTP, shut Serve down (used by the demo)."""

from __future__ import annotations

import json
import os
import secrets
import urllib.request
from pathlib import Path

from oikyo_ray.config import OikyoConfig


def _ephemeral_token(cfg: OikyoConfig) -> Path:
    """A random token in a 0600 file under the cache dir: never in the config or the run dir."""
    p = Path(cfg.model.cache_dir).expanduser() / "serve-token"
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32))
    return p


def post_json(url: str, body: dict, token: str | None, timeout: float = 60) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def serve_and_ask(cfg: OikyoConfig, model_path: str, adapter_dir: Path, log=print,
                  question: str = "What is the capital of Peru?") -> dict:
    from ray import serve

    from oikyo_ray.serve.app import start

    name = adapter_dir.parent.name  # the run name selects the adapter
    token_file = _ephemeral_token(cfg)
    scfg = cfg.model_copy(deep=True)
    scfg.serve.adapters = {name: str(adapter_dir)}
    scfg.serve.token_file = str(token_file)
    log(f"[oikyo] serve: base + adapter '{name}' on Ray Serve ...")
    try:
        url = start(scfg, model_path)
        body = {"model": name, "messages": [{"role": "user", "content": question}],
                "max_tokens": 16, "temperature": 0}
        answer = post_json(f"{url}/v1/chat/completions", body, token_file.read_text().strip())
        log(f"[oikyo] POST {url}/v1/chat/completions model={name!r}: {question!r} -> "
            f"{answer['choices'][0]['message']['content']!r}")
        return answer
    finally:
        serve.shutdown()
        token_file.unlink(missing_ok=True)
