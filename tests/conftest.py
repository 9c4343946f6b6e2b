"""Shared fixtures: one tiny model (built once per session), one local Ray cluster per session,
the read-only ../shared data (path from OIKYO_SHARED_DIR, set by .ci/run)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ["RAY_AUTH_MODE"] = "token"  # drivers joining the session's head need it before `import ray`

ROOT = Path(__file__).resolve().parent.parent
S3_SECRET = "oikyo-test-SECRET-7f3a91"  # a known string: tests assert it is written nowhere
WANDB_SECRET = "oikyo-wandb-SECRET-" + "0" * 21  # a fake W&B key (40 characters), written nowhere either
# Logical CPUs of the session head (the machine has 2 cores). Ray Data's internal tasks (file
# listing, block metadata) each want a whole CPU; Ray Train worker placement groups of trials
# that Tune stopped are released late. Two spare logical CPUs keep sweeps and Serve apps from
# starving on that bookkeeping; the real compute still runs on the 2 cores.
LOGICAL_CPUS = 4
# the demo config trained for a few steps on one worker and evaluated briefly: for tests of what
# runs around training (cross-validation, method comparison), not of training or eval themselves
SHORT_DEMO_RUN = [
    "scaling.num_workers=1",
    "train.max_steps=6",
    "train.eval_every=3",
    "eval.max_samples=8",
    "eval.forgetting=false",
    "eval.probes=false",
    "eval.backend=local",
    "eval.lm_eval_tasks=[]",  # the demo's lm-eval task: tested in test_eval_harness
    "eval.lm_eval_max_drop={}",
    "run.serve_after=false",
]


def os_tool(name: str) -> str:
    """The path of an OS package's program a test needs. Absent: the test skips saying what to
    install, except under .ci/run (OIKYO_CI=1), which installs it, so there its absence fails."""
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("OIKYO_CI") == "1":
        pytest.fail(
            f"{name} is missing although .ci/run installs it (apt-get install prometheus prometheus-alertmanager)"
        )
    pytest.skip(f"{name} is not installed: apt-get install prometheus prometheus-alertmanager")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared (datasets, KubeRay CRDs); skipped with a reason when not provided."""
    p = os.environ.get("OIKYO_SHARED_DIR")
    if not p or not Path(p).is_dir():
        pytest.skip("OIKYO_SHARED_DIR is not set to the shared/ folder (.ci/run sets it)")
    return Path(p)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Model cache shared by the whole session (the tiny model is built once)."""
    return tmp_path_factory.mktemp("oikyo-cache")


@pytest.fixture(scope="session")
def tiny_model(cache_dir) -> Path:
    from oikyo_ray.model.tiny import ensure_tiny_model

    return ensure_tiny_model(cache_dir)


def python_tool(module: str, extra: str) -> None:
    """A Python package a test needs: absent, the test skips saying what to install, except under
    .ci/run (OIKYO_CI=1), which installs the test extra, so there its absence fails."""
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        return
    if os.environ.get("OIKYO_CI") == "1":
        pytest.fail(f"{module} is missing although .ci/run installs it (pip install -e '.[{extra}]')")
    pytest.skip(f"{module} is not installed: pip install -e '.[{extra}]'")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (`pytest.mark.usefixtures`): on a shared 2-core box torch's
    default thread pool oversubscribes (10-50x slower)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fix_complete_multipart(app):
    """moto 5.2.1 answers CompleteMultipartUpload with the root tag ...Response instead of ...Result
    (getmoto/moto#10055): boto3 shrugs, pyarrow's S3 client (uploads, Ray Train) retries and fails."""

    def wrapped(environ, start_response):
        got = {}

        def capture(status, headers, exc_info=None):
            got.update(status=status, headers=headers)
            return lambda data: None

        body = b"".join(app(environ, capture))
        headers = got["headers"]
        if b"<CompleteMultipartUploadResponse" in body:  # (HEAD answers keep their Content-Length)
            body = body.replace(b"CompleteMultipartUploadResponse", b"CompleteMultipartUploadResult")
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers.append(("Content-Length", str(len(body))))
        start_response(got["status"], headers)
        return [body]

    return wrapped


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-speaking server (moto) on 127.0.0.1; its endpoint and fake keys are exported
    before the Ray head starts, so every Ray worker and replica reaches the same S3."""
    import threading

    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    server = make_server(
        "127.0.0.1", 0, fix_complete_multipart(DomainDispatcherApplication(create_backend_app)), threaded=True
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="oikyo-test-access",
        AWS_SECRET_ACCESS_KEY=S3_SECRET,
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    server.shutdown()
    thread.join(timeout=10)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (sqlite backend, proxied artifacts) on 127.0.0.1: its URI."""
    import httpx

    python_tool("mlflow", "test")
    d = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    cmd = ["mlflow", "server", "--backend-store-uri", f"sqlite:///{d}/mlflow.db", "--artifacts-destination"]
    cmd += [str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = open(d / "server.log", "wb")  # noqa: SIM115 (open for the server's whole life)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{uri}/health", timeout=2).status_code == 200:
                    break
            assert proc.poll() is None, (d / "server.log").read_text()
            time.sleep(0.5)
        else:
            raise AssertionError(f"mlflow server did not answer in 120 s:\n{(d / 'server.log').read_text()}")
        yield uri
    finally:
        import psutil

        with contextlib.suppress(psutil.Error):
            kill_processes([psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)])
        log.close()


def _stop_ray_head(temp_dir: str, address: str) -> None:
    """Stop only this session's Ray processes (not `ray stop`, which ends every cluster here)."""
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if temp_dir in cmd or address in cmd:
            procs += [p, *p.children(recursive=True)]
    kill_processes(procs)


def kill_processes(procs) -> None:
    """SIGKILL these psutil processes (gone ones are fine) and wait for them."""
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=30)


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray head (LOGICAL_CPUS, dashboard on 127.0.0.1) started with `ray start`, shared by
    every Ray test: drivers connect to it, and `ray job submit` reaches its Jobs API."""
    import ray

    gcs, dash, metrics = _free_port(), _free_port(), _free_port()
    temp_dir = f"/tmp/oikyo-ray-{os.getpid()}"  # own dir: other Ray clusters on this machine are left alone
    # processes report metrics every second, not every 10 s: the monitoring tests wait for them
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_metrics_report_interval_ms="1000")
    env.pop("RAY_ADDRESS", None)
    # `ray start` does not create a token (only ray.init does): make one on a fresh machine
    subprocess.run(["ray", "get-auth-token", "--generate"], check=True, env=env, capture_output=True, timeout=60)
    r = subprocess.run(
        [
            "ray",
            "start",
            "--head",
            f"--port={gcs}",
            f"--num-cpus={LOGICAL_CPUS}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--metrics-export-port={metrics}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, f"ray start failed:\n{r.stdout}\n{r.stderr}"
    address = f"127.0.0.1:{gcs}"
    from oikyo_ray.cluster import init_ray

    os.environ["RAY_ADDRESS"] = address
    init_ray()
    try:
        yield {
            "address": address,
            "dashboard": f"http://127.0.0.1:{dash}",
            "metrics": f"http://127.0.0.1:{metrics}/metrics",
            "s3": s3_server,
        }
    finally:
        ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
        _stop_ray_head(temp_dir, f":{gcs}")


@pytest.fixture
def base_overrides(cache_dir, tmp_path) -> list[str]:
    """Overrides every test run needs: the session cache and a private run root."""
    return [f"model.cache_dir={cache_dir}", f"run.root={tmp_path / 'runs'}"]
