"""Split input files into pieces the data stage curates in parallel (Ray-free).

A jsonl file larger than PIECE_BYTES is cut at line ends into pieces of about that size, each
knowing the line number it starts at, so row numbers in rejects stay those of the file and a
1M-row file is curated by every core instead of one. The cut points are found in the same
streamed pass that hashes the file for the manifest. Plain-text files split into documents on
lines or blank lines are cut the same way (at a blank line for paragraphs). Other formats (a JSON array, csv with
quoted newlines, parquet) are one piece per file.
"""

from __future__ import annotations

import hashlib

import pyarrow.fs as pafs

from oikyo_ray.data.readers import is_jsonl, is_text
from oikyo_ray.storage import filesystem

PIECE_BYTES = 4 * 2**20  # ~20k alpaca rows: enough pieces to keep every core of a node busy
READ_BYTES = 2**20


def scan_file(read, sep: bytes | None, piece_bytes: int = PIECE_BYTES) -> tuple[str, int, list[tuple[int, int, int]]]:
    """(sha256, size, [(start, end, first_row)]) of a stream given its read(n); one piece unless
    `sep` (b"\n" or b"\n\n"), whose pieces end with it (a row longer than a piece stays whole)."""
    h, size = hashlib.sha256(), 0
    pieces: list[tuple[int, int, int]] = []
    start, row = 0, 1  # where the current piece starts
    done, lines = 0, 0  # bytes and lines of the current piece up to its last newline seen
    pending = b""  # bytes read after that newline
    while chunk := read(READ_BYTES):
        h.update(chunk)
        size += len(chunk)
        if not sep:
            continue
        data = pending + chunk
        while True:
            j = data.find(sep, max(piece_bytes - done - len(sep), 0))
            if j < 0:
                break
            end = j + len(sep)
            lines += len(data[:end].splitlines())
            pieces.append((start, start + done + end, row))
            start, row, done, lines = start + done + end, row + lines, 0, 0
            data = data[end:]
        cut = data.rfind(b"\n") + 1
        lines += len(data[:cut].splitlines())
        done += cut
        pending = data[cut:]
    if start < size or not pieces:
        pieces.append((start, size, row))
    return h.hexdigest(), size, pieces


def filesystem_of(kind: str):
    """The pyarrow filesystem of an input group ('local' or 's3')."""
    return filesystem("s3://x")[0] if kind == "s3" else pafs.LocalFileSystem()


def read_piece(piece: dict) -> bytes:
    """The bytes of one piece ({kind, path, start, end}), read from its filesystem."""
    fs = filesystem_of(piece["kind"])
    start, end = int(piece["start"]), int(piece["end"])
    with fs.open_input_file(piece["path"]) as f:
        return f.read_at(end - start, start) if end > start else b""


def separator(path: str, text_split: str = "blank_lines") -> bytes | None:
    """Where a file may be cut between rows: jsonl lines, text documents split on lines or blank
    lines; None (one piece) for other formats, gzip, and text read whole or on a separator."""
    if is_jsonl(path):
        return b"\n"
    if is_text(path) and not path.lower().endswith(".gz"):
        return {"lines": b"\n", "blank_lines": b"\n\n"}.get(text_split)
    return None


def plan(
    groups: dict[str, list[str]], piece_bytes: int | None = None, text_split: str = "blank_lines"
) -> tuple[list[dict], list[dict]]:
    """(inputs for the manifest: [{path, sha256, bytes}], pieces: [{index, kind, path, start, end,
    first_row, whole}]) of every input file, each streamed once and never held whole."""
    inputs: list[dict] = []
    pieces: list[dict] = []
    for kind, files in groups.items():
        fs = filesystem_of(kind)
        for path in files:
            with fs.open_input_stream(path) as f:
                digest, size, cuts = scan_file(f.read, separator(path, text_split), piece_bytes or PIECE_BYTES)
            inputs.append({"path": path, "sha256": digest, "bytes": size})
            pieces += [
                {
                    "index": len(pieces) + i,
                    "kind": kind,
                    "path": path,
                    "start": s,
                    "end": e,
                    "first_row": r,
                    "whole": len(cuts) == 1,
                }
                for i, (s, e, r) in enumerate(cuts)
            ]
    return inputs, pieces
