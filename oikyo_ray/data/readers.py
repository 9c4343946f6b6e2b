"""Parse one data file into (row number, raw row) pairs; file-level faults name file and position.

Row numbers are 1-based: the line in jsonl/csv (csv: data rows after the header), the index+1 in a
JSON array or parquet table. A row that cannot be decoded in a line-oriented file becomes a
reject; a file whose structure is broken (truncated JSON array, wrong top-level type) is an error.
"""

from __future__ import annotations

import io
import json
from typing import Iterator

from oikyo_ray.errors import DataError

BAD = object()  # marker: the row's raw text could not be decoded; the reason follows


def _decode(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 at byte {e.start}", hint="re-encode the file as UTF-8") from None


def iter_rows(path: str, data: bytes) -> Iterator[tuple[int, object, str | None]]:
    """Yield (row_number, row, reject_reason); row is BAD when reject_reason is set."""
    lower = path.lower()
    if lower.endswith((".jsonl", ".ndjson")):
        for i, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line.decode("utf-8")), None
            except UnicodeDecodeError as e:
                yield i, BAD, f"not UTF-8 at byte {e.start} of the line"
            except json.JSONDecodeError as e:
                yield i, BAD, f"invalid JSON at column {e.colno}: {e.msg}"
    elif lower.endswith(".json"):
        text = _decode(data, path)
        if not text.strip():
            raise DataError(f"{path}: empty file", hint="remove it from data.paths or fill it")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}",
                hint="a truncated or hand-edited file? one object per line belongs in .jsonl",
            ) from None
        if not isinstance(obj, list):
            raise DataError(f"{path}: top level must be a JSON array of rows, got {type(obj).__name__}")
        for i, row in enumerate(obj, start=1):
            yield i, row, None
    elif lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(io.BytesIO(data)).to_pylist(), start=1):
            yield i, row, None
    elif lower.endswith(".csv"):
        import pyarrow.csv as pacsv

        try:
            table = pacsv.read_csv(io.BytesIO(data))
        except Exception as e:  # pyarrow raises ArrowInvalid with the line number in the text
            raise DataError(f"{path}: unreadable CSV: {e}") from None
        for i, row in enumerate(table.to_pylist(), start=1):
            yield i, {k: v for k, v in row.items() if v is not None}, None
    else:
        raise DataError(f"{path}: unsupported file type", hint="use .json, .jsonl, .parquet or .csv")
