"""Challenger against champion (Ray-free): both adapters on one copy of the base, each slice's
token-weighted loss of the reference answers, and the retrain's verdict on them.

    items = {"test": test_items(champion_data), "live": row_items(live_eval_rows, tokenizer, data)}
    figures = losses(cfg, model_path, {"champion": dir1, "challenger": dir2}, items)
    failures = verdict(figures, cfg.retrain)        # [] : the challenger goes on to be canaried

The test slice is the champion's own test split (the original distribution: forgetting shows
here); the live slice is the held-out share of the new rows (the shifted traffic).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from peft import PeftModel

from oikyo_ray.config import DataConfig, OikyoConfig, RetrainConfig
from oikyo_ray.data.formats import RowError, normaliser
from oikyo_ray.data.prepared import load_split_rows
from oikyo_ray.data.tokenize import encode_messages
from oikyo_ray.eval.scoring import mean_nll
from oikyo_ray.model.load import load_model, load_tokenizer

Item = tuple[list[int], list[int]]  # input ids, labels


def test_items(data_dir: Path) -> list[Item]:
    return [(list(r["input_ids"]), list(r["labels"])) for r in load_split_rows(data_dir, "test")]


def row_items(rows: list[dict], tokenizer, data: DataConfig) -> list[Item]:
    """Rows as the data stage reads them, tokenised as it does (a pair: its chosen answer)."""
    norm, out = normaliser(data), []
    for row in rows:
        try:
            msgs, meta, _ = norm.read(row, "auto")
            enc = encode_messages(tokenizer, msgs, data.max_length, False, meta.get("tools"), data.train_on_reasoning)
        except (RowError, ValueError):
            continue  # the curation rejects these rows too
        out.append((enc["input_ids"], enc["labels"]))
    return out


def losses(
    cfg: OikyoConfig, model_path: str, adapters: dict[str, str], items: dict[str, list[Item]], batch_size: int = 16
) -> dict:
    """{slice: {"rows": n, adapter name: mean loss}} with every adapter on the same base."""
    tokenizer = load_tokenizer(cfg.model, model_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    (first, first_dir), *rest = adapters.items()
    model = PeftModel.from_pretrained(load_model(cfg.model, model_path), first_dir, adapter_name=first)
    for name, where in rest:
        model.load_adapter(where, adapter_name=name)
    model = model.to(device).eval()
    out: dict[str, dict] = {name: {"rows": len(rows)} for name, rows in items.items()}
    for adapter in adapters:
        model.set_adapter(adapter)
        for name, rows in items.items():
            loss = mean_nll(model, [a for a, _ in rows], [b for _, b in rows], tokenizer.pad_token_id, batch_size)
            out[name][adapter] = None if loss is None else round(loss, 5)
    return out


def verdict(figures: dict, cfg: RetrainConfig) -> list[str]:
    """What keeps the challenger from being canaried; [] when nothing does."""
    failures = []
    live, test = figures.get("live", {}), figures.get("test", {})
    if live.get("rows", 0) < cfg.min_live_eval_rows:
        failures.append(
            f"{live.get('rows', 0)} held-out live rows, fewer than retrain.min_live_eval_rows={cfg.min_live_eval_rows}"
        )
    elif not _below(live, 1 - cfg.min_live_gain):
        failures.append(
            f"live slice: challenger loss {live.get('challenger')} is not below (1 - retrain.min_live_gain="
            f"{cfg.min_live_gain:g}) x the champion's {live.get('champion')}"
        )
    if test.get("rows") and not _below(test, 1 + cfg.max_test_regression, strict=False):
        failures.append(
            f"test split: challenger loss {test.get('challenger')} is over (1 + retrain.max_test_regression="
            f"{cfg.max_test_regression:g}) x the champion's {test.get('champion')} (it forgot)"
        )
    return failures


def _below(s: dict, factor: float, strict: bool = True) -> bool:
    a, b = s.get("challenger"), s.get("champion")
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return False
    return a < b * factor if strict else a <= b * factor
