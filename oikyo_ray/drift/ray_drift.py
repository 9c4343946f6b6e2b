"""The Ray layer of `oikyo drift`: the live side summarized by Ray Data where the captured rows
are (one partial `Side` per batch, merged on the driver), so weeks of traffic never pass through
one process whole.

    report = drift(cfg, root, model, live=live_side)
"""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import ray
from ray.data.datasource import Partitioning, PathPartitionFilter

from oikyo_ray.drift.check import Side, prompt_text, summarize
from oikyo_ray.runs import store

SAMPLE_PER_BATCH = 64  # prompts a batch hands back for the perplexity sample


class Summarize:
    """A Ray Data UDF: a batch of captured rows -> one row holding its partial `Side`."""

    def __init__(self, load_tokenizer):
        self.tokenizer = load_tokenizer()  # loaded in the actor: a tokenizer is too big an argument

    def __call__(self, batch: dict) -> dict:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        texts = [prompt_text(r) for r in rows]
        side = summarize(texts, self.tokenizer)
        sample = random.Random(len(texts)).sample(texts, min(len(texts), SAMPLE_PER_BATCH))
        return {
            "n": [side.n],
            "lengths": [side.lengths],
            "unigrams": [side.unigrams.tolist() if side.unigrams is not None else []],
            "unknown": [side.unknown],
            "tokens": [side.tokens],
            "letters": [json.dumps(dict(side.letters))],
            "sample": [sample],
        }


def live_side(completions: str, model: str, first_day: str, load_tokenizer) -> tuple[Side, list[str]]:
    fs, path = store.filesystem(completions)
    if not store.exists(completions):
        return Side(), []
    # partitions are filtered on their paths: other models' and older days' files are never read
    wanted = PathPartitionFilter.of(lambda d: d.get("model") == model and d.get("date", "") >= first_day)
    ds = ray.data.read_parquet(
        path,
        filesystem=fs,
        partition_filter=wanted,
        partitioning=Partitioning("hive", field_types={"model": str, "date": str, "version": str}),
        file_extensions=["parquet"],
    )
    total, sample = Side(), []
    parts = ds.map_batches(
        Summarize,
        fn_constructor_args=(load_tokenizer,),
        # Ray Data keeps an actor pool's constructor arguments in the object store and warns that a
        # restarted actor may not find them; a report whose worker dies is simply run again
        max_restarts=0,
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_format="numpy",
    )
    for part in parts.iter_rows():
        side = Side(
            int(part["n"]),
            [int(x) for x in part["lengths"]],
            np.asarray(part["unigrams"], dtype=np.int64) if len(part["unigrams"]) else None,
            int(part["unknown"]),
            int(part["tokens"]),
            Counter(json.loads(part["letters"])),
        )
        total = total + side
        sample.extend(str(t) for t in part["sample"])
    return total, sample
