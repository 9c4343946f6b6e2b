"""The code style CI holds the tree to: ruff (lint and format, config in pyproject.toml) and
mypy over the Ray-free core. The import contract is checked in test_core.py."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "cmd",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_tree_is_clean(cmd):
    r = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"`{' '.join(cmd)}` failed (run it to see and fix):\n{r.stdout}\n{r.stderr}"


def test_no_merge_conflict_markers():
    """A merge left half-resolved (Markdown and YAML pass every other check with its markers in)."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    marked = []
    for name in files:
        path = ROOT / name
        if (
            path.suffix not in {".py", ".md", ".yaml", ".yml", ".toml", ".json", ".txt", ".cfg", ""}
            or not path.is_file()
        ):
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if line.startswith(("<<<<<<< ", ">>>>>>> ")):
                marked.append(f"{name}:{n}")
    assert not marked, marked
