"""oikyo's registry mirrored to MLflow (Ray-free): a registered version and every alias move.

    version_registered(model, entry)    the run's adapter becomes a version of MLflow model `model`
    alias_moved(model, alias, run)      the alias set (or removed) on that MLflow model

A registry version's run knows its MLflow server and run (<run>/tracking.json, written when the run
was tracked), so the registry needs no config: runs that were not tracked are left alone, without
importing mlflow. A failed mirror warns; oikyo's registry, which was already written, stays the
source of truth (a later move mirrors the alias again).
"""

from __future__ import annotations

import json
import sys

from oikyo_ray.runs import store
from oikyo_ray.tracking.values import STATE_FILE


def _warn(msg: str) -> None:
    print(f"[oikyo] warning: MLflow mirror: {msg}", file=sys.stderr)


def _tracked(run: str | None) -> dict | None:
    """The run's MLflow section of tracking.json, when it was tracked and its adapter logged."""
    if not run:
        return None
    text = store.read_text(store.join(run, STATE_FILE))
    section = json.loads(text).get("mlflow") if text else None
    return section if section and section.get("model") else None


def _version(c, model: str, run: str, tracked: dict) -> str:
    from oikyo_ray.tracking.mlflow_run import model_version  # noqa: PLC0415 (mlflow is optional and slow to import)

    tags = {"oikyo.run": store.join(run).rstrip("/").rsplit("/", 1)[-1]}
    return model_version(c, model, tracked["run_id"], tracked["model"]["artifact_path"], tags)


def version_registered(model: str, entry: dict) -> None:
    try:
        tracked = _tracked(entry.get("run"))
        if tracked is None:
            return
        from oikyo_ray.tracking.mlflow_run import client  # noqa: PLC0415 (mlflow is optional and slow to import)

        c = client(tracked["uri"])
        version = _version(c, model, entry["run"], tracked)
        c.set_model_version_tag(model, version, "oikyo.registry_version", str(entry["version"]))
    except Exception as e:
        _warn(f"{model} v{entry['version']} is not in MLflow ({e})")


def alias_moved(model: str, alias: str, run: str | None, previous_run: str | None) -> None:
    """`run`: the run of the version the alias now points to (None: removed); `previous_run`:
    of the one it pointed to. Moved onto a version MLflow does not have (an untracked run), the
    alias is removed there rather than left on an older version."""
    try:
        tracked, before = _tracked(run), _tracked(previous_run)
        if tracked is None and before is None:
            return
        from oikyo_ray.tracking.mlflow_run import client  # noqa: PLC0415 (mlflow is optional and slow to import)

        if tracked is not None and run is not None:
            c = client(tracked["uri"])
            c.set_registered_model_alias(model, alias, _version(c, model, run, tracked))
        if before is not None and (tracked is None or before["uri"] != tracked["uri"]):
            try:
                client(before["uri"]).delete_registered_model_alias(model, alias)
            except Exception as e:
                if getattr(e, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise
    except Exception as e:
        _warn(f"alias {alias!r} of {model} is not mirrored ({e})")
