"""Arrow columns to and from numpy without a Python object per row (Ray-free).

The data stage keeps per-row values (16-byte keys, split names, token ids) as Arrow columns and
numpy arrays: a million rows cost megabytes this way, where Python objects would cost a gigabyte.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

KEY_BYTES = 16


def keys(col: pa.ChunkedArray) -> np.ndarray:
    """A binary column of 16-byte digests as a numpy S16 array."""
    arr = col.combine_chunks()
    if len(arr) == 0:
        return np.empty(0, dtype=f"S{KEY_BYTES}")
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
    if not (np.diff(offsets) == KEY_BYTES).all():
        raise ValueError("keys must be 16-byte digests")
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data.view(f"S{KEY_BYTES}")


def codes(col: pa.ChunkedArray) -> tuple[list, np.ndarray]:
    """(distinct values, each row's index into them) of a (dictionary-encoded or plain) column."""
    arr = col.combine_chunks()
    if not pa.types.is_dictionary(arr.type):
        arr = pc.dictionary_encode(arr)
    return arr.dictionary.to_pylist(), arr.indices.to_numpy(zero_copy_only=False)


def list_column(flat, offsets) -> pa.Array:
    """A list<int64> column from its flat values and row offsets (numpy arrays or buffers): built
    this way it costs a copy, where pa.array on nested lists is ~7x slower."""
    return pa.ListArray.from_arrays(
        pa.array(np.frombuffer(offsets, dtype=np.int32)), pa.array(np.frombuffer(flat, dtype=np.int64))
    )


def list_rows(column: pa.ChunkedArray) -> list[np.ndarray]:
    """A list<int64> column as one numpy view per row."""
    lists = column.combine_chunks()
    if not len(lists):
        return []
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    return np.split(lists.flatten().to_numpy(zero_copy_only=False), np.cumsum(lengths)[:-1])


def blocks_column(blocks: list[np.ndarray], length: int) -> pa.Array:
    """Equal-length numpy blocks as a list<int64> column."""
    flat = np.concatenate(blocks).astype(np.int64, copy=False) if blocks else np.zeros(0, dtype=np.int64)
    return list_column(flat, np.arange(0, len(blocks) * length + 1, length, dtype=np.int32))


def plain(schema: pa.Schema) -> pa.Schema:
    """`schema` with dictionary columns as their value type (for code that wants plain strings)."""
    return pa.schema(
        [pa.field(f.name, f.type.value_type if pa.types.is_dictionary(f.type) else f.type) for f in schema]
    )
