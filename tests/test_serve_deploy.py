"""Every shipped Serve config deploys: `serve/oikyo.yaml` and the RayService's `serveConfigV2`
(k8s/rayservice.yaml, its image paths mapped to this checkout) go through the real `serve deploy`
CLI onto the session's Ray cluster and answer a chat request."""

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = Path(__file__).resolve().parents[1]
TOKEN = "deploy-test-token-0123456789"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rayservice_config() -> dict:
    docs = list(yaml.safe_load_all((ROOT / "k8s" / "rayservice.yaml").read_text()))
    service = next(d for d in docs if d and d.get("kind") == "RayService")
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def _local(doc: dict, cache_dir: Path, port: int) -> dict:
    """The config as shipped, with what only exists in the image or the pod mapped to here: the
    repo path, the shared cache, the bind address and port, CPUs this 2-core machine has, and the
    API token as the replicas' env (a pod gets it from a Secret)."""
    text = json.dumps(doc).replace("/app/", f"{ROOT}/").replace("/mnt/oikyo/cache", str(cache_dir))
    doc = json.loads(text)
    doc["http_options"] = {**doc.get("http_options", {}), "host": "127.0.0.1", "port": port}
    for app in doc["applications"]:
        args = app.setdefault("args", {})
        if not Path(args["config"]).is_absolute():
            args["config"] = str(ROOT / args["config"])
        args["overrides"] = [
            *(args.get("overrides") or []),
            f"model.cache_dir={cache_dir}",
            "serve.cpus_per_replica=0.5",
        ]
        app["runtime_env"] = {"env_vars": {"OIKYO_API_TOKEN": TOKEN}}
        for d in app.get("deployments", []):
            if d.get("ray_actor_options", {}).get("num_cpus"):
                d["ray_actor_options"]["num_cpus"] = 0.5
            if "autoscaling_config" in d:
                d["autoscaling_config"]["max_replicas"] = 1
    return doc


@pytest.mark.parametrize("source", ["serve/oikyo.yaml", "k8s/rayservice.yaml"])
def test_shipped_serve_config_deploys_and_answers(ray_session, tiny_model, cache_dir, tmp_path, source):
    from ray import serve

    serve.shutdown()  # another module's app may hold the proxy on another port
    port = _port()
    shipped = _rayservice_config() if source.startswith("k8s") else yaml.safe_load((ROOT / source).read_text())
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(_local(shipped, cache_dir, port)))
    env = dict(os.environ, RAY_AUTH_MODE="token")
    cli = ["serve", "deploy", str(config), "--address", ray_session["dashboard"]]
    r = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        deadline, last = time.time() + 240, None
        while time.time() < deadline:
            try:
                last = httpx.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    headers={"Authorization": f"Bearer {TOKEN}"},
                    json={
                        "model": "base",
                        "messages": [{"role": "user", "content": "Capital of Peru?"}],
                        "max_tokens": 4,
                    },
                    timeout=30,
                )
                if last.status_code == 200:
                    break
            except httpx.HTTPError as e:
                last = e
            time.sleep(2)
        assert isinstance(last, httpx.Response) and last.status_code == 200, last
        assert last.json()["choices"][0]["message"]["role"] == "assistant"
        status = subprocess.run(
            ["serve", "status", "--address", ray_session["dashboard"]],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "RUNNING" in status.stdout and "DEPLOY_FAILED" not in status.stdout, status.stdout
    finally:
        serve.shutdown()
