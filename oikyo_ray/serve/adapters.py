"""Where a named adapter lives: static paths or an adapter root (local or s3://), never outside it."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pyarrow.fs as pafs

from oikyo_ray.errors import OikyoError
from oikyo_ray.storage import download_dir, filesystem

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class AdapterError(OikyoError):
    """An adapter that cannot be served (HTTP 400). The message names paths, for the operator's
    log; `public` names only the adapter, for the API client."""

    status = 400

    def __init__(self, message: str, public: str | None = None):
        super().__init__(message)
        self.public = public or message


class AdapterNotFound(AdapterError):
    """No adapter of that name (HTTP 404)."""

    status = 404


class BadAdapterName(AdapterError):
    """The name is not a plain adapter name (HTTP 400): path tricks are refused."""


def check_adapter_dir(path: str | Path, name: str | None = None) -> Path:
    """An adapter dir must hold adapter_config.json and safetensors weights (never pickles)."""
    p = Path(path).expanduser().resolve()
    who = f"adapter {name!r}" if name else "the adapter"
    if not (p / "adapter_config.json").is_file():
        raise AdapterNotFound(
            f"{p} is not an adapter directory (no adapter_config.json)",
            f"{who} is not an adapter directory (no adapter_config.json)",
        )
    if not (p / "adapter_model.safetensors").is_file():
        raise AdapterError(
            f"{p} has no adapter_model.safetensors; only safetensors adapters are served",
            f"{who} has no adapter_model.safetensors; only safetensors adapters are served",
        )
    if (p / "adapter_model.bin").exists():
        raise AdapterError(
            f"{p} also holds a pickled adapter_model.bin; remove it (safetensors only)",
            f"{who} also holds a pickled adapter_model.bin; only safetensors adapters are served",
        )
    return p


def validate_name(name: str) -> str:
    if not NAME.match(name) or ".." in name:
        raise BadAdapterName(f"invalid adapter name {name!r}: letters, digits, '.', '_' and '-' only")
    return name


def resolve_adapter(name: str, static: dict[str, str], root: str | None, cache_dir: str) -> Path:
    """The local directory of adapter `name`; s3:// roots are copied into the cache first."""
    if name in static:
        return check_adapter_dir(static[name], name)
    validate_name(name)
    not_found = f"model {name!r} not found"
    if not root:
        raise AdapterNotFound(not_found)
    if root.startswith("s3://"):
        fs, key = filesystem(root.rstrip("/") + "/" + name)
        if fs.get_file_info(key + "/adapter_config.json").type != pafs.FileType.File:
            raise AdapterNotFound(f"{not_found} under {root}", not_found)
        return fetch_adapter(root.rstrip("/") + "/" + name, name, cache_dir)
    base = Path(root).expanduser().resolve()
    candidate = (base / name).resolve()  # follows symlinks: a link pointing out is caught below
    if base not in candidate.parents:
        raise BadAdapterName(
            f"adapter {name!r} resolves outside the adapter root {base} (to {candidate})",
            f"adapter {name!r} resolves outside the adapter root",
        )
    if not candidate.is_dir():
        raise AdapterNotFound(f"{not_found} under {root}", not_found)
    return check_adapter_dir(candidate, name)


def fetch_adapter(uri: str, name: str, cache_dir: str) -> Path:
    """The checked local directory of the adapter at `uri`; s3:// ones are copied into the cache
    first, under a digest of the URI (two roots may both hold an adapter of one name)."""
    if not uri.startswith("s3://"):
        return check_adapter_dir(uri, name)
    digest = hashlib.sha256(uri.rsplit("/", 1)[0].encode()).hexdigest()[:12]
    return check_adapter_dir(download_dir(uri, Path(cache_dir).expanduser() / "adapters" / digest / name), name)


def list_root(root: str | None) -> list[str]:
    """Adapter names available under the root (directories holding adapter_config.json)."""
    if not root:
        return []
    if root.startswith("s3://"):
        fs, key = filesystem(root)
        infos = fs.get_file_info(pafs.FileSelector(key, recursive=True, allow_not_found=True))
        return sorted({Path(i.path).parent.name for i in infos if i.path.endswith("/adapter_config.json")})
    base = Path(root).expanduser()
    return sorted(p.parent.name for p in base.glob("*/adapter_config.json") if NAME.match(p.parent.name))
