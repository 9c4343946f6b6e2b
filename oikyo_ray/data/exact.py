"""Exact matches among accepted rows, on numpy arrays of their 16-byte keys (Ray-free).

Sorting and `np.unique` decide equal keys without a Python object per row, so the exact part of
the global pass (`dedupe`) costs ~40 MB of keys at a million rows. Positions here index the
caller's arrays, which hold the rows in the order the rule reads them (file order, or split then
file order).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from oikyo_ray.data.columns import codes

SPLIT_RANK = {"test": 0, "val": 1, "train": 2}  # a leak is the later split's copy


def file_order(rows: pa.Table, files: list[str]) -> np.ndarray:
    """Row positions in (place in `files`, source, row) order: the order first occurrences win in."""
    names, idx = codes(rows["source"])
    rank = {s: i for i, s in enumerate(files)}
    position = np.empty(len(names), dtype=np.int64)
    position[sorted(range(len(names)), key=lambda i: (rank.get(names[i], len(rank)), names[i]))] = np.arange(len(names))
    return np.lexsort((rows["row"].to_numpy(), position[idx]))


def split_ranks(col: pa.ChunkedArray) -> np.ndarray:
    """Each row's SPLIT_RANK (test 0, val 1, train 2)."""
    names, idx = codes(col)
    # a filtered dictionary column keeps the values of the rows filtered out (rejects: no split)
    return np.array([SPLIT_RANK.get(s, -1) for s in names], dtype=np.int8)[idx]


def first_of(keys: np.ndarray) -> np.ndarray:
    """For each position, the first position holding the same key (itself for a first occurrence)."""
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)]


def in_earlier_split(keys: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """For each position (sorted by `rank`), the first position of the earliest lower rank holding
    the same key; -1 where no earlier split holds it."""
    other = np.full(len(keys), -1, dtype=np.int64)
    for r in np.unique(rank)[:-1]:  # earliest split first: the one leaked into is the earliest
        in_r = np.flatnonzero(rank == r)
        uniq, first = np.unique(keys[in_r], return_index=True)
        later = np.flatnonzero((rank > r) & (other < 0))
        at = np.searchsorted(uniq, keys[later]).clip(max=len(uniq) - 1)
        found = uniq[at] == keys[later]
        other[later[found]] = in_r[first[at[found]]]
    return other
