"""Named models with numbered versions and movable aliases, under `<run.root>/registry/` (Ray-free).

    <root>/registry/<model>/log/00000001.json    one change each: a version registered, an alias
                                                 set or removed, traffic weights set, a staging
                                                 test's result recorded

A model's state (versions, aliases) is its log replayed. Nothing is rewritten, so the log is the
history (who moved `champion` when, from which version) and a rollback is one more alias move.
Writers append the next entry with a create-if-absent write (`log.append_at`), so of two racing
writers one wins. The other re-reads: when the entries it missed leave its change as meant (a
version registered meanwhile, another alias moved) it retries; when they do not (the alias it was
moving was moved by someone else) it gets `RegistryConflict` and writes nothing.

Versions of runs tracked in MLflow, and their aliases, are mirrored there (tracking/mirror.py).
"""

from __future__ import annotations

import getpass
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from oikyo_ray.errors import RegistryConflict, RegistryError
from oikyo_ray.registry.log import append_at, read_log
from oikyo_ray.runs import store
from oikyo_ray.tracking import mirror

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
LATEST = "latest"  # a reference, not an alias: the newest version
RETRIES = 20  # appends lost to writers that changed something else, before giving up
CHAMPION, CHALLENGER = "champion", "challenger"
DEFAULT_TRAFFIC = {CHAMPION: 100.0}  # a served model answers with its champion until told otherwise


@dataclass
class ModelState:
    name: str
    versions: dict[int, dict] = field(default_factory=dict)
    aliases: dict[str, int] = field(default_factory=dict)
    traffic: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TRAFFIC))  # alias -> weight
    history: list[dict] = field(default_factory=list)  # the log's entries, oldest first

    def version(self, ref: str | int) -> dict:
        """A version by number (`3`, `v3`), alias (`champion`) or `latest`."""
        text = str(ref)
        if text == LATEST and self.versions:
            return self.versions[max(self.versions)]
        if text in self.aliases:
            return self.versions[self.aliases[text]]
        if re.fullmatch(r"v?\d+", text) and int(text.lstrip("v")) in self.versions:
            return self.versions[int(text.lstrip("v"))]
        known = ", ".join([*(f"v{n}" for n in sorted(self.versions)), *sorted(self.aliases)]) or "none yet"
        raise RegistryError(f"model {self.name!r} has no version or alias {text!r} (it has: {known})")


def check_name(name: str, what: str) -> str:
    if not NAME.match(name) or ".." in name:
        raise RegistryError(
            f"invalid {what} {name!r}: up to 128 letters, digits, '.', '_' and '-', not starting with one of '._-'"
        )
    return name


def log_uri(root: str, model: str) -> str:
    return store.join(root, "registry", check_name(model, "model name"), "log")


def list_models(root: str) -> list[str]:
    return sorted(store.list_dirs(store.join(root, "registry")))


def load(root: str, model: str) -> ModelState:
    return refresh(root, ModelState(model))


def refresh(root: str, state: ModelState) -> ModelState:
    """`state` brought up to date: only the entries it has not seen are read."""
    for entry in read_log(log_uri(root, state.name), after=len(state.history)):
        _apply(state, entry)
    return state


def _apply(state: ModelState, entry: dict) -> None:
    state.history.append(entry)
    kind = entry["kind"]
    if kind == "version":
        state.versions[entry["version"]] = {**entry, "staging": []}
    elif kind == "alias" and entry["version"] is None:
        state.aliases.pop(entry["alias"], None)
    elif kind == "alias":
        state.aliases[entry["alias"]] = entry["version"]
    elif kind == "traffic":
        state.traffic = dict(entry["weights"])
    elif kind == "staging":
        state.versions[entry["version"]]["staging"].append(entry)


def _commit(root: str, model: str, build: Callable[[ModelState], dict]) -> dict:
    """Append `build(state)` as the next entry, re-reading and rebuilding when another writer
    appended first (`build` raises RegistryConflict when what it read no longer holds)."""
    state = load(root, model)
    for _ in range(RETRIES):
        entry = _stamp(build(state))
        if append_at(log_uri(root, model), len(state.history) + 1, entry):
            return entry
        refresh(root, state)
    raise RegistryConflict(f"model {model!r}: {RETRIES} other writers changed it first; try again")


def _stamp(entry: dict) -> dict:
    return {**entry, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "by": getpass.getuser()}


def register(root: str, model: str, run: str, note: str | None = None) -> dict:
    """Add the run's adapter as the model's next version; returns the version's entry."""
    summary = run_summary(run)
    entry = _commit(
        root,
        model,
        lambda state: {"kind": "version", "version": max(state.versions, default=0) + 1, **summary, "note": note},
    )
    mirror.version_registered(model, entry)  # a run tracked in MLflow: a version there too
    return entry


AS_READ = object()  # `expect`'s default: whatever the alias (or traffic) was when this call read it


def set_alias(root: str, model: str, alias: str, ref: str | int | None, expect=AS_READ) -> dict:
    """Point `alias` at version `ref` (None removes it). `expect`: the version (or None: unset) the
    caller believes the alias points to now, as read when it decided; when another writer moved it
    since, `RegistryConflict` and nothing is written. Returns the alias entry."""
    check_name(alias, "alias")
    if alias == LATEST or re.fullmatch(r"v?\d+", alias):
        raise RegistryError(f"invalid alias {alias!r}: '{LATEST}' and version numbers are references already")
    first = load(root, model)
    want = None if ref is None else first.version(ref)["version"]
    believed = first.aliases.get(alias) if expect is AS_READ else expect

    def build(state: ModelState) -> dict:
        now = state.aliases.get(alias)
        if now != believed:
            raise RegistryConflict(
                f"model {model!r}: alias {alias!r} points to {_v(now)}, not {_v(believed)} as this move "
                f"expected (moved by {_mover(state, alias)}); nothing was written",
                hint=f"check `oikyo registry show {model}` and move it again if you still mean to",
            )
        return {"kind": "alias", "alias": alias, "version": want, "previous": now}

    entry = _commit(root, model, build)
    run_of = lambda v: first.versions.get(v, {}).get("run") if v is not None else None
    mirror.alias_moved(model, alias, run_of(want), run_of(entry["previous"]))  # runs tracked in MLflow
    return entry


def set_traffic(root: str, model: str, weights: dict[str, float], expect=AS_READ) -> dict:
    """Split the model's traffic between aliases by weight (`{"champion": 90, "challenger": 10}`);
    the serving app re-reads it live. Like `set_alias`, a split changed by someone else since
    `expect` (as read, by default) is a `RegistryConflict`."""
    for alias, w in weights.items():
        check_name(alias, "alias")
        if not w >= 0:
            raise RegistryError(f"traffic weight of {alias!r} must be >= 0, got {w}")
    if not sum(weights.values()) > 0:
        raise RegistryError(f"traffic weights {weights} must not all be 0")
    first = load(root, model)
    believed = first.traffic if expect is AS_READ else expect

    def build(state: ModelState) -> dict:
        if state.traffic != believed:
            raise RegistryConflict(
                f"model {model!r}: traffic is {state.traffic}, not {believed} as this change expected; "
                "nothing was written",
                hint=f"check `oikyo registry show {model}` and set it again if you still mean to",
            )
        return {"kind": "traffic", "weights": dict(weights), "previous": state.traffic}

    return _commit(root, model, build)


def record_staging(root: str, model: str, version: int, result: dict) -> dict:
    """Keep a staging test's figures and verdict with the version it tested."""
    load(root, model).version(version)  # names the versions there are when it is not one of them
    return _commit(root, model, lambda state: {"kind": "staging", "version": version, **result})


def _v(n: int | None) -> str:
    return "nothing" if n is None else f"v{n}"


def _mover(state: ModelState, alias: str) -> str:
    moves = [e for e in state.history if e["kind"] == "alias" and e["alias"] == alias]
    return f"{moves[-1]['by']} at {moves[-1]['at']}" if moves else "nobody"


def run_summary(run: str) -> dict:
    """What a version records of its run: where its adapter is, what it was trained from, and
    how its evaluation went (gates passed or not, the tuned model's metrics)."""
    run = store.join(run)
    lineage = store.read_text(store.join(run, "lineage.json"))
    if lineage is None or not store.exists(store.join(run, "adapter", "adapter_config.json")):
        raise RegistryError(
            f"{run} is not a finished run (no lineage.json or adapter/)",
            hint="register a run directory that `oikyo finetune` completed",
        )
    info = json.loads(lineage)
    report_text = store.read_text(store.join(run, "eval", "report.json"))
    report = json.loads(report_text) if report_text else None
    return {
        "run": run,
        "adapter": store.join(run, "adapter"),
        "base_model": info.get("base_model"),
        "data_content_hash": info.get("data_content_hash"),
        "config_hash": info.get("config_hash"),
        # a retrained run: the version it was trained from and the data it was trained on
        "parent": (info.get("retrain") or {}).get("parent"),
        "eval": None
        if report is None
        else {
            "passed": bool(report.get("passed", True)),
            "failed_gates": [g["name"] for g in report.get("gates", []) if not g["passed"]],
            "tuned": {k: v for k, v in report.get("tuned", {}).items() if isinstance(v, (int, float))},
        },
    }
