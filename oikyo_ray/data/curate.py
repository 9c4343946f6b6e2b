"""Per-file curation: parse -> normalise -> validate -> filter -> split -> tokenise, one record per row.

Ray-free: `curate_file` is what the Ray Data pipeline maps over file pieces (`curate_pieces`),
and what tests call directly. Every input row yields exactly one record, accepted ("ok") or rejected ("reject") with
its reason and `filter` (the check that rejected it), so `accepted + rejected == read` holds by
construction. A file that cannot be read at all gives one FILE_ERROR record naming why.

Accepted records also carry the keys and MinHash signatures the global pass (duplicates,
near-duplicates, leakage across splits; see `quality.global_filter`) needs, so that pass never
re-reads the data.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache

import pyarrow as pa

from oikyo_ray.config import DataConfig
from oikyo_ray.data.formats import RowError, normaliser
from oikyo_ray.data.manifest import meta_tags
from oikyo_ray.data.quality import row_filters, row_keys
from oikyo_ray.data.readers import BAD, iter_rows
from oikyo_ray.data.split import assign_split, content_hash
from oikyo_ray.data.tokenize import encode_messages
from oikyo_ray.data.validate import validate_messages
from oikyo_ray.errors import DataError

FILE_ERROR = "file_error"

SCHEMA = pa.schema([
    ("source", pa.string()), ("row", pa.int64()), ("status", pa.string()), ("reason", pa.string()),
    ("filter", pa.string()), ("split", pa.string()), ("hash", pa.string()), ("messages", pa.string()),
    ("meta", pa.string()), ("meta_sha", pa.string()), ("meta_tags", pa.string()),
    ("input_ids", pa.list_(pa.int64())), ("labels", pa.list_(pa.int64())),
    ("num_tokens", pa.int64()), ("full_tokens", pa.int64()), ("tokens_sha", pa.string()),
    ("dup_key", pa.string()), ("dup_group", pa.string()), ("leak_group", pa.string()),
    ("prompt_key", pa.string()), ("text_sig", pa.binary()), ("prompt_sig", pa.binary()),
])
# what the global pass and the manifest need: no token ids, no texts
SUMMARY_COLUMNS = ["source", "row", "status", "reason", "filter", "split", "hash", "meta_sha", "meta_tags",
                   "num_tokens", "full_tokens", "tokens_sha", "dup_key", "dup_group", "leak_group", "prompt_key",
                   "text_sig", "prompt_sig"]
# columns of the written splits
OUTPUT_COLUMNS = ["hash", "messages", "meta", "input_ids", "labels", "num_tokens"]


@lru_cache(maxsize=4)
def _tokenizer(path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    from oikyo_ray.model.chat_template import ensure_chat_template

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    ensure_chat_template(tok)
    return tok


def _record(source: str, row: int, **kw) -> dict:
    rec = {"source": source, "row": row, "status": "ok", "reason": "", "filter": "", "split": "", "hash": "",
           "messages": "", "meta": "{}", "meta_sha": "", "meta_tags": "", "input_ids": [], "labels": [],
           "num_tokens": 0, "full_tokens": 0,
           "tokens_sha": "", "dup_key": "", "dup_group": "", "leak_group": "", "prompt_key": "",
           "text_sig": b"", "prompt_sig": b""}
    rec.update(kw)
    return rec


def max_row_bytes(data: DataConfig) -> int:
    """No row whose text is within max_chars is longer than this as a JSON line (a character is
    at most 12 bytes escaped, as a surrogate pair), plus 1 MiB for keys and metadata."""
    return 12 * data.max_chars + (1 << 20)


def curate_row(raw, data: DataConfig, tokenizer, norm=None) -> dict:
    """Fields of an accepted row; raises RowError (with `kind`) with the reason otherwise."""
    from jinja2 import TemplateError

    msgs, meta = (norm or normaliser(data)).normalise(raw, data.format)
    validate_messages(msgs, data.max_chars, meta)
    row_filters(msgs, meta, data)
    h = content_hash(msgs)
    try:
        enc = encode_messages(tokenizer, msgs, data.max_length, data.train_on_prompt, tools=meta.get("tools"))
    except TemplateError as e:
        raise RowError(f"the chat template refused the conversation: {e}", kind="template") from None
    except ValueError as e:
        raise RowError(str(e), kind="tokenize") from None
    ids = enc["input_ids"]
    meta_json = json.dumps(meta, ensure_ascii=False, sort_keys=True)
    return {
        "split": assign_split(h, data.val_fraction, data.test_fraction, data.split_salt),
        "hash": h,
        "messages": json.dumps(msgs, ensure_ascii=False),
        "meta": meta_json,
        "meta_sha": hashlib.sha256(meta_json.encode()).hexdigest()[:16],
        "meta_tags": meta_tags(meta),
        "input_ids": ids,
        "labels": enc["labels"],
        "num_tokens": len(ids),
        "full_tokens": enc["full_length"],
        "tokens_sha": hashlib.sha256(json.dumps([ids, enc["labels"]]).encode()).hexdigest(),
        **row_keys(msgs, meta, data),
    }


def curate_file(source: str, data_bytes: bytes, data: DataConfig, tokenizer, first_row: int = 1,
                whole: bool = True) -> list[dict]:
    """All records of one file (or of a line-aligned piece of a jsonl file starting at line
    `first_row`); a broken file gives a single FILE_ERROR record naming why."""
    out = []
    norm = normaliser(data)
    try:
        for n, raw, reason in iter_rows(source, data_bytes, max_row_bytes(data), first_row, whole):
            if raw is BAD:
                kind = "not_utf8" if reason.startswith("not UTF-8") else \
                    "too_long" if reason.startswith("row is ") else "invalid_json"
                out.append(_record(source, n, status="reject", reason=reason, filter=kind))
                continue
            try:
                out.append(_record(source, n, **curate_row(raw, data, tokenizer, norm)))
            except RowError as e:
                out.append(_record(source, n, status="reject", reason=str(e), filter=e.kind))
    except DataError as e:
        reason = e.args[0] + (f" ({e.hint})" if e.hint else "")
        return [_record(source, 0, status=FILE_ERROR, reason=reason, filter=FILE_ERROR)]
    return out


def to_table(records: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=SCHEMA)


def curate_pieces(batch: dict, data: dict, tokenizer_path: str, trust_remote_code: bool) -> pa.Table:
    """Ray Data `map_batches` UDF over pieces of input files (columns of `pieces.Piece`): each
    worker reads its own byte range, so no process ever holds more than a piece."""
    from oikyo_ray.data.pieces import read_piece

    # a conversation is a handful of short texts: the tokenizer's thread pool costs more than it
    # saves, and the pipeline already runs a task per core
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = DataConfig.model_validate(data)
    tok = _tokenizer(tokenizer_path, trust_remote_code)
    recs = []
    for piece in (dict(zip(batch, vals)) for vals in zip(*batch.values())):
        blob = read_piece(piece)
        recs.extend(curate_file(str(piece["path"]), blob, cfg, tok, int(piece["first_row"]), bool(piece["whole"])))
    return to_table(recs)
