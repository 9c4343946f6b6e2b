"""Where a named adapter lives: static paths or an adapter root (local or s3://), never outside it."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from oikyo_ray.errors import OikyoError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class AdapterNotFound(OikyoError):
    """No adapter of that name (HTTP 404)."""


class BadAdapterName(OikyoError):
    """The name is not a plain adapter name (HTTP 400): path tricks are refused."""


def check_adapter_dir(path: str | Path) -> Path:
    """An adapter dir must hold adapter_config.json and safetensors weights (never pickles)."""
    p = Path(path).expanduser().resolve()
    if not (p / "adapter_config.json").is_file():
        raise AdapterNotFound(f"{p} is not an adapter directory (no adapter_config.json)")
    if not (p / "adapter_model.safetensors").is_file():
        raise OikyoError(f"{p} has no adapter_model.safetensors; only safetensors adapters are served")
    if (p / "adapter_model.bin").exists():
        raise OikyoError(f"{p} also holds a pickled adapter_model.bin; remove it (safetensors only)")
    return p


def validate_name(name: str) -> str:
    if not NAME.match(name) or ".." in name:
        raise BadAdapterName(f"invalid adapter name {name!r}: letters, digits, '.', '_' and '-' only")
    return name


def resolve_adapter(name: str, static: dict[str, str], root: str | None, cache_dir: str) -> Path:
    """The local directory of adapter `name`; s3:// roots are copied into the cache first."""
    if name in static:
        return check_adapter_dir(static[name])
    validate_name(name)
    if not root:
        raise AdapterNotFound(f"model '{name}' not found")
    if root.startswith("s3://"):
        from oikyo_ray.storage import download_dir, filesystem

        fs, key = filesystem(root.rstrip("/") + "/" + name)
        import pyarrow.fs as pafs

        if fs.get_file_info(key + "/adapter_config.json").type != pafs.FileType.File:
            raise AdapterNotFound(f"model '{name}' not found under {root}")
        digest = hashlib.sha256(root.encode()).hexdigest()[:12]
        local = download_dir(root.rstrip("/") + "/" + name, Path(cache_dir).expanduser() / "adapters" / digest / name)
        return check_adapter_dir(local)
    base = Path(root).expanduser().resolve()
    candidate = (base / name).resolve()  # follows symlinks: a link pointing out is caught below
    if base not in candidate.parents:
        raise BadAdapterName(f"adapter {name!r} resolves outside the adapter root")
    if not candidate.is_dir():
        raise AdapterNotFound(f"model '{name}' not found under {root}")
    return check_adapter_dir(candidate)


def list_root(root: str | None) -> list[str]:
    """Adapter names available under the root (directories holding adapter_config.json)."""
    if not root:
        return []
    if root.startswith("s3://"):
        import pyarrow.fs as pafs

        from oikyo_ray.storage import filesystem

        fs, key = filesystem(root)
        infos = fs.get_file_info(pafs.FileSelector(key, recursive=True, allow_not_found=True))
        return sorted({Path(i.path).parent.name for i in infos if i.path.endswith("/adapter_config.json")})
    base = Path(root).expanduser()
    return sorted(p.parent.name for p in base.glob("*/adapter_config.json") if NAME.match(p.parent.name))
