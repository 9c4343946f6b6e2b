"""A worker's in-memory shard as epochs of batches (Ray-free): the same batches in the same order on
every run, whatever order the rows streamed in, so a resumed run sees what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from oikyo_ray.config import TrainConfig
from oikyo_ray.train.loop import collate, shuffled_batches
from oikyo_ray.train.objective import PAIR_COLUMNS


def row_key(row: dict) -> bytes:
    """A row's content (its token ids; a preference row's prompt and answers), to sort rows
    independently of their arrival order."""
    if "input_ids" in row:
        return np.asarray(row["input_ids"], dtype=np.int64).tobytes()
    # a -1 between the parts: the same tokens split differently are different rows
    parts = [np.asarray(row[k], dtype=np.int64) for k in PAIR_COLUMNS]
    sep = np.array([-1], dtype=np.int64)
    return np.concatenate([parts[0], sep, parts[1], sep, parts[2], [row.get("desirable", -1)]]).tobytes()


def sorted_rows(batches: Iterable[dict]) -> list[dict]:
    """The rows of column batches (dict of arrays), sorted by content."""
    rows = [dict(zip(b, vals)) for b in batches for vals in zip(*b.values())]
    rows.sort(key=row_key)
    return rows


def cached_epochs(
    read: Callable[[], Iterable[dict]],
    cfg: TrainConfig,
    pad: int,
    to_device: Callable[[dict], dict],
    collate_rows: Callable[[dict, int], dict[str, torch.Tensor]] = collate,
) -> Callable[[int], Iterator[dict[str, torch.Tensor]]]:
    """epoch -> batches collated by `collate_rows` (the objective's); `read()` yields the shard's
    column batches and is called once, on the first epoch; each epoch reshuffles with train.seed + epoch."""
    rows: list[dict] = []

    def epochs(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        if not rows:
            rows.extend(sorted_rows(read()))
        for b in shuffled_batches(rows, cfg.batch_size, cfg.seed + epoch):
            yield to_device(collate_rows(b, pad))

    return epochs
