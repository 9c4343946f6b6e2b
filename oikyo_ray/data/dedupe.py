"""The global pass over all accepted rows (Ray-free): duplicates, then leakage across splits.

    filter_table(rows, data, files) -> (GlobalResult, positions of the removed rows)

`rows` is the curated summary of the accepted rows (Arrow columns: source, row, split and the
`quality.row_keys` columns). In order:

  exact duplicates   same `dup_key` (normalised conversation, tools, label): the first occurrence
                     (place in `files`, then row number) is kept (`data.dedupe`);
  near-duplicates    of the rows left, MinHash Jaccard >= `data.near_dup_threshold` with an earlier
                     kept row of the same tools and label;
  exact leakage      of the rows left, the same `prompt_key` (prompt and tools) as a row of an
                     earlier split (test, then val, then train): the later split's copy leaks into
                     the earliest split holding the prompt (`data.leakage`: remove or report);
  near leakage       of the rows not leaked, a prompt MinHash Jaccard >= `data.leakage_threshold`
                     with a row of an earlier split not itself removed.

Exact rules run on numpy keys (`exact`), near rules on an LSH index (`near`), only when their
threshold is set. Every removed row gets a reason naming the row it duplicates or leaks into;
nothing is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from oikyo_ray.data import exact, near
from oikyo_ray.data.columns import keys

DUPLICATE, NEAR_DUPLICATE, LEAKAGE = "duplicate", "near_duplicate", "leakage"  # the rejects' `filter`


@dataclass
class Removal:
    kind: str  # DUPLICATE | NEAR_DUPLICATE | LEAKAGE
    reason: str


@dataclass
class GlobalResult:
    removed: dict[tuple[str, int], Removal] = field(default_factory=dict)  # by (source, row)
    leaks: list[dict] = field(default_factory=list)  # every leaked pair, removed or only reported
    stats: dict = field(default_factory=dict)  # the manifest's "dedupe" and "leakage" counts


class _Pass:
    """The rows, what was removed from them so far, and the result being written."""

    def __init__(self, rows: pa.Table):
        self.rows, self.res = rows, GlobalResult()
        self.removed = np.zeros(rows.num_rows, dtype=bool)

    def key(self, i: int) -> tuple[str, int]:
        return self.rows["source"][i].as_py(), self.rows["row"][i].as_py()

    def ref(self, i: int) -> str:
        source, row = self.key(i)
        return f"{source}:{row}"

    def remove(self, i: int, kind: str, reason: str) -> None:
        self.res.removed[self.key(i)] = Removal(kind, reason)
        self.removed[i] = True

    def left(self, positions: np.ndarray) -> np.ndarray:
        return positions[~self.removed[positions]]


def filter_table(rows: pa.Table, data, files: list[str]) -> tuple[GlobalResult, np.ndarray]:
    """(result, positions in `rows` of the removed rows) for accepted rows (see the module doc)."""
    p = _Pass(rows)
    order = exact.file_order(rows, files)
    dedupe = _duplicates(p, order, data)
    leakage = _leakage(p, p.left(order), data)
    p.res.stats = {"dedupe": dedupe, "leakage": leakage}
    return p.res, np.flatnonzero(p.removed)


def _duplicates(p: _Pass, order: np.ndarray, data) -> dict:
    stats = {"duplicate": 0, "near_duplicate": 0}
    if data.dedupe and len(order):
        first = exact.first_of(keys(p.rows["dup_key"])[order])
        for at in np.flatnonzero(first != np.arange(len(order))):
            p.remove(int(order[at]), DUPLICATE, f"duplicate of {p.ref(int(order[first[at]]))}")
            stats["duplicate"] += 1
    if data.near_dup_threshold is not None:
        left = p.left(order)
        sigs, groups = (p.rows[c].take(left).to_pylist() for c in ("text_sig", "dup_group"))
        for i, other, j in near.near_duplicates(sigs, groups, data.near_dup_threshold, data.minhash_num_perm):
            p.remove(
                int(left[i]),
                NEAR_DUPLICATE,
                f"near-duplicate of {p.ref(int(left[other]))} (estimated Jaccard {j:.2f} >= "
                f"data.near_dup_threshold={data.near_dup_threshold})",
            )
            stats["near_duplicate"] += 1
    return stats


def _leakage(p: _Pass, kept: np.ndarray, data) -> dict:
    """Prompts shared across splits: test is kept, then val; the later split's copy leaks."""
    pairs: dict[str, int] = {}
    out = {
        "action": data.leakage,
        "threshold": data.leakage_threshold,
        "exact": 0,
        "near": 0,
        "removed": 0,
        "pairs": pairs,
    }
    if data.leakage == "off" or not len(kept):
        return out
    rank = exact.split_ranks(p.rows["split"])[kept]
    order = kept[np.argsort(rank, kind="stable")]  # by split, file order within one
    rank = np.sort(rank, kind="stable")
    other = exact.in_earlier_split(keys(p.rows["prompt_key"])[order], rank)
    found = {int(at): (int(order[o]), "exact", "same prompt as") for at, o in enumerate(other) if o >= 0}
    if data.leakage_threshold is not None:
        sigs, groups = (p.rows[c].take(order).to_pylist() for c in ("prompt_sig", "leak_group"))
        for at, o, j in near.near_leaks(
            sigs,
            groups,
            rank,
            other < 0,
            data.leakage_threshold,
            data.minhash_num_perm,
            keep_leaked=data.leakage != "remove",
        ):
            found[at] = (int(order[o]), "near", f"prompt near-duplicate (estimated Jaccard {j:.2f}) of")
    split_of = {v: k for k, v in exact.SPLIT_RANK.items()}
    for at in sorted(found):  # in split order, then file order: the order the rows were read
        i, (o, kind, how) = int(order[at]), found[at]
        split, other_split = split_of[int(rank[at])], p.rows["split"][o].as_py()
        source, row = p.key(i)
        out[kind] += 1
        pair = f"{split}~{other_split}"
        pairs[pair] = pairs.get(pair, 0) + 1
        p.res.leaks.append(
            {"source": source, "row": row, "split": split, "kind": kind, "other": p.ref(o), "other_split": other_split}
        )
        if data.leakage == "remove":
            p.remove(i, LEAKAGE, f"leaks into {other_split}: {how} {p.ref(o)}")
            out["removed"] += 1
    return out
