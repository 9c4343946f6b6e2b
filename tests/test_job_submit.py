"""`ray job submit` of jobs/finetune.py against the session's real `ray start --head` node."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import kill_processes

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = Path(__file__).resolve().parent.parent


def _auth_headers() -> dict:
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def worker_node(ray_session):
    """A second Ray node (1 CPU) joined to the session's head; only its processes are stopped after.

    It gets a temp dir of its own, as a second machine has its own disk. Sharing the head's, both
    nodes' runtime-env agents own one `runtime_resources/working_dir_files`: when a task first lands
    on this node, its agent re-unpacks the job's working_dir there (rmtree, then unzip), deleting
    the directory the job driver on the head runs in, and the driver's next `os.getcwd()` (torch
    calls it on first import of torch._dynamo, during eval) fails with ENOENT."""
    import psutil

    env = dict(os.environ, RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    # short and under /tmp: Ray's unix socket paths under it must stay below 108 bytes
    temp_dir = tempfile.mkdtemp(prefix="oikyo-ray-node2-", dir="/tmp")
    before = {p.pid for p in psutil.process_iter()}
    subprocess.run(
        [
            "ray",
            "start",
            f"--address={ray_session['address']}",
            "--num-cpus=1",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=180,
    )
    new = [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.pid not in before and "ray" in " ".join(p.info["cmdline"] or [])
    ]
    yield
    kill_processes(new)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_submit_finetune(ray_session, worker_node, cache_dir, tmp_path):
    import boto3

    from oikyo_ray.demo.tasks import ASSET
    from tests.conftest import S3_SECRET

    env = dict(os.environ, RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    root = tmp_path / "runs"
    s3 = boto3.client("s3", endpoint_url=ray_session["s3"])
    s3.create_bucket(Bucket="jobdata")
    s3.upload_file(str(ASSET), "jobdata", "tasks/demo.jsonl")  # the job reads its data from s3://
    # its licence from a sidecar beside it on s3 (an unknown licence would print a warning)
    s3.put_object(Bucket="jobdata", Key="tasks/demo.jsonl.license", Body=b"apache-2.0\n")
    cmd = [
        "ray",
        "job",
        "submit",
        "--address",
        ray_session["dashboard"],
        "--working-dir",
        str(ROOT),
        "--submission-id",
        "oikyo-test-job",
        "--",
        "python",
        "jobs/finetune.py",
        "--config",
        "jobs/configs/demo.yaml",
        f"run.root={root}",
        "run.name=job1",
        f"model.cache_dir={cache_dir}",
        "data.paths=[s3://jobdata/tasks/demo.jsonl]",
        "train.epochs=1",
        "eval.max_samples=8",
        "eval.forgetting=false",  # the job path is under test here; eval's parts are in test_eval_run
        "eval.probes=false",
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "succeeded" in out.lower() and "[oikyo] train (Ray Train) done" in out, out[-3000:]

    status = subprocess.run(
        ["ray", "job", "status", "--address", ray_session["dashboard"], "oikyo-test-job"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "succeeded" in (status.stdout + status.stderr).lower()
    logs = subprocess.run(
        ["ray", "job", "logs", "--address", ray_session["dashboard"], "oikyo-test-job"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "run directory:" in logs and "job1" in logs
    # what the user reads: oikyo's own lines and a training bar, no third-party warnings
    assert re.search(r"train: 100%\|[^|]*\| (\d+)/\1 .*loss=", logs), logs[-3000:]
    warned = [line for line in logs.splitlines() if re.search(r"warn|deprecat", line, re.I)]
    assert warned == [], "\n".join(warned)

    # the dashboard's job API on 127.0.0.1 needs the token: 401 without, the job with it
    assert httpx.get(f"{ray_session['dashboard']}/api/jobs/", timeout=30).status_code == 401
    jobs = httpx.get(f"{ray_session['dashboard']}/api/jobs/", headers=_auth_headers(), timeout=30).json()
    job = next(j for j in jobs if j["submission_id"] == "oikyo-test-job")
    assert job["status"] == "SUCCEEDED"

    run = root / "job1"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "eval" / "report.json").read_text())["tuned"]["n"] == 8
    licenses = json.loads((run / "lineage.json").read_text())["licenses"]["data"]
    assert licenses == {
        "s3://jobdata/tasks/demo.jsonl": {"license": "apache-2.0", "from": "s3://jobdata/tasks/demo.jsonl.license"}
    }
    nodes = httpx.get(f"{ray_session['dashboard']}/nodes?view=summary", headers=_auth_headers(), timeout=30).json()
    alive = [n for n in nodes["data"]["summary"] if n["raylet"]["state"] == "ALIVE"]
    assert len(alive) >= 2  # head + worker node

    # secrets travel by reference only: the S3 key is in no run file and no job metadata
    assert S3_SECRET not in json.dumps(job)
    for f in run.rglob("*"):
        if f.is_file():
            assert S3_SECRET.encode() not in f.read_bytes(), f
    assert json.loads((run / "data/manifest.json").read_text())["counts"]["read"] == 384

    listed = subprocess.run(
        [sys.executable, "-m", "oikyo_ray.cli", "runs", "list", "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0 and "job1" in listed.stdout
