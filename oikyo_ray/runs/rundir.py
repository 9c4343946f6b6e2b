"""Create and describe run directories (Ray-free).

    runs/<run-id>/config.yaml lineage.json data/ metrics.jsonl checkpoints/ adapter/ eval/

With an s3:// run.root the directory is staged locally and published after each stage (store.py).
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from oikyo_ray.config import OikyoConfig, dump_yaml
from oikyo_ray.errors import OikyoError
from oikyo_ray.runs import store

PACKAGES = ["oikyo-ray", "ray", "torch", "transformers", "peft", "datasets", "pyarrow", "deepspeed"]


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def _git_commit() -> str | None:
    try:
        r = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def local_dir(cfg: OikyoConfig, name: str) -> Path:
    """Where run `name` is written on this machine: under run.root, or its staging dir for s3."""
    if store.is_remote(cfg.run.root):
        return store.staging_dir(cfg.model.cache_dir, name)
    return Path(cfg.run.root).expanduser().resolve() / name


def run_exists(cfg: OikyoConfig, name: str) -> bool:
    return store.exists(store.join(cfg.run.root, name))


def create_run_dir(cfg: OikyoConfig, name: str | None = None) -> Path:
    """A new, empty run directory (local, or staging for s3); refuses to reuse a name. An s3 run
    is published at once, so its name is taken and a crash before the first stage still shows."""
    name = name or cfg.run.name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.config_hash()[:6]}"
    where, run_dir = store.join(cfg.run.root, name), local_dir(cfg, name)
    if run_exists(cfg, name):
        raise OikyoError(f"run directory already exists: {where}", hint="choose another run.name")
    if store.is_remote(cfg.run.root) and run_dir.exists():
        shutil.rmtree(run_dir)  # staged by a run whose upload failed
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    publish(cfg, run_dir)
    return run_dir


def existing_run_dir(cfg: OikyoConfig, name: str) -> Path:
    """Run `name` of run.root on this machine, to continue it: an s3 run not staged here is downloaded."""
    run_dir = local_dir(cfg, name)
    if store.is_remote(cfg.run.root) and not (run_dir / "config.yaml").is_file():
        store.download(store.join(cfg.run.root, name), run_dir)
        if not (run_dir / "config.yaml").is_file():  # no such run: leave no empty staging dir
            shutil.rmtree(run_dir)
    return run_dir


def publish(cfg: OikyoConfig, run_dir: Path) -> None:
    """Upload a staged run to <run.root>/<name> (what changed since the last time); no-op locally."""
    if store.is_remote(cfg.run.root):
        store.upload(run_dir, store.join(cfg.run.root, run_dir.name))


@contextmanager
def publishing(cfg: OikyoConfig, run_dir: Path, log=print):
    """Yields publish(); publishes once more at the end, also when a stage fails or is interrupted
    (a failed run is recorded too; the stage's error wins over an upload error then)."""
    try:
        yield lambda: publish(cfg, run_dir)
    except BaseException:
        try:
            publish(cfg, run_dir)
        except Exception as e:
            log(f"[oikyo] could not upload the failed run {run_dir.name}: {e}")
        raise
    publish(cfg, run_dir)


def write_lineage(run_dir: Path, cfg: OikyoConfig, manifest: dict, model_path: str, **extra) -> dict:
    lineage = {
        "run": run_dir.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seed": cfg.train.seed,
        "config_hash": cfg.config_hash(),
        "data_content_hash": manifest["content_hash"],
        "data_counts": manifest["counts"],
        "base_model": cfg.model.name_or_path,
        "base_model_path": model_path,
        "code_commit": _git_commit(),
        "versions": package_versions(),
        "host": {"python": platform.python_version(), "platform": platform.platform()},
        **extra,
    }
    (run_dir / "lineage.json").write_text(json.dumps(lineage, indent=2))
    return lineage


def list_runs(root: str | Path) -> list[dict]:
    """One summary per run under root (a directory or s3:// prefix), newest first."""
    out = []
    for name in sorted(store.list_dirs(str(root)), reverse=True):
        run = store.join(root, name)
        if not store.exists(f"{run}/config.yaml"):
            continue
        row = {"run": name, "path": run}
        lin = store.read_text(f"{run}/lineage.json")
        if lin is not None:
            info = json.loads(lin)
            row.update(base_model=info.get("base_model"), data=info.get("data_content_hash", "")[:12])
        rep = store.read_text(f"{run}/eval/report.json")
        if rep is not None:
            r = json.loads(rep)
            row.update(
                base_em=r["base"]["exact_match"], tuned_em=r["tuned"]["exact_match"], tuned_loss=r["tuned"]["loss"]
            )
        out.append(row)
    return out
