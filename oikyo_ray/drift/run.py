"""`oikyo drift MODEL` (Ray-free core): a registry model's captured traffic against the run its
champion was trained from; writes report.{json,md} and lengths.png under
<capture root>/drift/<model>/ (the serving app exports its verdict as gauges, `serve/drift_view.py`).

    report = drift(cfg, root, "support-bot", live=local_live)   # or ray_drift.live_side
"""

from __future__ import annotations

import math
import random
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from oikyo_ray.config import OikyoConfig, validate_config
from oikyo_ray.drift import report as report_files
from oikyo_ray.drift.check import (
    Side,
    drift_report,
    feedback_trend,
    prompt_text,
    reference_texts,
    split_texts,
    summarize,
)
from oikyo_ray.errors import OikyoError
from oikyo_ray.eval.scoring import ModelPair, mean_nll
from oikyo_ray.model.load import load_tokenizer, resolve_model_path
from oikyo_ray.registry import registry
from oikyo_ray.runs import store
from oikyo_ray.serve.capture import read_rows

# (completions root, model, first day, a picklable () -> tokenizer) -> (the live side, prompts to score)
LiveSide = Callable[[str, str, str, Callable[[], Any]], tuple[Side, list[str]]]


def capture_root(cfg: OikyoConfig, root: str) -> str:
    return cfg.serve.capture.root or store.join(root, "capture")


def since(cfg: OikyoConfig) -> str:
    return (datetime.now(UTC) - timedelta(days=cfg.drift.window_days)).strftime("%Y-%m-%d")


def local_live(completions: str, model: str, first_day: str, load_tokenizer) -> tuple[Side, list[str]]:
    """The live side read in this process: captured prompts of `model` since `first_day`."""
    tokenizer = load_tokenizer()
    rows = [r for r in read_rows(completions) if r.get("model") == model and str(r.get("date")) >= first_day]
    texts = [prompt_text(r) for r in rows]
    return summarize(texts, tokenizer), texts


def local_run(run: str, dest: Path) -> Path:
    """The run's files this needs, here (an s3:// run is downloaded: config, data, adapter)."""
    if not store.is_remote(run):
        return Path(run)
    return store.download(run, dest, only=("config.yaml", "data", "adapter"))


def prompt_perplexity(model, tokenizer, texts: list[str], batch_size: int = 16, max_tokens: int = 512) -> float:
    """exp(mean next-token NLL) of the model over the prompts' own tokens."""
    ids = [x for x in tokenizer(texts, add_special_tokens=False)["input_ids"] if len(x) >= 2]
    ids = [x[:max_tokens] for x in ids]
    nll = mean_nll(model, ids, ids, tokenizer.pad_token_id, batch_size)
    return math.exp(nll) if nll is not None else float("nan")


def _perplexities(run_cfg: OikyoConfig, run_dir: Path, live: list[str], limit: int) -> dict:
    pair = ModelPair(run_cfg, resolve_model_path(run_cfg.model), run_dir / "adapter", device="cpu")
    test = split_texts(run_dir / "data", "test")
    rnd = random.Random(0)
    sample = lambda xs: rnd.sample(xs, limit) if len(xs) > limit else xs  # noqa: E731
    with pair.use("tuned") as model:
        return {
            "live": round(prompt_perplexity(model, pair.tokenizer, sample(live)), 4),
            "test": round(prompt_perplexity(model, pair.tokenizer, sample(test)), 4),
        }


def drift(cfg: OikyoConfig, root: str, model: str, version: str = "champion", live: LiveSide = local_live) -> dict:
    """Compare, write the report files, return the report."""
    state = registry.load(root, model)
    served = state.version(version)
    cap = capture_root(cfg, root)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = local_run(served["run"], Path(tmp) / "run")
        run_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else None
        if run_text is None:
            raise OikyoError(f"{served['run']} has no config.yaml", hint="drift compares against the run's data")
        run_cfg = validate_config(yaml.safe_load(run_text) or {}, f"{served['run']}/config.yaml")
        load_tok = partial(load_tokenizer, run_cfg.model, resolve_model_path(run_cfg.model))
        tok = load_tok()
        if not (run_dir / "data" / "train").is_dir():
            raise OikyoError(
                f"{served['run']} keeps no prepared data (data/train)", hint="drift needs the run's training prompts"
            )
        ref = summarize(reference_texts(run_dir / "data", cfg.drift), tok)
        first_day = since(cfg)
        live_side, live_texts = live(store.join(cap, "completions"), model, first_day, load_tok)
        ppl = _perplexities(run_cfg, run_dir, live_texts, cfg.drift.max_rows_scored) if cfg.drift.perplexity else None
        if ppl and not all(math.isfinite(v) for v in ppl.values()):
            ppl = None  # nothing to score on a side
        feedback = read_rows(store.join(cap, "feedback"))
        rated = [r for r in feedback if r.get("model") == model and str(r.get("date")) >= first_day]
        result = drift_report(model, ref, live_side, cfg.drift, ppl, feedback_trend(rated))
        result.update(
            version=served["version"], run=served["run"], since=first_day, created=datetime.now(UTC).isoformat()
        )
        out = report_files.write(Path(tmp) / "report", result, ref.lengths, live_side.lengths)
        dest = store.join(cap, "drift", model)
        if store.is_remote(dest):
            store.upload(out, dest)
        else:
            shutil.copytree(out, dest, dirs_exist_ok=True)
    return result
