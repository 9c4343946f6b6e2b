"""The evaluate stage on Ray Data: items -> map_batches over an actor pool -> per-item outputs.

Each actor loads the tokenizer, the base and the fine-tuned model once (`ModelPair`: the adapter
on the base, or a merged/full model beside it) and runs the same `score_batch` as the in-process
path on every batch it receives, so both paths give the same numbers for the same items.

    score_ray(cfg, model_path, tuned_dir, items) -> outputs   (what `compare` summarises)

Pool size, CPU and GPU per actor come from `eval.num_actors`, `eval.cpus_per_actor`,
`eval.gpus_per_actor`; batches hold `eval.batch_size` items.
"""

from __future__ import annotations

import pyarrow as pa

from oikyo_ray.config import OikyoConfig

ITEM_SCHEMA = pa.schema([
    ("id", pa.string()), ("kind", pa.string()), ("prompt", pa.string()), ("input_ids", pa.list_(pa.int64())),
    ("labels", pa.list_(pa.int64())), ("reference", pa.string()), ("tool_call", pa.bool_()),
    ("max_new_tokens", pa.int64()), ("probe_kind", pa.string()), ("user", pa.string()),
])


class ScoreActor:
    """One model load per actor; scores a pandas batch of items with both models."""

    def __init__(self, cfg: dict, model_path: str, tuned_dir: str):
        import torch

        from oikyo_ray.eval.compare import ModelPair

        self.cfg = OikyoConfig.model_validate(cfg)
        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(self.cfg.eval.cpus_per_actor)))
        self.pair = ModelPair(self.cfg, model_path, tuned_dir)

    def __call__(self, batch):
        import pandas as pd

        from oikyo_ray.eval.compare import score_batch

        items = batch.to_dict("records")
        return pd.DataFrame(score_batch(self.pair, items, self.cfg.eval))


def score_ray(cfg: OikyoConfig, model_path: str, tuned_dir: str, items: list[dict]) -> list[dict]:
    import ray

    from oikyo_ray.cluster import init_ray

    init_ray()
    ec = cfg.eval
    ds = ray.data.from_arrow(pa.Table.from_pylist(items, schema=ITEM_SCHEMA))
    # several blocks so every actor gets work (from_arrow makes one block of the whole table)
    ds = ds.repartition(max(1, min(len(items) // ec.batch_size, ec.num_actors * 4)))
    out = ds.map_batches(
        ScoreActor,
        fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"), "model_path": model_path,
                               "tuned_dir": tuned_dir},
        batch_size=ec.batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=ec.num_actors),
        num_cpus=ec.cpus_per_actor,
        num_gpus=ec.gpus_per_actor or None,
    )
    return out.take_all()
