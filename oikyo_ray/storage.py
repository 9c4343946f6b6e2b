"""Local dirs and s3:// URIs through pyarrow filesystems (S3 endpoint from AWS_ENDPOINT_URL)."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI."""
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
        kwargs = {}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs = {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), uri[len("s3://") :]
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def download_dir(uri: str, dest: Path) -> Path:
    """Copy a remote directory to ``dest`` once (skipped when already there)."""
    if (dest / ".complete").exists():
        return dest
    fs, path = filesystem(uri)
    dest.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    (dest / ".complete").touch()
    return dest
