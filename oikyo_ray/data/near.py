"""Near matches among accepted rows: MinHash signatures in an LSH index (`datasketch`, Ray-free).

Signatures come from `quality.signature` (word 3-grams of the normalised text, pinned scheme and
seed); two rows match when their estimated Jaccard similarity is at or above the threshold and
they share a group (same tools, and for duplicates the same label). Positions index the
caller's lists, which hold the rows in the order the rule reads them.
"""

from __future__ import annotations

import numpy as np
from datasketch import LeanMinHash, MinHashLSH

from oikyo_ray.data.quality import SCHEME, SEED


class LSHIndex:
    """Rows added so far; `match` returns the most similar one at or above the threshold."""

    def __init__(self, threshold: float, num_perm: int):
        self.threshold, self.num_perm = threshold, num_perm
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.sigs: dict[int, tuple[np.ndarray, bytes]] = {}

    def _signature(self, sig_bytes: bytes) -> np.ndarray:
        sig = np.frombuffer(sig_bytes, dtype="<u4")
        if len(sig) != self.num_perm:
            raise ValueError(f"MinHash signature has {len(sig)} values, expected {self.num_perm}")
        return sig

    def match(self, sig_bytes: bytes, group: bytes) -> tuple[int, float] | None:
        """(position, estimated Jaccard) of the most similar row of `group`, the earliest on ties."""
        sig = self._signature(sig_bytes)
        best = None
        for key in self.lsh.query(LeanMinHash(seed=SEED, hashvalues=sig, scheme=SCHEME)):
            other, other_group = self.sigs[key]
            if other_group != group:
                continue
            j = float(np.mean(sig == other))
            if j >= self.threshold and (best is None or (j, -key) > (best[1], -best[0])):
                best = (key, j)
        return best

    def add(self, key: int, sig_bytes: bytes, group: bytes) -> None:
        sig = self._signature(sig_bytes)
        self.sigs[key] = (sig, group)
        self.lsh.insert(key, LeanMinHash(seed=SEED, hashvalues=sig, scheme=SCHEME))


def near_duplicates(
    sigs: list[bytes], groups: list[bytes], threshold: float, num_perm: int
) -> list[tuple[int, int, float]]:
    """(position, kept position it nearly duplicates, estimated Jaccard) for each row, in order,
    that is a near-duplicate of an earlier row that was itself kept."""
    index = LSHIndex(threshold, num_perm)
    found = []
    for i, (sig, group) in enumerate(zip(sigs, groups)):
        hit = index.match(sig, group)
        if hit is None:
            index.add(i, sig, group)
        else:
            found.append((i, *hit))
    return found


def near_leaks(
    sigs: list[bytes],
    groups: list[bytes],
    rank: np.ndarray,
    check: np.ndarray,
    threshold: float,
    num_perm: int,
    keep_leaked: bool,
) -> list[tuple[int, int, float]]:
    """(position, earlier-split position, estimated Jaccard) for each row to `check` whose prompt
    nearly equals one of an earlier split (rows sorted by `rank`). A split's rows are indexed once
    it is done; rows found leaked (unchecked rows are already leaked) stay out of the index unless
    `keep_leaked` (leaks only reported, nothing removed)."""
    index = LSHIndex(threshold, num_perm)
    found: list[tuple[int, int, float]] = []
    pending: list[int] = []  # rows of the current split, indexed when it ends
    current = None
    for i in range(len(sigs)):
        if rank[i] != current:
            for p in pending:
                index.add(p, sigs[p], groups[p])
            pending, current = [], rank[i]
        hit = index.match(sigs[i], groups[i]) if check[i] else None
        if hit is not None:
            found.append((i, *hit))
        if keep_leaked or (check[i] and hit is None):
            pending.append(i)
    return found
