"""`data.paths` as concrete input files (Ray-free): globs, directories and s3:// prefixes expanded."""

from __future__ import annotations

import glob
from pathlib import Path

import pyarrow.fs as pafs

from oikyo_ray.config import DEMO_DATA
from oikyo_ray.demo.tasks import ASSET
from oikyo_ray.errors import DataError
from oikyo_ray.storage import filesystem

SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet", ".csv")


def expand_paths(paths: list[str]) -> dict[str, list[str]]:
    """Group concrete file paths by filesystem ('local' or 's3'); globs and dirs are expanded."""
    groups: dict[str, list[str]] = {"local": [], "s3": []}
    for p in paths:
        if p == DEMO_DATA:
            groups["local"].append(str(ASSET))
        elif p.startswith("s3://"):
            groups["s3"] += _s3_files(p)
        else:
            groups["local"] += _local_files(p)
    return {k: v for k, v in groups.items() if v}


def _s3_files(uri: str) -> list[str]:
    fs, key = filesystem(uri)
    info = fs.get_file_info(key)
    if info.type == pafs.FileType.Directory:
        files = fs.get_file_info(pafs.FileSelector(key, recursive=True))
        return sorted(f.path for f in files if f.type == pafs.FileType.File and f.path.lower().endswith(SUFFIXES))
    if info.type == pafs.FileType.File:
        return [key]
    raise DataError(f"data file not found: {uri}", hint="check data.paths and AWS_ENDPOINT_URL")


def _local_files(path: str) -> list[str]:
    local = Path(path).expanduser()
    if local.is_dir():  # a directory contributes its data files (a README is no row)
        found = sorted(str(f) for f in local.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
    else:
        found = sorted(glob.glob(str(local)))
    if not found:
        raise DataError(
            f"data file not found: {path}",
            hint=f"check data.paths (globs allowed; a directory contributes its {', '.join(SUFFIXES)} files)",
        )
    return [str(Path(f).resolve()) for f in found]
