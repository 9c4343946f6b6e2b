"""Parse one data file into (row number, raw row) pairs; file-level faults name file and position.

Row numbers are 1-based: the line in jsonl (blank lines are skipped but counted), the data row
after the header in csv, the index+1 in a JSON array or parquet table. A row that cannot be
decoded in a jsonl file (not UTF-8, invalid JSON, too large to parse) becomes a reject; a file
whose structure is broken (not UTF-8 or truncated JSON array, wrong top-level type, unreadable
parquet/csv) or that holds no rows at all is an error (`DataError`) naming the position.
"""

from __future__ import annotations

import gzip
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


TEXT_SUFFIXES = (".txt", ".txt.gz", ".md")


def is_text(path: str) -> bool:
    """A plain-text corpus file (documents for continued pre-training)."""
    return path.lower().endswith(TEXT_SUFFIXES)


def iter_rows(
    path: str,
    data: bytes,
    max_row_bytes: int | None = None,
    first_row: int = 1,
    whole: bool = True,
    text_split: tuple[str, str] = ("blank_lines", ""),
) -> Iterator[tuple[int, object, str | None]]:
    """Yield (row_number, row, reject_reason); row is BAD when reject_reason is set.

    `max_row_bytes`: jsonl lines longer than this are rejected without being parsed (a bound on
    memory: a line far beyond data.max_chars is never turned into Python objects).
    `first_row`, `whole`: `data` is a line-aligned piece of a jsonl file whose first line is line
    `first_row`; a piece other than the whole file may hold no rows.
    `text_split`: (data.text_split, data.text_separator), how a plain-text file is cut into
    documents (rows ``{"text": ...}`` numbered by the line each starts on; see `text_docs`).
    """
    lower = path.lower()
    if is_text(lower):
        yield from text_docs(path, data, *text_split, first_row=first_row, whole=whole)
    elif is_jsonl(lower):
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
        raise DataError(
            f"{path}: unsupported file type",
            hint="use .json, .jsonl, .parquet, .csv, or .txt/.txt.gz/.md for plain text",
        )


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


def _docs(data: bytes, mode: str, separator: bytes) -> Iterator[tuple[int, bytes]]:
    """(offset in lines, bytes) of each document of a text: see `text_docs`."""
    if mode == "file":
        yield 0, data
        return
    if mode == "separator":
        line = 0
        for piece in data.split(separator):
            yield line, piece
            line += piece.count(b"\n")
        return
    start, doc = 0, list[bytes]()
    for i, ln in enumerate(data.split(b"\n")):
        if mode == "lines" or not ln.strip():
            if doc:
                yield start, b"\n".join(doc)
            start, doc = i + (mode != "lines"), []
        if mode == "lines" or ln.strip():
            doc.append(ln)
    if doc:
        yield start, b"\n".join(doc)


def text_docs(
    path: str, data: bytes, mode: str, separator: str, first_row: int = 1, whole: bool = True
) -> Iterator[tuple[int, object, str | None]]:
    """Documents of a plain-text file as ``{"text": ...}`` rows numbered by their first line:
    `mode` "file" (the whole file), "blank_lines" (paragraphs), "lines" or "separator"; a document
    that is not UTF-8 is a reject naming its line. A .gz file is decompressed first."""
    if path.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable gzip file ({e})", hint="a truncated download?") from None
    if data.startswith(BOM):
        data = data[len(BOM) :]
    seen = not whole
    for line, doc in _docs(data, mode, separator.encode()):
        if not doc.strip():
            continue
        seen = True
        line += doc[: len(doc) - len(doc.lstrip())].count(b"\n")  # a document starts at its first text
        try:
            text = doc.decode("utf-8")
        except UnicodeDecodeError as e:
            at = line + doc[: e.start].count(b"\n") + first_row
            yield first_row + line, BAD, f"not UTF-8 at line {at} ({doc[e.start : e.start + 4]!r}...)"
            continue
        yield first_row + line, {"text": text.strip()}, None
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
