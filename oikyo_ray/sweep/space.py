"""Search spaces over dotted config paths (Ray-free): validation before Ray starts, and each trial's
config from its sampled values. ray_tune.tune_domains turns a space into Ray Tune's samplers."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from oikyo_ray.config import OikyoConfig, SearchDim, validate_config
from oikyo_ray.errors import ConfigError

NOT_SWEEPABLE = ("sweep", "run", "serve")


def _leaf(path: str) -> None:
    """Raise unless `path` names a leaf field of OikyoConfig outside sweep/run/serve."""
    model: type[BaseModel] = OikyoConfig
    parts = path.split(".")
    if parts[0] in NOT_SWEEPABLE:
        raise ConfigError(f"sweep.space.{path}: the {parts[0]} section cannot be swept")
    for i, p in enumerate(parts):
        field = model.model_fields.get(p)
        if field is None:
            raise ConfigError(
                f"sweep.space.{path}: unknown config field '{'.'.join(parts[: i + 1])}'",
                hint="use a dotted path such as train.lr or method.lora.r (oikyo config --fields)",
            )
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if i == len(parts) - 1:
                raise ConfigError(f"sweep.space.{path}: is a section, not a field")
            model = ann
        elif i != len(parts) - 1:
            raise ConfigError(f"sweep.space.{path}: '{'.'.join(parts[: i + 1])}' is a field, not a section")


def set_path(data: dict, path: str, value: Any) -> dict:
    node = data
    *head, last = path.split(".")
    for p in head:
        node = node.setdefault(p, {})
    node[last] = value
    return data


def with_params(base: dict, params: dict[str, Any]) -> OikyoConfig:
    """The base config with sampled values set at their paths, validated."""
    data = copy.deepcopy(base)
    for path, value in params.items():
        set_path(data, path, value)
    return validate_config(data, origin="sweep trial")


def _probe_values(dim: SearchDim) -> list[Any]:
    if dim.type == "choice":
        return list(dim.values or [])
    if dim.type == "randint":
        assert dim.low is not None and dim.high is not None  # SearchDim requires both for randint
        return [int(dim.low), int(dim.high) - 1]
    return [dim.low, dim.high]


def validate_space(cfg: OikyoConfig) -> None:
    """Every path exists and every value the space can produce passes the config's own checks."""
    if not cfg.sweep.space:
        raise ConfigError(
            "sweep.space is empty: name at least one field to search",
            hint="e.g. sweep.space={train.lr: {type: loguniform, low: 1e-4, high: 1e-2}}",
        )
    base = cfg.model_dump(mode="json")
    for path, dim in cfg.sweep.space.items():
        _leaf(path)
        for v in _probe_values(dim):
            try:
                with_params(base, {path: v})
            except ConfigError as e:
                raise ConfigError(f"sweep.space.{path}: value {v!r} is invalid for that field:\n{e}") from None
