"""Where a run's checkpoints are persisted (Ray-free): a local folder or an s3:// prefix.

checkpoint_storage(cfg, run_dir) -> (path, pyarrow filesystem or None)
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs

from oikyo_ray.config import OikyoConfig
from oikyo_ray.storage import filesystem


def _s3_from_env():
    """An S3 filesystem with the keys and endpoint of this (the driver's) environment, or None when
    it has no keys. Workers do not share the driver's environment: the filesystem object carries them."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not (key and secret):
        return None
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    kw = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kw = {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
    return pafs.S3FileSystem(
        access_key=key,
        secret_key=secret,
        session_token=os.environ.get("AWS_SESSION_TOKEN"),
        region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        **kw,
    )


def checkpoint_storage(cfg: OikyoConfig, run_dir: Path) -> tuple[str, pafs.FileSystem | None]:
    """The folder that holds the run's `checkpoints/` (the run directory, or <checkpoint.storage_path>/<run
    name>) and the filesystem for it (None: local)."""
    uri = cfg.checkpoint.storage_path
    if not uri:
        return str(run_dir.resolve()), None
    if not uri.startswith("s3://"):
        return str(Path(uri).expanduser().resolve() / run_dir.name), None
    fs, path = filesystem(uri)
    env_fs = _s3_from_env()
    return f"{path.rstrip('/')}/{run_dir.name}", env_fs if env_fs is not None else fs
