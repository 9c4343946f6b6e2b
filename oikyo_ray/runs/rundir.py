"""Create and describe run directories (Ray-free).

    runs/<run-id>/config.yaml lineage.json data/ metrics.jsonl checkpoints/ adapter/ eval/
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

from oikyo_ray.config import OikyoConfig, dump_yaml
from oikyo_ray.errors import OikyoError

PACKAGES = ["oikyo-ray", "ray", "torch", "transformers", "peft", "datasets", "pyarrow", "deepspeed"]


def package_versions() -> dict[str, str | None]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def _git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                           cwd=Path(__file__).resolve().parent)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def create_run_dir(cfg: OikyoConfig) -> Path:
    """A new, empty run directory under run.root; refuses to reuse a name."""
    root = Path(cfg.run.root).expanduser().resolve()
    name = cfg.run.name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.config_hash()[:6]}"
    run_dir = root / name
    if run_dir.exists():
        raise OikyoError(f"run directory already exists: {run_dir}", hint="choose another run.name")
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    return run_dir


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
    """One summary per run under root, newest first."""
    out = []
    for d in sorted(Path(root).expanduser().glob("*/config.yaml"), reverse=True):
        run = d.parent
        row = {"run": run.name, "path": str(run)}
        lin = run / "lineage.json"
        if lin.exists():
            info = json.loads(lin.read_text())
            row.update(base_model=info.get("base_model"), data=info.get("data_content_hash", "")[:12])
        rep = run / "eval" / "report.json"
        if rep.exists():
            r = json.loads(rep.read_text())
            row.update(base_em=r["base"]["exact_match"], tuned_em=r["tuned"]["exact_match"],
                       tuned_loss=r["tuned"]["loss"])
        out.append(row)
    return out
