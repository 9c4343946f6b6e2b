"""The data stage on Ray Data: what of it needs Ray (the Ray-free stage is `prepare`).

prepare(cfg, tokenizer_path, out_dir) -> manifest   `prepare.prepare`, one Ray Data task per piece
read_split(data_dir, split, ...) -> ray.data.Dataset   a prepared split, streamed to workers
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from oikyo_ray.config import OikyoConfig
from oikyo_ray.console import progress
from oikyo_ray.data import prepare as preparation
from oikyo_ray.data.manifest import PACKED
from oikyo_ray.data.packing import PACKED_COLUMNS
from oikyo_ray.data.prepared import TRAIN_COLUMNS, split_files

IN_MEMORY_SPLIT_BYTES = 256 * 2**20  # splits up to this size skip Ray Data's read stage


def map_tasks(fn: Callable[..., dict], items: list[dict], fn_kwargs: dict) -> None:
    """`fn` over `items`, one Ray Data task per item (each writes its own files); with more than
    one item, a progress bar counts the finished ones (Ray Data's own bars are off: see cluster.py)."""
    done = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(fn, batch_size=1, fn_kwargs=fn_kwargs)
    if len(items) == 1:
        done.take_all()
        return
    with progress(len(items), f"data: {getattr(fn, '__name__', 'tasks')}", unit="task") as bar:
        for _ in done.iter_batches(batch_size=None):
            bar.update(1)


def prepare(cfg: OikyoConfig, tokenizer_path: str, out_dir: Path) -> dict:
    """The data stage with every piece curated (and packed) by its own Ray Data task."""
    return preparation.prepare(cfg, tokenizer_path, out_dir, run_map=map_tasks)


def read_split(
    data_dir: Path, split: str, packed: bool = False, columns: list[str] | None = None, fitting: bool = False
) -> ray.data.Dataset:
    """A prepared split as a Ray Dataset of `columns` (default TRAIN_COLUMNS); `packed`: the train
    split's packed blocks (PACKED_COLUMNS) instead; `fitting`: only the rows whose preference
    answers fit data.max_length (curate.py leaves the others' ids empty), what preference
    objectives train on."""
    columns = PACKED_COLUMNS if packed else (columns or TRAIN_COLUMNS)
    split = PACKED if packed else split
    files = split_files(data_dir, split)
    # filtered while read, so every worker's shard holds the rows it trains on (equal shards)
    has = lambda c: pc.list_value_length(pc.field(c)) > 0  # noqa: E731
    where = {"filters": has("prompt_ids") & has("chosen_ids")} if fitting else {}
    if sum(f.stat().st_size for f in files) <= IN_MEMORY_SPLIT_BYTES:
        # Small splits go to the object store straight from here: Ray Data's file listing task
        # wants a whole CPU (fixed in Ray 2.60), which training workers and sweep trials that
        # hold the cluster's CPUs would otherwise starve forever.
        return ray.data.from_arrow(pq.ParquetDataset([str(f) for f in files], **where).read(columns=columns))
    filt = {"filter": where["filters"]} if where else {}
    return ray.data.read_parquet(str(Path(data_dir) / split), columns=columns, num_cpus=0.25, **filt)
