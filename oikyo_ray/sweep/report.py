"""Sweep results (Ray-free): table (CSV + Markdown), metric-vs-step PNG, and promotion of the best
trial. `grid` is what Ray Tune returns: results with .metrics, .config, .path and .error."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import yaml
from matplotlib.figure import Figure

from oikyo_ray.config import OikyoConfig
from oikyo_ray.errors import OikyoError
from oikyo_ray.runs import store
from oikyo_ray.runs.rundir import publish, write_lineage
from oikyo_ray.sweep.budget import trial_budget
from oikyo_ray.sweep.space import with_params
from oikyo_ray.train.checkpoint import TRAINING_ONLY

# evaluate(trial config, model_path, final adapter/model dir, run dir): writes run_dir/eval
Evaluate = Callable[[OikyoConfig, str, Path, Path], None]


_TRIAL_ID = re.compile(r"[0-9a-f]{5}_\d{5}")


def _metric_history(trial_dir: Path, metric: str) -> list[tuple[int, float]]:
    f = trial_dir / "metrics.jsonl"
    if not f.exists():
        return []
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return [(r["step"], r[metric]) for r in rows if metric in r]


def _trial_id(path: str) -> str:
    m = _TRIAL_ID.search(path)
    if m is None:
        raise ValueError(f"cannot tell the trial id from its result path {path!r}")
    return m.group(0)


def trial_rows(cfg: OikyoConfig, sweep_dir: Path, grid, manifest: dict) -> list[dict]:
    metric, sign = cfg.sweep.metric, (1 if cfg.sweep.mode == "min" else -1)
    out = []
    for res in grid:
        tid = (res.metrics or {}).get("trial_id") or _trial_id(res.path or "")
        params = (res.config or {}).get("params", {})
        trial_dir = sweep_dir / "trials" / tid
        hist = _metric_history(trial_dir, metric)
        budget = trial_budget(cfg, with_params(cfg.model_dump(mode="json"), params), manifest)
        last_step = hist[-1][0] if hist else 0
        if res.error:
            status = f"failed: {str(res.error).splitlines()[0][:200]}"
        elif last_step >= budget:
            status = "completed"
        else:
            status = "early-stopped"
        best = min((sign * v for _, v in hist), default=math.inf) * sign if hist else math.nan
        out.append(
            {
                "trial": trial_dir.name,
                "status": status,
                "steps": last_step,
                "budget": budget,
                f"best_{metric}": best,
                "last_" + metric: hist[-1][1] if hist else math.nan,
                **{f"last_{o.metric}": _last(trial_dir, o.metric) for o in cfg.sweep.objectives},
                **{f"param:{k}": v for k, v in params.items()},
                "dir": str(trial_dir),
            }
        )
    if cfg.sweep.objectives:
        mark_pareto(cfg, out)
    return out


def _last(trial_dir: Path, metric: str) -> float:
    hist = _metric_history(trial_dir, metric)
    return hist[-1][1] if hist else math.nan


def _objective_values(cfg: OikyoConfig, row: dict) -> list[float]:
    """A trial's objectives, each signed so that lower is better: what Optuna compared (the values
    at the trial's last report), sweep.metric first."""
    sw = cfg.sweep
    pairs = [(sw.metric, sw.mode), *((o.metric, o.mode) for o in sw.objectives)]
    return [(1 if mode == "min" else -1) * row[f"last_{m}"] for m, mode in pairs]


def _dominates(a: list[float], b: list[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def mark_pareto(cfg: OikyoConfig, rows: list[dict]) -> None:
    """Set `pareto` on each row: "yes" for a completed trial no other completed trial dominates
    (as good on every objective, better on one); early-stopped and failed trials ran less than
    their budget and are not compared."""
    done = [r for r in rows if r["status"] == "completed"]
    values = {id(r): _objective_values(cfg, r) for r in done}
    for r in rows:
        v = values.get(id(r))
        on_front = (
            v is not None
            and not any(math.isnan(x) for x in v)
            and not any(_dominates(values[id(o)], v) for o in done if o is not r)
        )
        r["pareto"] = "yes" if on_front else ""


def write_table(rows: list[dict], sweep_dir: Path) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "dir"))
    with (sweep_dir / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    md = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    table = "\n".join(md)
    (sweep_dir / "results.md").write_text(table + "\n")
    return table


def plot(rows: list[dict], metric: str, out: Path) -> None:
    fig = Figure(figsize=(7, 4))  # no pyplot: no GUI backend, nothing global to close
    ax = fig.subplots()
    for r in rows:
        hist = _metric_history(Path(r["dir"]), metric)
        if not hist:
            continue
        xs, ys = zip(*hist)
        stopped = r["status"] != "completed"
        ax.plot(
            xs,
            ys,
            linestyle="--" if stopped else "-",
            marker="x" if stopped else None,
            label=f"{r['trial']} ({r['status'].split(':')[0]})",
        )
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title("sweep: dashed = stopped early or failed")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def promote(cfg: OikyoConfig, sweep_dir: Path, best: dict, model_path: str, evaluate: Evaluate | None = None) -> Path:
    """Copy the best trial into the runs registry as <sweep>-best, with its lineage; `evaluate`
    (with eval.enabled) writes its evaluation."""
    src = Path(best["dir"])
    trial_cfg = OikyoConfig.model_validate(yaml.safe_load((src / "config.yaml").read_text()))
    dest = sweep_dir.parent / f"{sweep_dir.name}-best"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "params.json", "loss.png"):
        if (src / name).exists():
            shutil.copy2(src / name, dest / name)
    final = "adapter" if trial_cfg.method.type != "full" else "model"
    if (src / final).exists():
        shutil.copytree(src / final, dest / final)
    else:  # Tune may end a trial at its last report, before fit() copies the final checkpoint
        ckpts = sorted(p for p in (src / "checkpoints").glob("checkpoint_*") if p.is_dir())
        if not ckpts:
            raise OikyoError(f"best trial {best['trial']} left no checkpoint in {src / 'checkpoints'}")
        shutil.copytree(ckpts[-1], dest / final, ignore=shutil.ignore_patterns(*TRAINING_ONLY))
    shutil.copytree(sweep_dir / "data", dest / "data")
    manifest = json.loads((dest / "data" / "manifest.json").read_text())
    write_lineage(
        dest,
        trial_cfg,
        manifest,
        model_path,
        parent={
            "sweep": store.join(cfg.run.root, sweep_dir.name),
            "trial": best["trial"],
            "params": {k[6:]: v for k, v in best.items() if k.startswith("param:")},
        },
    )
    if cfg.eval.enabled and evaluate is not None:
        evaluate(trial_cfg, model_path, dest / final, dest)
    return dest


def summarise(
    cfg: OikyoConfig,
    sweep_dir: Path,
    grid,
    manifest: dict,
    model_path: str,
    evaluate: Evaluate | None = None,
    log=print,
) -> Path:
    rows = trial_rows(cfg, sweep_dir, grid, manifest)
    table = write_table(rows, sweep_dir)
    plot(rows, cfg.sweep.metric, sweep_dir / f"{cfg.sweep.metric}_vs_step.png")
    log(table)
    key = f"best_{cfg.sweep.metric}"
    done = [r for r in rows if r["status"] == "completed" and not math.isnan(r[key])]
    if not done:
        raise OikyoError(f"no trial completed; see {sweep_dir / 'results.md'}")
    best = (min if cfg.sweep.mode == "min" else max)(done, key=lambda r: r[key])
    dest = promote(cfg, sweep_dir, best, model_path, evaluate)
    where = store.join(cfg.run.root, dest.name)
    if store.is_remote(where):  # replace an earlier promotion (a resumed sweep) entirely
        if store.exists(where):
            store.delete_dir(where)
        publish(cfg, dest)
    front = {"pareto_front": [r["trial"] for r in rows if r.get("pareto")]} if cfg.sweep.objectives else {}
    (sweep_dir / "best.json").write_text(json.dumps({**best, "promoted_to": where, **front}, indent=2, default=str))
    (sweep_dir / "best_config.yaml").write_text((dest / "config.yaml").read_text())
    log(f"[oikyo] sweep: best trial {best['trial']} ({key}={best[key]:.4f}) promoted to {where}")
    return sweep_dir
