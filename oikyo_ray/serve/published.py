"""Served names resolved from the model registry, re-read while serving (Ray-free).

With `serve.registry_models: [support-bot]`, a request for `support-bot` is answered by the
version behind one of the model's traffic aliases (`champion` alone until `oikyo deploy --canary`
splits it), as the adapter `support-bot-v3`. The app re-reads the registry every
`serve.registry_poll_s`, so an alias move (a deploy, a promotion, a rollback) reaches the next
requests without a restart, while requests already routed finish on the version they got: it
stays loadable, as versions are never rewritten. A registry that cannot be read keeps the last
view: a storage hiccup never stops serving.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from dataclasses import dataclass

from oikyo_ray.registry.registry import ModelState, load, refresh

log = logging.getLogger(__name__)

# no "." in it: peft names torch modules after adapters, and module names cannot hold one
VARIANT = re.compile(r"^(?P<model>.+)-v(?P<version>\d+)$")


def variant_name(model: str, version: int) -> str:
    """The adapter name a registry version is served under."""
    return f"{model}-v{version}"


def parse_variant(name: str, models: list[str]) -> tuple[str, int] | None:
    """(model, version) when `name` is a served registry model's version, else None."""
    m = VARIANT.match(name)
    if m is None or m["model"] not in models:
        return None
    return m["model"], int(m["version"])


@dataclass(frozen=True)
class Route:
    weights: dict[str, float]  # variant -> weight
    roles: dict[str, str]  # variant -> the alias it serves as (the first, when two share a version)


def route_of(state: ModelState) -> Route | None:
    """Where the model's traffic goes now; None when no traffic alias points at a version."""
    weights: dict[str, float] = {}
    roles: dict[str, str] = {}
    for alias, weight in sorted(state.traffic.items()):
        version = state.aliases.get(alias)
        if version is None or weight <= 0:
            continue  # a split naming an alias that was removed: the rest takes its share
        name = variant_name(state.name, version)
        weights[name] = weights.get(name, 0.0) + weight
        roles.setdefault(name, alias)
    return Route(weights, roles) if weights else None


def adapter_uri(root: str, model: str, version: int) -> str:
    """Where version `version` of `model` keeps its adapter (a local dir or s3://)."""
    return load(root, model).version(version)["adapter"]


class Published:
    """The registry models' routes, refreshed in the background while requests use the last view."""

    def __init__(self, root: str, models: list[str], poll_s: float):
        self.root, self.poll_s = root, poll_s
        self.states = {m: ModelState(m) for m in models}
        self.routes: dict[str, Route] = {}
        self.read_at = float("-inf")
        self._refreshing: asyncio.Task | None = None
        self._lock = threading.Lock()  # two refreshes at once would apply the same entries twice

    def refresh(self) -> None:
        """Read each model's new log entries; one unreadable model keeps its last route."""
        with self._lock:
            self._refresh()

    def _refresh(self) -> None:
        routes = dict(self.routes)
        for name, state in self.states.items():
            try:
                refresh(self.root, state)
            except Exception as e:  # noqa: BLE001 - any storage failure: serve the last view, say why
                log.warning("registry model %r not re-read (serving its last view): %s", name, e)
                continue
            route = route_of(state)
            if route is None:
                routes.pop(name, None)
            else:
                routes[name] = route
        self.routes = routes  # one assignment: a request sees the old view or the new, never half
        self.read_at = time.monotonic()

    async def route(self, name: str) -> Route | None:
        """The route of a served registry model (None for other names). The first call reads the
        registry; later ones start a re-read in the background when the view is older than the
        poll interval, and answer from the current view meanwhile."""
        if name not in self.states:
            return None
        if self.read_at == float("-inf"):
            await self._refresh_once()
        elif time.monotonic() - self.read_at > self.poll_s and self._refreshing is None:
            self._refreshing = asyncio.create_task(self._refresh_once())
        return self.routes.get(name)

    async def _refresh_once(self) -> None:
        try:
            await asyncio.to_thread(self.refresh)
        finally:
            self._refreshing = None
