"""Lint as a reviewer would: ruff (lint and format check) over the repo, mypy over the Ray-free
core (both configured in pyproject.toml); each failure prints what to fix."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_ruff_lint():
    r = _run("ruff", "check", "--no-cache", ".")
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]


def test_ruff_format():
    r = _run("ruff", "format", "--check", "--no-cache", ".")
    assert r.returncode == 0, "run `ruff format .`:\n" + r.stdout[-4000:] + r.stderr[-2000:]


def test_mypy_core():
    r = _run("mypy", "--no-incremental")
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
