"""Per-file curation: parse -> normalise -> validate -> split -> tokenise, one record per row.

Ray-free: `curate_file` is what the Ray Data pipeline maps over files, and what tests call
directly. Every input row yields exactly one record, accepted or rejected with its reason, so
`accepted + rejected == read` holds by construction.
"""

from __future__ import annotations

import json
from functools import lru_cache

from oikyo_ray.config import DataConfig
from oikyo_ray.data.formats import RowError, to_messages
from oikyo_ray.data.readers import BAD, iter_rows
from oikyo_ray.data.split import assign_split, content_hash
from oikyo_ray.data.tokenize import encode_messages
from oikyo_ray.errors import DataError

FILE_ERROR = "file_error"


@lru_cache(maxsize=4)
def _tokenizer(path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    from oikyo_ray.model.chat_template import ensure_chat_template

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    ensure_chat_template(tok)
    return tok


def _record(source: str, row: int, **kw) -> dict:
    rec = {"source": source, "row": row, "status": "ok", "reason": "", "split": "", "hash": "",
           "messages": "", "input_ids": [], "labels": [], "num_tokens": 0}
    rec.update(kw)
    return rec


def curate_row(raw, data: DataConfig, tokenizer) -> dict:
    """Fields of an accepted row; raises RowError with the reason otherwise."""
    msgs = to_messages(raw, data.format)
    from oikyo_ray.data.validate import validate_messages

    validate_messages(msgs, data.max_chars)
    h = content_hash(msgs)
    try:
        enc = encode_messages(tokenizer, msgs, data.max_length, data.train_on_prompt)
    except ValueError as e:
        raise RowError(str(e)) from None
    return {
        "split": assign_split(h, data.val_fraction, data.test_fraction, data.split_salt),
        "hash": h,
        "messages": json.dumps(msgs, ensure_ascii=False),
        "input_ids": enc["input_ids"],
        "labels": enc["labels"],
        "num_tokens": len(enc["input_ids"]),
    }


def curate_file(source: str, data_bytes: bytes, data: DataConfig, tokenizer) -> list[dict]:
    """All records of one file; a broken file gives a single FILE_ERROR record naming why."""
    out = []
    try:
        for n, raw, reason in iter_rows(source, data_bytes):
            if raw is BAD:
                out.append(_record(source, n, status="reject", reason=reason))
                continue
            try:
                out.append(_record(source, n, **curate_row(raw, data, tokenizer)))
            except RowError as e:
                out.append(_record(source, n, status="reject", reason=str(e)))
    except DataError as e:
        return [_record(source, 0, status=FILE_ERROR, reason=str(e))]
    return out


def curate_batch(batch: dict, data: dict, tokenizer_path: str, trust_remote_code: bool) -> dict:
    """Ray Data `map_batches` UDF over read_binary_files rows (columns: bytes, path)."""
    cfg = DataConfig.model_validate(data)
    tok = _tokenizer(tokenizer_path, trust_remote_code)
    recs = []
    for path, blob in zip(batch["path"], batch["bytes"]):
        recs.extend(curate_file(str(path), bytes(blob), cfg, tok))
    return {k: [r[k] for r in recs] for k in _record("", 0)}
