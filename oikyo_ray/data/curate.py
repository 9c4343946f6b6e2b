"""Per-file curation: parse -> normalise -> validate -> filter -> split -> tokenise, one record per row.

Ray-free: `prepare` maps `curate_pieces` over pieces of the input files (in this process, or
one Ray Data task per piece from `ray_data`); `curate_file` curates a whole file in memory.
Every input row yields exactly one record, accepted (Status.OK) or rejected (Status.REJECT) with
its reason and `filter` (the check that rejected it), so `accepted + rejected == read` holds by
construction. A file that cannot be read at all gives one Status.FILE_ERROR record naming why.

Accepted records also carry the keys and MinHash signatures the global pass (duplicates,
near-duplicates, leakage across splits; see `dedupe`) needs, so that pass never re-reads the data.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from array import array
from collections.abc import Iterator
from enum import Enum
from functools import lru_cache
from itertools import islice

import pyarrow as pa
import pyarrow.parquet as pq
from jinja2 import TemplateError
from transformers import AutoTokenizer

from oikyo_ray.config import DataConfig
from oikyo_ray.data.columns import list_column
from oikyo_ray.data.formats import RowError, normaliser
from oikyo_ray.data.manifest import SPLITS, meta_tags
from oikyo_ray.data.pieces import read_piece
from oikyo_ray.data.quality import row_filters, row_keys
from oikyo_ray.data.readers import BAD, is_text, iter_rows
from oikyo_ray.data.split import assign_split, content_hash
from oikyo_ray.data.tokenize import NoRoom, encode_messages, encode_preference
from oikyo_ray.data.validate import validate_messages
from oikyo_ray.errors import DataError
from oikyo_ray.model.chat_template import ensure_chat_template


class Status(str, Enum):
    """What became of an input row: the records' and the summary's `status` column."""

    OK = "ok"
    REJECT = "reject"
    FILE_ERROR = "file_error"  # the file could not be read at all (also the record's `filter`)


KEY = pa.binary()  # 16-byte digests (keys) and MinHash signatures: compact on the driver
SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("row", pa.int64()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("filter", pa.string()),
        ("split", pa.string()),
        ("hash", pa.string()),
        ("messages", pa.string()),
        ("meta", pa.string()),
        ("meta_tags", pa.string()),
        ("no_room", pa.bool_()),  # a preference row whose prompt leaves no room for the answers
        ("input_ids", pa.list_(pa.int64())),
        ("labels", pa.list_(pa.int64())),
        # preference rows (a `rejected` answer or a KTO `label`): the prompt once, then each response
        ("prompt_ids", pa.list_(pa.int64())),
        ("chosen_ids", pa.list_(pa.int64())),
        ("rejected_ids", pa.list_(pa.int64())),
        ("desirable", pa.int8()),  # KTO label: 1 desirable, 0 undesirable, -1 none
        ("num_tokens", pa.int64()),
        ("full_tokens", pa.int64()),
        ("digest", KEY),
        ("dup_key", KEY),
        ("dup_group", KEY),
        ("leak_group", KEY),
        ("prompt_key", KEY),
        ("text_sig", KEY),
        ("prompt_sig", KEY),
    ]
)
# what the global pass and the manifest need: no token ids, no texts (`digest` stands for a
# kept row's content in the manifest's content hash)
SUMMARY_COLUMNS = [
    "source",
    "row",
    "status",
    "reason",
    "filter",
    "split",
    "meta_tags",
    "no_room",
    "num_tokens",
    "full_tokens",
    "digest",
    "dup_key",
    "dup_group",
    "leak_group",
    "prompt_key",
    "text_sig",
    "prompt_sig",
]
# columns of the written splits
OUTPUT_COLUMNS = [
    "hash",
    "messages",
    "meta",
    "input_ids",
    "labels",
    "prompt_ids",
    "chosen_ids",
    "rejected_ids",
    "desirable",
    "num_tokens",
]
TOKEN_COLUMNS = ("input_ids", "labels", "prompt_ids", "chosen_ids", "rejected_ids")
NO_LABEL = -1  # `desirable` of a row without a KTO label


@lru_cache(maxsize=4)
def _tokenizer(path: str, trust_remote_code: bool):
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    ensure_chat_template(tok)
    return tok


_DEFAULTS = {
    "status": Status.OK,
    "reason": "",
    "filter": "",
    "split": "",
    "hash": "",
    "messages": "",
    "meta": "{}",
    "meta_tags": "",
    "no_room": False,
    "input_ids": (),
    "labels": (),
    "prompt_ids": (),
    "chosen_ids": (),
    "rejected_ids": (),
    "desirable": NO_LABEL,
    "num_tokens": 0,
    "full_tokens": 0,
    "digest": b"",
    "dup_key": b"",
    "dup_group": b"",
    "leak_group": b"",
    "prompt_key": b"",
    "text_sig": b"",
    "prompt_sig": b"",
}


def _record(source: str, row: int, **kw) -> dict:
    return {"source": source, "row": row, **_DEFAULTS, **kw}


def max_row_bytes(data: DataConfig) -> int:
    """No row whose text is within max_chars is longer than this as a JSON line (a character is
    at most 12 bytes escaped, as a surrogate pair), plus 1 MiB for keys and metadata."""
    return 12 * data.max_chars + (1 << 20)


def curate_row(raw, data: DataConfig, tokenizer, norm=None, fmt: str | None = None) -> dict:
    """Fields of an accepted row; raises RowError (with `kind`) with the reason otherwise. `fmt`
    overrides data.format (rows of a plain-text file are text whatever the setting)."""
    msgs, meta, ignored = (norm or normaliser(data)).read(raw, fmt or data.format)
    validate_messages(msgs, data.max_chars, meta)
    row_filters(msgs, meta, data)
    h = content_hash(msgs)
    try:
        enc = encode_messages(
            tokenizer, msgs, data.max_length, data.train_on_prompt, meta.get("tools"), data.train_on_reasoning
        )
    except TemplateError as e:
        raise RowError(f"the chat template refused the conversation: {e}", kind="template") from None
    except ValueError as e:
        raise RowError(str(e), kind="tokenize") from None
    pref, fits = _preference_columns(msgs, meta, data, tokenizer)
    # compact int64 arrays: a row's ids as Python ints would cost 36 bytes each until written
    ids, labels = array("q", enc["input_ids"]), array("q", enc["labels"])
    meta_json = json.dumps(meta, ensure_ascii=False, sort_keys=True)
    split = assign_split(h, data.val_fraction, data.test_fraction, data.split_salt)
    # what the row contributes to the manifest's content hash: content, split, tokens, metadata
    digest = hashlib.blake2b(f"{h}\0{split}\0{meta_json}\0".encode(), digest_size=16)
    digest.update(ids)  # ids and labels are equally long int64 arrays: no separator needed
    digest.update(labels)
    digest.update(array("q", [len(pref[c]) for c in PREF_IDS] + [pref["desirable"]]))  # where each part ends
    for c in PREF_IDS:
        digest.update(pref[c])
    return {
        "split": split,
        "hash": h,
        "messages": json.dumps(msgs, ensure_ascii=False),
        "meta": meta_json,
        "meta_tags": meta_tags(meta, ignored),
        "no_room": not fits,
        "input_ids": ids,
        "labels": labels,
        "num_tokens": len(ids),
        "full_tokens": enc["full_length"],
        **pref,
        "digest": digest.digest(),
        **row_keys(msgs, meta, data),
    }


PREF_IDS = ("prompt_ids", "chosen_ids", "rejected_ids")


def _preference_columns(msgs: list[dict], meta: dict, data: DataConfig, tokenizer) -> tuple[dict, bool]:
    """(preference columns, whether they fit) of a row: tokenised prompt and responses for a pair
    or a KTO row (whatever the objective: one prepared dataset serves SFT and preference runs),
    empty otherwise. A prompt that leaves no room for the answers within data.max_length keeps
    the row (SFT may still learn its earlier turns) with empty columns and `no_room` set:
    preference training skips it, and the manifest counts it per file."""
    label = meta.get("label")
    out: dict = {c: array("q") for c in PREF_IDS}
    out["desirable"] = NO_LABEL if label is None else int(label)
    if "rejected" not in meta and label is None:
        return out, True
    try:
        enc = encode_preference(tokenizer, msgs, meta.get("rejected"), data.max_length, tools=meta.get("tools"))
    except NoRoom:
        return out, False
    except TemplateError as e:
        raise RowError(f"the chat template refused the conversation: {e}", kind="template") from None
    except ValueError as e:
        raise RowError(str(e), kind="tokenize") from None
    out.update({c: array("q", enc[c]) for c in PREF_IDS})
    return out, True


def iter_records(
    source: str, data_bytes: bytes, data: DataConfig, tokenizer, first_row: int = 1, whole: bool = True
) -> Iterator[dict]:
    """The records of one file (or of a line-aligned piece of a jsonl file starting at line
    `first_row`), one per row; a file that cannot be read at all ends with a FILE_ERROR record
    naming why (files are checked before their first row is given, so it comes alone)."""
    norm = normaliser(data)
    fmt = "text" if is_text(source) else None
    split = (data.text_split, data.text_separator)
    try:
        for n, raw, reason in iter_rows(source, data_bytes, max_row_bytes(data), first_row, whole, split):
            if raw is BAD:
                reason = reason or ""
                kind = (
                    "not_utf8"
                    if reason.startswith("not UTF-8")
                    else "too_long"
                    if reason.startswith("row is ")
                    else "invalid_json"
                )
                yield _record(source, n, status=Status.REJECT, reason=reason, filter=kind)
                continue
            try:
                yield _record(source, n, **curate_row(raw, data, tokenizer, norm, fmt))
            except RowError as e:
                yield _record(source, n, status=Status.REJECT, reason=str(e), filter=e.kind)
    except DataError as e:
        reason = e.args[0] + (f" ({e.hint})" if e.hint else "")
        yield _record(source, 0, status=Status.FILE_ERROR, reason=reason, filter=Status.FILE_ERROR)


def curate_file(
    source: str, data_bytes: bytes, data: DataConfig, tokenizer, first_row: int = 1, whole: bool = True
) -> list[dict]:
    """All records of `iter_records`; a broken file gives its single FILE_ERROR record."""
    recs = list(iter_records(source, data_bytes, data, tokenizer, first_row, whole))
    return recs[-1:] if recs and recs[-1]["status"] == Status.FILE_ERROR else recs


def _tokens(lists: list) -> pa.Array:
    """Rows of token ids (int64 arrays) as a list<int64> column."""
    flat, offsets = array("q"), array("i", [0])
    for ids in lists:
        flat.extend(ids)
        offsets.append(len(flat))
    return list_column(flat, offsets)


def to_table(records: list[dict], columns: list[str] | None = None) -> pa.Table:
    """Records (or `columns` of them) as an Arrow table of SCHEMA's types."""
    names = columns or SCHEMA.names
    arrays = [
        _tokens([r[n] for r in records])
        if n in TOKEN_COLUMNS
        else pa.array([r[n] for r in records], type=SCHEMA.field(n).type)
        for n in names
    ]
    return pa.Table.from_arrays(arrays, schema=pa.schema([SCHEMA.field(n) for n in names]))


CHUNK_ROWS = 2048  # records converted and written at a time by `curate_piece`


def part_name(index: int) -> str:
    """File name of piece `index`'s part in every directory of the work area (ordered, stable)."""
    return f"part-{index:05d}.parquet"


def curate_piece(piece: dict, data: DataConfig, tokenizer, work: str) -> int:
    """Curate one piece and write its parts under `work`: `summary/` (every row, SUMMARY_COLUMNS
    and the piece's index) and `<split>/` (kept rows, OUTPUT_COLUMNS); returns the rows read.
    Writing here, in the task, means the curated rows cross no process boundary and are written once."""
    name = part_name(int(piece["index"]))
    records = iter_records(
        str(piece["path"]), read_piece(piece), data, tokenizer, int(piece["first_row"]), bool(piece["whole"])
    )
    writers: dict[str, pq.ParquetWriter] = {}

    def write(where: str, table: pa.Table) -> None:
        if where not in writers:
            os.makedirs(f"{work}/{where}", exist_ok=True)
            writers[where] = pq.ParquetWriter(f"{work}/{where}/{name}", table.schema)
        writers[where].write_table(table)

    read = 0
    try:
        # a chunk at a time: records never pile up, which keeps the task's memory flat and its
        # allocator warm (a piece held whole ran ~1.5x slower)
        while chunk := list(islice(records, CHUNK_ROWS)):
            read += len(chunk)
            summary = to_table(chunk, SUMMARY_COLUMNS)
            write("summary", summary.append_column("piece", pa.array([piece["index"]] * len(chunk), pa.int32())))
            for split in SPLITS:
                rows = [r for r in chunk if r["status"] == Status.OK and r["split"] == split]
                if rows:
                    write(split, to_table(rows, OUTPUT_COLUMNS))
    finally:
        for w in writers.values():
            w.close()
    return read


@lru_cache(maxsize=1)
def _freeze_heap() -> None:
    """Once per worker, after the imports and the tokenizer: move the ~450k objects they made out
    of the garbage collector's reach. Curation allocates millions of short-lived objects, and each
    full collection would otherwise walk all of them again (up to ~15% of a task's time here)."""
    gc.freeze()


def curate_pieces(batch: dict, data: dict, tokenizer_path: str, trust_remote_code: bool, work: str) -> dict:
    """A map UDF over a batch of pieces of input files (columns of `pieces.plan`'s pieces): each
    call reads its own byte ranges and writes its own parts (`curate_piece`)."""
    # a conversation is a handful of short texts: the tokenizer's thread pool costs more than it
    # saves, and the pipeline already runs a task per core
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = DataConfig.model_validate(data)
    tok = _tokenizer(tokenizer_path, trust_remote_code)
    _freeze_heap()
    pieces = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
    return {"index": [p["index"] for p in pieces], "rows": [curate_piece(p, cfg, tok, work) for p in pieces]}
