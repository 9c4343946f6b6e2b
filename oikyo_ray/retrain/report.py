"""A retrain's report (Ray-free): report.json (everything) and report.md (what a person reads)."""

from __future__ import annotations

import json

from oikyo_ray.runs import store

TITLE = {
    "canaried": "passed: canaried as the challenger",
    "failed": "FAILED: nothing deployed",
    "too_few_rows": "not run: too few new rows",
    "not_due": "not due",
}


def markdown(r: dict) -> str:
    lines = [f"# Retrain of {r['model']} ({r['stamp']}): {TITLE[r['outcome']]}", ""]
    parent = r.get("parent") or {}
    lines.append(f"- parent: v{parent.get('version')} ({parent.get('run')})")
    lines.append(f"- why: {', '.join(r['reasons']) or 'forced'}")
    if r.get("run"):
        lines.append(f"- run: {r['run']}")
    if r.get("dataset"):
        counts = {k: v for k, v in r["dataset"].items() if k not in ("where", "files")}
        lines.append(f"- data ({r['dataset']['where']}): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if r.get("figures"):
        lines += ["", "| slice | rows | champion loss | challenger loss |", "|---|---:|---:|---:|"]
        for name, f in r["figures"].items():
            lines.append(f"| {name} | {f.get('rows')} | {f.get('champion')} | {f.get('challenger')} |")
    if r.get("failures"):
        lines += ["", "## Why it failed", *(f"- {f}" for f in r["failures"])]
    if r.get("deployed"):
        d = r["deployed"]
        share = f"{d['canary']:g}% of the traffic"
        lines += ["", f"Deployed as v{d['version']} with {share} (`oikyo ab report {r['model']}`)."]
    return "\n".join(lines) + "\n"


def write(where: str, r: dict) -> None:
    store.write_text(store.join(where, "report.json"), json.dumps(r, indent=2, default=str))
    store.write_text(store.join(where, "report.md"), markdown(r))
