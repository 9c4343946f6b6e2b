"""Checkpoints on s3:// (a local moto server) with a restart that resumes from S3, and training
that spans two Ray nodes (a second `ray start` node joined to the session's head)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from functools import partial

import pytest

try:  # tests/ may or may not be a package
    from tests.conftest import fix_complete_multipart
    from tests.test_train_util import fail_once_at, make_run, metrics
except ImportError:
    from conftest import fix_complete_multipart
    from test_train_util import fail_once_at, make_run, metrics

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server on 127.0.0.1 with bucket `ckpt`; AWS_* env points the driver at it."""
    boto3 = pytest.importorskip("boto3")
    import threading

    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    server = make_server(
        "127.0.0.1", 0, fix_complete_multipart(DomainDispatcherApplication(create_backend_app)), threaded=True
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    client.create_bucket(Bucket="ckpt")
    yield client
    server.shutdown()
    thread.join(timeout=10)


def test_checkpoints_on_s3_and_resume_from_them(ray_session, s3, tiny_model, cache_dir, tmp_path):
    from oikyo_ray.train.ray_train import fit

    cfg, run, man = make_run(
        tmp_path,
        tiny_model,
        cache_dir,
        [
            "scaling.num_workers=1",
            "train.batch_size=8",
            "train.max_steps=4",
            "train.checkpoint_every=2",
            "train.eval_every=100",
            "checkpoint.storage_path=s3://ckpt/oikyo",
            "scaling.max_failures=1",
        ],
    )
    final = fit(
        cfg,
        run,
        str(tiny_model),
        man,
        log=lambda s: None,
        step_hook=partial(fail_once_at, (3,), str(tmp_path / "failed")),
    )
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ckpt", Prefix="oikyo/r/checkpoints/")["Contents"]]
    ckpt_files = {k.rsplit("/", 1)[1] for k in keys if "/checkpoint_" in k}
    assert {"adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json"} <= ckpt_files, keys
    assert not (run / "checkpoints").exists()  # nothing local but the final adapter and logs
    assert (final / "adapter_model.safetensors").is_file()
    rows = metrics(run)
    assert [m["step"] for m in rows] == [1, 2, 3, 4] and rows[2]["resumed_from"] == 2  # restored from S3


def test_training_spans_two_nodes(ray_session, tiny_model, cache_dir, tmp_path):
    """A second node (1 CPU) joins the session's head; STRICT_SPREAD puts one worker on each."""
    import ray

    from oikyo_ray.train.ray_train import fit

    env = dict(os.environ, RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    node = subprocess.Popen(
        ["ray", "start", f"--address={ray_session['address']}", "--num-cpus=1", "--block", "--disable-usage-stats"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while len({n["NodeID"] for n in ray.nodes() if n["Alive"]} - before) < 1:
            assert time.time() < deadline and node.poll() is None, "the second node did not join"
            time.sleep(1)
        print(f"node joined after {time.time() - deadline + 120:.1f}s")
        cfg, run, man = make_run(
            tmp_path,
            tiny_model,
            cache_dir,
            [
                "scaling.num_workers=2",
                "scaling.placement_strategy=STRICT_SPREAD",
                "train.batch_size=8",
                "train.max_steps=4",
                "train.eval_every=2",
                "train.checkpoint_every=4",
            ],
        )
        final = fit(cfg, run, str(tiny_model), man, log=lambda s: None)
        rows = metrics(run)
        print(
            f"fit done after {time.time() - deadline + 120:.1f}s; first report {rows[0]['time'] - deadline + 120:.1f}s"
        )
        assert len(rows[0]["nodes"]) == 2, rows[0]  # the workers reported from two different nodes
        assert rows[-1]["step"] == 4 and (final / "adapter_model.safetensors").is_file()
    finally:
        os.killpg(node.pid, 15)  # ends only the node this test started (ray start --block and its children)
        node.wait(timeout=60)
