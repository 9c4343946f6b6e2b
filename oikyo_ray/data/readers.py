"""Parse one data file into (row number, raw row) pairs; file-level faults name file and position.

Row numbers are 1-based: the line in jsonl (blank lines are skipped but counted), the data row
after the header in csv, the index+1 in a JSON array or parquet table. A row that cannot be
decoded in a jsonl file (not UTF-8, invalid JSON, too large to parse) becomes a reject; a file
whose structure is broken (not UTF-8 or truncated JSON array, wrong top-level type, unreadable
parquet/csv) or that holds no rows at all is an error (`DataError`) naming the position.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from oikyo_ray.errors import DataError

BAD = object()  # marker: the row's raw text could not be decoded; the reason follows
BOM = b"\xef\xbb\xbf"
HINT_EMPTY = "remove it from data.paths or fill it"


def _decode(data: bytes, path: str) -> str:
    body = data[len(BOM) :] if data.startswith(BOM) else data
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        offset = e.start + (len(data) - len(body))
        raise DataError(
            f"{path}: not UTF-8 at byte {offset} ({body[e.start : e.start + 4]!r}...)",
            hint="re-encode the file as UTF-8",
        ) from None


def _empty(path: str) -> DataError:
    return DataError(f"{path}: empty file (no rows)", hint=HINT_EMPTY)


def is_jsonl(path: str) -> bool:
    return path.lower().endswith((".jsonl", ".ndjson"))


def iter_rows(
    path: str, data: bytes, max_row_bytes: int | None = None, first_row: int = 1, whole: bool = True
) -> Iterator[tuple[int, object, str | None]]:
    """Yield (row_number, row, reject_reason); row is BAD when reject_reason is set.

    `max_row_bytes`: jsonl lines longer than this are rejected without being parsed (a bound on
    memory: a line far beyond data.max_chars is never turned into Python objects).
    `first_row`, `whole`: `data` is a line-aligned piece of a jsonl file whose first line is line
    `first_row`; a piece other than the whole file may hold no rows.
    """
    lower = path.lower()
    if is_jsonl(lower):
        yield from _jsonl(path, data, max_row_bytes, first_row, whole)
    elif lower.endswith(".json"):
        text = _decode(data, path)
        if not text.strip():
            raise _empty(path)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: invalid JSON at line {e.lineno} column {e.colno} (byte {len(text[: e.pos].encode())}): "
                f"{e.msg}",
                hint="a truncated or hand-edited file? one object per line belongs in .jsonl",
            ) from None
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply to parse") from None
        if not isinstance(obj, list):
            raise DataError(
                f"{path}: top level must be a JSON array of rows, got {type(obj).__name__}",
                hint="one object per line belongs in .jsonl",
            )
        if not obj:
            raise _empty(path)
        for i, row in enumerate(obj, start=1):
            yield i, row, None
    elif lower.endswith(".parquet"):
        yield from _table(path, _read_parquet(path, data))
    elif lower.endswith(".csv"):
        yield from _table(path, _read_csv(path, data))
    else:
        raise DataError(f"{path}: unsupported file type", hint="use .json, .jsonl, .parquet or .csv")


def _jsonl(path: str, data: bytes, max_row_bytes: int | None, first_row: int = 1, whole: bool = True):
    if data.startswith(BOM):
        data = data[len(BOM) :]
    seen = not whole
    for i, line in enumerate(data.splitlines(), start=first_row):
        if not line.strip():
            continue
        seen = True
        if max_row_bytes is not None and len(line) > max_row_bytes:
            yield (
                i,
                BAD,
                (
                    f"row is {len(line)} bytes, more than any row within data.max_chars can take "
                    f"({max_row_bytes} bytes); not parsed"
                ),
            )
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield i, BAD, f"not UTF-8 at byte {e.start} of the line ({line[e.start : e.start + 4]!r}...)"
            continue
        try:
            yield i, json.loads(text), None
        except json.JSONDecodeError as e:
            yield i, BAD, f"invalid JSON at column {e.colno}: {e.msg}"
        except RecursionError:
            yield i, BAD, "JSON nested too deeply to parse"
    if not seen:
        raise _empty(path)


def _read_parquet(path: str, data: bytes):
    if not data:
        raise _empty(path)
    try:
        return pq.read_table(io.BytesIO(data))
    except Exception as e:  # ArrowInvalid / OSError with pyarrow's description of the damage
        raise DataError(f"{path}: unreadable parquet: {e}", hint="a truncated or partly written file?") from None


def _read_csv(path: str, data: bytes):
    _decode(data, path)  # names the first non-UTF-8 byte, which pyarrow would not
    if not data.strip(BOM + b" \t\r\n"):
        raise _empty(path)
    try:
        # every column as text: "42" stays the answer "42" and never becomes an int
        names = pacsv.open_csv(io.BytesIO(data)).schema.names
        return pacsv.read_csv(
            io.BytesIO(data), convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names})
        )
    except Exception as e:  # pyarrow raises ArrowInvalid with the line number in the text
        raise DataError(f"{path}: unreadable CSV: {e}") from None


def _table(path: str, table):
    if table.num_rows == 0:
        raise _empty(path)
    for i, row in enumerate(table.to_pylist(), start=1):
        yield i, {k: v for k, v in row.items() if v is not None}, None
