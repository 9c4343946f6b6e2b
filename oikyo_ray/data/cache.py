"""The cache of prepared datasets, keyed by input hash (Ray-free).

An entry is a finished output directory stored under ``<model.cache_dir>/data/<key>``; parquet
shards are hard links shared by the entry and every output restored from it (never rewritten in
place), other files are copies. Entries appear atomically: a half-written one is never seen.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from oikyo_ray.config import OikyoConfig
from oikyo_ray.data.manifest import PACKED, SPLITS


def cache_dir(cfg: OikyoConfig) -> Path:
    return Path(cfg.model.cache_dir).expanduser() / "data"


def write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename: atomic, and never writes through a hard link into
    the cache."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _link_or_copy(src: str, dst: str) -> None:
    """Parquet shards are hard-linked; other files are copied."""
    Path(dst).unlink(missing_ok=True)
    if not src.endswith(".parquet"):
        shutil.copy2(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def store(out_dir: Path, entry: Path) -> None:
    """Copy a finished dataset into the cache as `entry`."""
    tmp = entry.parent / f".tmp-{entry.name}-{uuid.uuid4().hex[:8]}"
    entry.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(out_dir, tmp, copy_function=_link_or_copy)
    try:
        os.replace(tmp, entry)
    except OSError:  # another run stored the same key first
        shutil.rmtree(tmp, ignore_errors=True)


def restore(entry: Path, out_dir: Path) -> dict:
    """Put cache `entry` in place as `out_dir`; returns its manifest, marked as a cache hit."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in [*SPLITS, PACKED, "rejects.jsonl"]:
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        src = entry / name
        if src.is_dir():
            shutil.copytree(src, target, copy_function=_link_or_copy)
        elif src.is_file():
            _link_or_copy(str(src), str(target))
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["cache"].update({"hit": True, "dir": str(entry)})
    write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2))
    return manifest
