"""The evaluate stage's Ray layer: items scored by a Ray Data actor pool, and the choice of backend.

    score(cfg, model_path, tuned_dir, items) -> Scoring          the `Scorer` the Ray layer passes
    score_on_ray(cfg, model_path, tuned_dir, items) -> Scoring   map_batches over an actor pool

`score` follows `eval.backend`: local (in this process), ray, or auto (Ray when it is running and
there are at least `eval.ray_min_items` items). Each actor loads the tokenizer, the base and the
fine-tuned model once (`scoring.ModelPair`) and runs the same `score_batch` as the in-process path
on every batch it receives, so both give the same numbers. Pool size, CPU and GPU per actor come
from `eval.num_actors`, `eval.cpus_per_actor`, `eval.gpus_per_actor`; batches hold
`eval.batch_size` items.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
import torch

from oikyo_ray.cluster import init_ray
from oikyo_ray.config import OikyoConfig
from oikyo_ray.eval.items import Item, ItemKind
from oikyo_ray.eval.scoring import MODELS, ItemScore, ModelPair, Scoring, score_batch, score_in_process

# items and scores as Ray Dataset rows: one type per column, scores per model in MODELS order
ITEM_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("kind", pa.string()),
        ("prompt", pa.string()),
        ("input_ids", pa.list_(pa.int64())),
        ("labels", pa.list_(pa.int64())),
        ("reference", pa.string()),
        ("tool_call", pa.bool_()),
        ("max_new_tokens", pa.int64()),
        ("probe_kind", pa.string()),
        ("user", pa.string()),
    ]
)


def _item_row(it: Item) -> dict:
    return {**dataclasses.asdict(it), "kind": it.kind.value}


def _item(row: dict) -> Item:
    """An item back from a pandas row (list columns arrive as numpy arrays, ints as numpy ints)."""
    return Item(
        **{
            **row,
            "kind": ItemKind(row["kind"]),
            "input_ids": tuple(np.asarray(row["input_ids"]).tolist()),
            "labels": tuple(np.asarray(row["labels"]).tolist()),
            "max_new_tokens": int(row["max_new_tokens"]),
            "tool_call": bool(row["tool_call"]),
        }
    )


def _score_row(s: ItemScore) -> dict:
    return {"id": s.id, "tokens": s.tokens, "nll": [s.nll[m] for m in MODELS], "text": [s.text[m] for m in MODELS]}


def _score(row: dict) -> ItemScore:
    return ItemScore(
        row["id"],
        int(row["tokens"]),
        dict(zip(MODELS, map(float, row["nll"]))),
        dict(zip(MODELS, map(str, row["text"]))),
    )


class ScoreActor:
    """One model load per actor; scores a pandas batch of items with both models."""

    def __init__(self, cfg: dict, model_path: str, tuned_dir: str):
        self.cfg = OikyoConfig.model_validate(cfg)
        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(self.cfg.eval.cpus_per_actor)))
        self.pair = ModelPair(self.cfg, model_path, tuned_dir)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        items = [_item(r) for r in batch.to_dict("records")]
        return pd.DataFrame([_score_row(s) for s in score_batch(self.pair, items, self.cfg.eval)])


def score_on_ray(cfg: OikyoConfig, model_path: str, tuned_dir: str, items: list[Item]) -> Scoring:
    init_ray()
    ec = cfg.eval
    ds = ray.data.from_arrow(pa.Table.from_pylist([_item_row(it) for it in items], schema=ITEM_SCHEMA))
    # several blocks so every actor gets work (from_arrow makes one block of the whole table)
    ds = ds.repartition(max(1, min(len(items) // ec.batch_size, ec.num_actors * 4)))
    out = ds.map_batches(
        ScoreActor,
        fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"), "model_path": model_path, "tuned_dir": tuned_dir},
        batch_size=ec.batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=ec.num_actors),
        num_cpus=ec.cpus_per_actor,
        num_gpus=ec.gpus_per_actor or None,
    )
    return Scoring("ray", [_score(r) for r in out.take_all()])


def choose_backend(cfg: OikyoConfig, n_items: int) -> str:
    """eval.backend, with auto resolved: Ray when it is running and there are enough items."""
    if cfg.eval.backend != "auto":
        return cfg.eval.backend
    return "ray" if ray.is_initialized() and n_items >= cfg.eval.ray_min_items else "local"


def score(cfg: OikyoConfig, model_path: str, tuned_dir: str, items: list[Item]) -> Scoring:
    """The items scored where `choose_backend` says."""
    on_ray = choose_backend(cfg, len(items)) == "ray"
    return (score_on_ray if on_ray else score_in_process)(cfg, model_path, tuned_dir, items)
