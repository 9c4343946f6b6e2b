"""When a registry model is due for a retrain (Ray-free): `retrain.*` triggers, any one suffices.

    reasons = due(cfg.retrain, since, now, drift_report, champion_version, rated_rows)

`since` is when the champion was registered or the model was last retrained, whichever is later:
a trigger counts only what happened after it (a drift report written before the last retrain
does not start another one).
"""

from __future__ import annotations

from datetime import datetime

from oikyo_ray.config import RetrainConfig

STAMP = "%Y-%m-%dT%H:%M:%S%z"  # the registry's entry times


def parse_time(text: str) -> datetime:
    try:
        return datetime.strptime(text, STAMP)
    except ValueError:
        return datetime.fromisoformat(text)


def due(
    cfg: RetrainConfig,
    since: datetime,
    now: datetime,
    drift_report: dict | None,
    champion_version: int,
    rated_rows: int,
) -> list[str]:
    """Why a retrain is due now; [] when it is not."""
    reasons = []
    if cfg.on_drift and drift_report and drift_report.get("drifted") is True:
        fresh = parse_time(str(drift_report.get("created"))) >= since
        if str(drift_report.get("version")) == str(champion_version) and fresh:
            drifted = [c["check"] for c in drift_report.get("checks", []) if c.get("drifted")]
            reasons.append(f"drift ({', '.join(drifted)})")
    if cfg.min_rated_rows is not None and rated_rows >= cfg.min_rated_rows:
        reasons.append(f"{rated_rows} feedback rows since {since:%Y-%m-%d %H:%M} (retrain.min_rated_rows)")
    if cfg.every_days is not None and (now - since).total_seconds() >= cfg.every_days * 86400:
        reasons.append(f"schedule: last trained {since:%Y-%m-%d %H:%M} (retrain.every_days={cfg.every_days:g})")
    return reasons
