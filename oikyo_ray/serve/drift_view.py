"""The latest drift reports as gauge values (Ray-free): what the serving app exports for the
alert rules, read from <capture root>/drift/<model>/report.json.

    for model, values in drift_values(capture_root): ...   # {"detected": 0|1, "<check>": value/threshold}
"""

from __future__ import annotations

import json
import logging

from oikyo_ray.runs import store

log = logging.getLogger(__name__)
MAX_MODELS = 100  # one series per model and check: bounded whatever the directory holds


def drift_values(capture_root: str) -> dict[str, dict[str, float]]:
    """Per model with a report: `detected` (1 drifted, 0 not, -1 too few rows) and each check's
    value over its threshold (above 1: that check drifted). Unreadable reports are skipped."""
    base = store.join(capture_root, "drift")
    out: dict[str, dict[str, float]] = {}
    try:
        models = sorted(store.list_dirs(base))[:MAX_MODELS] if store.exists(base) else []
    except Exception:  # noqa: BLE001 - storage down: no values this round, serving goes on
        log.exception("drift gauges: cannot list %s", base)
        return out
    for model in models:
        try:
            text = store.read_text(store.join(base, model, "report.json"))
            report = json.loads(text) if text else None
        except Exception:  # noqa: BLE001 - one bad report loses its own values only
            log.exception("drift gauges: cannot read the report of %s", model)
            continue
        if not report:
            continue
        values = {"detected": {True: 1.0, False: 0.0, None: -1.0}[report.get("drifted")]}
        for c in report.get("checks", []):
            if c.get("threshold"):
                values[c["check"]] = float(c["value"]) / float(c["threshold"])
        out[model] = values
    return out
