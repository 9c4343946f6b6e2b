"""A prepared dataset's splits, read in this process (Ray-free; small splits such as eval sets).

Layout (see `prepare`): ``<dir>/<split>/*.parquet`` for train, val, test and ``train_packed``;
an empty split is an empty directory.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

TRAIN_COLUMNS = ["input_ids", "labels"]  # what training reads of a split


def split_files(data_dir: Path, split: str) -> list[Path]:
    """The parquet shards of a split, in name order ([] for an empty split)."""
    return sorted((Path(data_dir) / split).glob("*.parquet"))


def read_column(data_dir: Path, split: str, name: str) -> list:
    """One column of a split as a list ([] for an empty split)."""
    files = split_files(data_dir, split)
    return pq.read_table(str(Path(data_dir) / split), columns=[name])[name].to_pylist() if files else []


def load_split_rows(data_dir: Path, split: str) -> list[dict]:
    """A split's rows, sorted by content hash."""
    if not split_files(data_dir, split):
        return []
    rows = pq.read_table(str(Path(data_dir) / split)).to_pylist()
    return sorted(rows, key=lambda r: r["hash"])
