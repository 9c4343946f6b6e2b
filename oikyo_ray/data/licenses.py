"""Licences of the data and the base model, checked against `policy` before Ray starts (Ray-free).

A data file's licence is, first found: a sidecar `<file>.license` (its first line, e.g.
`cc-by-4.0`), the entry of `data.licenses` for the `data.paths` entry it came from, or unknown. The
base model's is the `license:` of its model card (the README.md front matter the Hub writes) or
unknown. Ids are compared lower-cased, as the Hub writes them (SPDX-like: `apache-2.0`, `mit`,
`cc-by-nc-4.0`, `llama3`, `other`).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from oikyo_ray.config import DEMO_DATA, DEMO_MODEL, OikyoConfig
from oikyo_ray.data.paths import expand_paths
from oikyo_ray.errors import OikyoError
from oikyo_ray.runs import store

PROJECT_LICENSE = "apache-2.0"  # the demo model and data ship with oikyo, under its licence
# licences whose terms forbid commercial use, whatever their version
NON_COMMERCIAL = re.compile(r"^cc-by-nc|^cc-by-nc-sa|^cc-by-nc-nd|non-?commercial|research-only|^openrail\+\+?-nc")


class LicenseError(OikyoError):
    """A data source or the base model is not allowed by `policy`."""


def _norm(license_id: str | None) -> str | None:
    return license_id.strip().lower() if license_id and license_id.strip() else None


def file_license(path: str, declared: str | None) -> tuple[str | None, str]:
    """(licence or None, where it came from) of one data file."""
    uri = path if path.startswith("s3://") else str(Path(path).resolve())
    sidecar = store.read_text(f"{uri}.license")
    if sidecar is not None and _norm(sidecar.splitlines()[0] if sidecar.strip() else None):
        return _norm(sidecar.splitlines()[0]), f"{uri}.license"
    if declared:
        return _norm(declared), "data.licenses"
    return None, "none declared"


def model_license(model_path: str) -> str | None:
    """The `license:` of the model card's front matter, if the model directory has a card."""
    card = Path(model_path) / "README.md"
    if not card.is_file():
        return None
    m = re.match(r"---\n(.*?)\n---", card.read_text(errors="replace"), re.S)
    if not m:
        return None
    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return _norm(value) if isinstance(value, str) else None


def licenses(cfg: OikyoConfig, model_path: str) -> dict:
    """Every data file's licence and the base model's, with where each came from."""
    files: dict[str, dict[str, str | None]] = {}
    model: dict[str, str | None]
    for entry in cfg.data.paths:
        if entry == DEMO_DATA:
            files[DEMO_DATA] = {"license": PROJECT_LICENSE, "from": "shipped with oikyo"}
            continue
        for group in expand_paths([entry]).values():
            for f in group:
                name = f"s3://{f}" if entry.startswith("s3://") else f
                lic, source = file_license(name, cfg.data.licenses.get(entry))
                files[name] = {"license": lic, "from": source}
    if cfg.model.name_or_path == DEMO_MODEL:
        model = {"license": PROJECT_LICENSE, "from": "shipped with oikyo"}
    else:
        lic = model_license(model_path)
        model = {"license": lic, "from": "model card" if lic else "no licence in the model card"}
    return {"data": files, "model": model}


def check_licenses(cfg: OikyoConfig, model_path: str, warn=print) -> dict:
    """`licenses(...)` checked against `policy`; a refusal names the file or the model and the rule.
    Returns the record kept in lineage and the model card."""
    found = licenses(cfg, model_path)
    pol = cfg.policy
    allowed = {a.strip().lower() for a in pol.allowed_licenses} if pol.allowed_licenses is not None else None
    items = [*((f"data file {f}", v) for f, v in found["data"].items()), (f"base model {model_path}", found["model"])]
    for what, info in items:
        lic = info["license"]
        if lic is None:
            msg = f"{what} has no licence ({info['from']})"
            hint = "declare it in data.licenses or a <file>.license sidecar (model: its card's license:)"
            if pol.unknown_license == "refuse":
                raise LicenseError(msg + "; policy.unknown_license=refuse", hint=hint)
            warn(f"[oikyo] warning: {msg}; {hint}")
            continue
        if allowed is not None and lic not in allowed:
            raise LicenseError(
                f"{what} is licensed {lic!r} ({info['from']}), not in policy.allowed_licenses {sorted(allowed)}",
                hint="remove the source, or add the licence to policy.allowed_licenses if its terms allow your use",
            )
        if pol.commercial_use and NON_COMMERCIAL.search(lic):
            raise LicenseError(
                f"{what} is licensed {lic!r} ({info['from']}), which forbids commercial use; "
                "policy.commercial_use=true",
                hint="remove the source, or set policy.commercial_use=false for non-commercial work",
            )
    return found
