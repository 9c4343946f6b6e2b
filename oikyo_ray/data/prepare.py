"""The data stage (Ray-free): files -> curated, tokenised parquet splits + rejects + manifest.

    prepare(cfg, tokenizer_path, out_dir, run_map=map_in_process) -> manifest dict

Steps: hash the inputs (sha256) and look the result up in the cache (`cache`); curate every
piece (big jsonl files are cut at line ends into ~4 MiB pieces, `pieces.plan`): each call of
`curate.curate_pieces` writes its rows' summary and its kept rows per split as parquet parts
under ``out_dir/.curated``; read the compact summary (keys are 16-byte digests, as Arrow
columns) here and run the global pass (exact and near duplicates, leakage across splits:
`dedupe.filter_table`); take the removed rows out of the few parts that hold them and move the
parts into place. The curated rows are written once and never cross a process boundary, so this
process holds ~100 bytes a row whatever the row size (more with MinHash on: the signatures and
their LSH index).

`run_map(fn, items, fn_kwargs)` calls `fn(batch, **fn_kwargs)` once per item, the item as a
one-row batch of columns; each call writes its own files. `map_in_process` (the default) runs
them here, `ray_data.prepare` runs one Ray Data task per item; the outputs are the same, byte
for byte.

Layout written under ``out_dir``: ``train/ val/ test/`` (parquet shards), ``rejects.jsonl`` (source,
row, reason, filter for every rejected row, duplicates and leaked rows included) and
``manifest.json`` (see `manifest`). accepted + rejected == read is asserted.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from oikyo_ray.config import OikyoConfig
from oikyo_ray.data import cache
from oikyo_ray.data import manifest as mf
from oikyo_ray.data.columns import codes, plain
from oikyo_ray.data.curate import Status, _tokenizer, curate_pieces, part_name
from oikyo_ray.data.dedupe import filter_table
from oikyo_ray.data.packing import pack_files, packing_report
from oikyo_ray.data.paths import expand_paths
from oikyo_ray.data.pieces import plan
from oikyo_ray.data.prepared import split_files
from oikyo_ray.errors import DataError

MapFn = Callable[[Callable[..., dict], list[dict], dict], None]


def map_in_process(fn: Callable[..., dict], items: list[dict], fn_kwargs: dict) -> None:
    """`fn` over `items` in this process, one call per item."""
    for it in items:
        fn({k: [v] for k, v in it.items()}, **fn_kwargs)


def prepare(cfg: OikyoConfig, tokenizer_path: str, out_dir: Path, run_map: MapFn = map_in_process) -> dict:
    """Curate, dedupe, split and tokenise `cfg.data` into `out_dir`; returns the manifest. Raises
    DataError naming the file when a file is unusable."""
    data, out_dir = cfg.data, Path(out_dir)
    inputs, pieces = plan(expand_paths(data.paths), text_split=data.text_split)
    key = mf.cache_key(inputs, data, tokenizer_path, cfg.model.trust_remote_code)
    entry = cache.cache_dir(cfg) / key if data.cache else None
    if entry is not None and (entry / "manifest.json").is_file():
        return cache.restore(entry, out_dir)

    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / ".curated"
    shutil.rmtree(work, ignore_errors=True)
    try:
        run_map(
            curate_pieces,
            pieces,
            {
                "data": data.model_dump(),
                "tokenizer_path": tokenizer_path,
                "trust_remote_code": cfg.model.trust_remote_code,
                "work": str(work),
            },
        )
        manifest = _write_outputs(work, cfg, tokenizer_path, out_dir, inputs, key, run_map)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if entry is not None:
        cache.store(out_dir, entry)
    return manifest


def _read_summary(work: Path) -> pa.Table:
    """Every row's summary (in no particular order: the caller sorts by piece and row)."""
    table = pq.read_table(str(work / "summary"), read_dictionary=["source", "status", "filter", "split", "meta_tags"])
    return table.unify_dictionaries().combine_chunks()


def _drop_rows(work: Path, ok: pa.Table, removed_at: np.ndarray) -> None:
    """Take removed rows out of the split parts that hold them (a part holds, in row order, the
    kept rows of one piece and split)."""
    names, split = codes(ok["split"])
    piece, row = ok["piece"].to_numpy(), ok["row"].to_numpy()
    gone_piece, gone_split = piece[removed_at], split[removed_at]
    for p, s in sorted(set(zip(gone_piece.tolist(), gone_split.tolist()))):
        in_part = np.flatnonzero((piece == p) & (split == s))
        gone = removed_at[(gone_piece == p) & (gone_split == s)]
        keep = np.ones(len(in_part), dtype=bool)
        keep[np.searchsorted(row[in_part], row[gone])] = False
        path = work / names[s] / part_name(p)
        table = pq.read_table(path).filter(pa.array(keep))
        path.unlink()
        if table.num_rows:
            pq.write_table(table, path)


def _write_outputs(
    work: Path, cfg: OikyoConfig, tokenizer_path: str, out_dir: Path, inputs: list[dict], key: str, run_map: MapFn
) -> dict:
    """The global pass over the curated summary, then rejects, splits, packed blocks, manifest."""
    data = cfg.data
    files = [i["path"] for i in inputs]
    summary = _read_summary(work)
    status = summary["status"].cast(pa.string())
    bad_files = summary.filter(pc.equal(status, Status.FILE_ERROR))
    if bad_files.num_rows:
        raise DataError("\n".join(bad_files["reason"].to_pylist()), hint="fix or remove the file(s) from data.paths")

    ok = summary.filter(pc.equal(status, Status.OK))
    ok = ok.take(np.lexsort((ok["row"].to_numpy(), ok["piece"].to_numpy())))
    result, removed_at = filter_table(ok, data, files)
    rejects = summary.filter(pc.equal(status, Status.REJECT)).select(["source", "row", "reason", "filter"])
    rejects = rejects.cast(plain(rejects.schema)).to_pylist()
    rejects += [{"source": s, "row": n, "reason": d.reason, "filter": d.kind} for (s, n), d in result.removed.items()]
    rejects.sort(key=lambda r: (r["source"], r["row"]))
    keep = np.ones(ok.num_rows, dtype=bool)
    keep[removed_at] = False
    kept = ok.filter(pa.array(keep))
    assert kept.num_rows + len(rejects) == summary.num_rows, (kept.num_rows, len(rejects), summary.num_rows)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)  # no stale manifest beside new outputs
    for split in (*mf.SPLITS, mf.PACKED):
        shutil.rmtree(out_dir / split, ignore_errors=True)  # never mix in shards of an earlier run
    cache.write_text(out_dir / "rejects.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    if not pc.sum(pc.equal(kept["split"].cast(pa.string()), "train")).as_py():
        raise DataError(
            f"no usable training rows ({len(rejects)} of {summary.num_rows} rejected; see {out_dir / 'rejects.jsonl'})",
            hint="check data.format and the rejects file (oikyo data inspect)",
        )
    _drop_rows(work, ok, removed_at)
    for split in mf.SPLITS:
        (out_dir / split).mkdir(parents=True, exist_ok=True)  # an empty split is an empty directory
        for f in split_files(work, split):
            os.replace(f, out_dir / split / f.name)
    if data.packing:
        (out_dir / mf.PACKED).mkdir(parents=True)
        items = [{"src": str(f), "dst": str(out_dir / mf.PACKED / f.name)} for f in split_files(out_dir, "train")]
        run_map(pack_files, items, {"length": data.block_length, "pad_id": _pad_id(tokenizer_path, cfg)})

    manifest = mf.build(
        inputs=inputs,
        summary=summary,
        kept=kept,
        rejects=rejects,
        stats=result.stats,
        leaks=result.leaks,
        data=data,
        tokenizer_path=tokenizer_path,
        key=key,
        out_dir=out_dir,
    )
    if data.packing:
        manifest["packing"] = packing_report(out_dir, data.block_length, cfg.train.batch_size, cfg.train.seed)
    cache.write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2))
    return manifest


def _pad_id(tokenizer_path: str, cfg: OikyoConfig) -> int:
    tok = _tokenizer(tokenizer_path, cfg.model.trust_remote_code)
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
