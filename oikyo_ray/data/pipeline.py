"""The data stage on Ray Data: files -> curated, tokenised parquet splits + rejects + manifest.

    prepare(cfg, tokenizer_path, out_dir) -> manifest dict         (Ray Data)
    prepare_local(cfg, tokenizer_path, out_dir) -> manifest dict   (same result, in-process, no Ray)

Steps: hash the inputs (sha256) and look the result up in the cache; curate every piece (Ray
Data `from_items(pieces)` + `map_batches(curate_pieces)`: big jsonl files are cut at line ends into
~4 MiB pieces, each read by its own task, which writes its rows' summary and its kept rows per
split as parquet parts under ``out_dir/.curated`` (`curate.curate_piece`); read the compact
summary (keys are 16-byte digests, as Arrow columns) on the driver and run the global pass there
(exact and near duplicates, leakage across splits: `exact.filter_table`); take the removed rows
out of the few parts that hold them and move the parts into place. The curated rows are written
once and never cross a process boundary, so driver memory is ~100 bytes a row whatever the
row size (more with MinHash on: the row loop and its LSH index).

Layout written under ``out_dir``: ``train/ val/ test/`` (parquet shards), ``rejects.jsonl`` (source,
row, reason, filter for every rejected row, duplicates and leaked rows included) and
``manifest.json`` (see `manifest`). accepted + rejected == read is asserted.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from oikyo_ray.config import DEMO_DATA, OikyoConfig
from oikyo_ray.data import manifest as mf
from oikyo_ray.data.curate import FILE_ERROR, curate_pieces
from oikyo_ray.data.pieces import plan
from oikyo_ray.errors import DataError
from oikyo_ray.storage import filesystem

SPLITS = mf.SPLITS
IN_MEMORY_SPLIT_BYTES = 256 * 2**20  # splits up to this size skip Ray Data's read stage
SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet", ".csv")
TRAIN_COLUMNS = ["input_ids", "labels"]


def expand_paths(paths: list[str]) -> dict[str, list[str]]:
    """Group concrete file paths by filesystem ('local' or 's3'); globs and dirs are expanded."""
    groups: dict[str, list[str]] = {"local": [], "s3": []}
    for p in paths:
        if p == DEMO_DATA:
            from oikyo_ray.demo.tasks import ASSET

            groups["local"].append(str(ASSET))
        elif p.startswith("s3://"):
            fs, key = filesystem(p)
            info = fs.get_file_info(key)
            if info.type == pafs.FileType.Directory:
                files = fs.get_file_info(pafs.FileSelector(key, recursive=True))
                groups["s3"] += sorted(f.path for f in files
                                       if f.type == pafs.FileType.File and f.path.lower().endswith(SUFFIXES))
            elif info.type == pafs.FileType.File:
                groups["s3"].append(key)
            else:
                raise DataError(f"data file not found: {p}", hint="check data.paths and AWS_ENDPOINT_URL")
        else:
            local = Path(p).expanduser()
            if local.is_dir():  # a directory contributes its data files (a README is no row)
                found = sorted(str(f) for f in local.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
            else:
                found = sorted(glob.glob(str(local)))
            if not found:
                raise DataError(f"data file not found: {p}",
                                hint=f"check data.paths (globs allowed; a directory contributes its "
                                f"{', '.join(SUFFIXES)} files)")
            groups["local"] += [str(Path(f).resolve()) for f in found]
    return {k: v for k, v in groups.items() if v}






# ---- where the per-piece work runs: Ray Data tasks or this process --------------------------------

def _fn_kwargs(cfg: OikyoConfig, tokenizer_path: str, work: Path) -> dict:
    return {"data": cfg.data.model_dump(), "tokenizer_path": tokenizer_path,
            "trust_remote_code": cfg.model.trust_remote_code, "work": str(work)}


def _map_ray(fn, items: list[dict], fn_kwargs: dict) -> None:
    """`fn` over `items`, one Ray Data task per item (each writes its own files)."""
    import ray

    ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        fn, batch_size=1, fn_kwargs=fn_kwargs).take_all()


def _map_local(fn, items: list[dict], fn_kwargs: dict) -> None:
    for it in items:
        fn({k: [v] for k, v in it.items()}, **fn_kwargs)


def _rows_of(column: pa.ChunkedArray) -> list:
    """A list<int64> column as one numpy view per row (no Python ints)."""
    import numpy as np
    import pyarrow.compute as pc

    lists = column.combine_chunks()
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    return np.split(lists.flatten().to_numpy(zero_copy_only=False), np.cumsum(lengths)[:-1]) if len(lists) else []


def _blocks_column(blocks: list, length: int) -> pa.Array:
    """Equal-length numpy blocks as a list<int64> column."""
    import numpy as np

    from oikyo_ray.data.curate import list_column

    flat = np.concatenate(blocks).astype(np.int64, copy=False) if blocks else np.zeros(0, dtype=np.int64)
    return list_column(flat, np.arange(0, len(blocks) * length + 1, length, dtype=np.int32))


def _pack_files(batch: dict, length: int, pad_id: int) -> dict:
    """Packs each train part (`src`) into blocks written to `dst`: one call per curated piece, so
    the blocks do not depend on scheduling."""
    import pyarrow.parquet as pq

    from oikyo_ray.data.packing import pack_rows

    for src, dst in zip(batch["src"], batch["dst"]):
        t = pq.read_table(src, columns=TRAIN_COLUMNS)
        cols = pack_rows(_rows_of(t["input_ids"]), _rows_of(t["labels"]), length, pad_id)
        pq.write_table(pa.table({k: pa.array(v, type=pa.int64()) if k == "num_tokens" else _blocks_column(v, length)
                                 for k, v in cols.items()}), dst)
    return {"dst": list(batch["dst"])}


# ---- the stage ---------------------------------------------------------------------------------------

def prepare(cfg: OikyoConfig, tokenizer_path: str, out_dir: Path) -> dict:
    """Run the curation pipeline on Ray Data; raise DataError naming the file when a file is unusable."""
    return _prepare(cfg, tokenizer_path, Path(out_dir), _map_ray)


def prepare_local(cfg: OikyoConfig, tokenizer_path: str, out_dir: Path) -> dict:
    """`prepare` without Ray, in this process (small data, tests, machines without Ray)."""
    return _prepare(cfg, tokenizer_path, Path(out_dir), _map_local)


def _prepare(cfg: OikyoConfig, tokenizer_path: str, out_dir: Path, run) -> dict:
    data = cfg.data
    inputs, pieces = plan(expand_paths(data.paths))
    key = mf.cache_key(inputs, data, tokenizer_path, cfg.model.trust_remote_code)
    cache = cache_dir(cfg) / key if data.cache else None
    if cache is not None and (cache / "manifest.json").is_file():
        return _restore(cache, out_dir)

    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / ".curated"
    shutil.rmtree(work, ignore_errors=True)
    try:
        run(curate_pieces, pieces, _fn_kwargs(cfg, tokenizer_path, work))
        manifest = _write_outputs(work, cfg, tokenizer_path, out_dir, inputs, key, run)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if cache is not None:
        _store(out_dir, cache)
    return manifest


def _read_summary(work: Path) -> pa.Table:
    """Every row's summary (in no particular order: the caller sorts by piece and row)."""
    import pyarrow.parquet as pq

    table = pq.read_table(str(work / "summary"), read_dictionary=["source", "status", "filter", "split", "meta_tags"])
    return table.unify_dictionaries().combine_chunks()


def _drop_rows(work: Path, ok: pa.Table, removed_at) -> None:
    """Take removed rows out of the split parts that hold them (a part holds, in row order, the
    kept rows of one piece and split)."""
    import numpy as np
    import pyarrow.parquet as pq

    from oikyo_ray.data.curate import part_name
    from oikyo_ray.data.exact import codes

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


def _write_outputs(work: Path, cfg: OikyoConfig, tokenizer_path: str, out_dir: Path, inputs: list[dict],
                   key: str, run) -> dict:
    """The global pass over the curated summary, then rejects, splits, packed blocks, manifest."""
    import numpy as np
    import pyarrow.compute as pc

    from oikyo_ray.data.exact import filter_table

    data = cfg.data
    files = [i["path"] for i in inputs]
    summary = _read_summary(work)
    status = summary["status"].cast(pa.string())
    bad_files = summary.filter(pc.equal(status, FILE_ERROR))
    if bad_files.num_rows:
        raise DataError("\n".join(bad_files["reason"].to_pylist()), hint="fix or remove the file(s) from data.paths")

    ok = summary.filter(pc.equal(status, "ok"))
    ok = ok.take(np.lexsort((ok["row"].to_numpy(), ok["piece"].to_numpy())))
    result, removed_at = filter_table(ok, data, files)
    rejects = summary.filter(pc.equal(status, "reject")).select(["source", "row", "reason", "filter"])
    rejects = rejects.cast(_plain(rejects.schema)).to_pylist()
    rejects += [{"source": s, "row": n, "reason": d.reason, "filter": d.kind} for (s, n), d in result.removed.items()]
    rejects.sort(key=lambda r: (r["source"], r["row"]))
    keep = np.ones(ok.num_rows, dtype=bool)
    keep[removed_at] = False
    kept = ok.filter(pa.array(keep))
    assert kept.num_rows + len(rejects) == summary.num_rows, (kept.num_rows, len(rejects), summary.num_rows)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)  # no stale manifest beside new outputs
    for split in (*SPLITS, mf.PACKED):
        shutil.rmtree(out_dir / split, ignore_errors=True)  # never mix in shards of an earlier run
    _write_text(out_dir / "rejects.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    if not pc.sum(pc.equal(kept["split"].cast(pa.string()), "train")).as_py():
        raise DataError(
            f"no usable training rows ({len(rejects)} of {summary.num_rows} rejected; see {out_dir / 'rejects.jsonl'})",
            hint="check data.format and the rejects file (oikyo data inspect)",
        )
    _drop_rows(work, ok, removed_at)
    for split in SPLITS:
        (out_dir / split).mkdir(parents=True, exist_ok=True)  # an empty split is an empty directory
        for f in sorted((work / split).glob("*.parquet")):
            os.replace(f, out_dir / split / f.name)
    if data.packing:
        (out_dir / mf.PACKED).mkdir(parents=True)
        items = [{"src": str(f), "dst": str(out_dir / mf.PACKED / f.name)}
                 for f in sorted((out_dir / "train").glob("*.parquet"))]
        run(_pack_files, items, {"length": data.block_length, "pad_id": _pad_id(tokenizer_path, cfg)})

    manifest = mf.build(inputs=inputs, summary=summary, kept=kept, rejects=rejects, stats=result.stats,
                        leaks=result.leaks, data=data, tokenizer_path=tokenizer_path, key=key, out_dir=out_dir)
    if data.packing:
        manifest["packing"] = packing_report(out_dir, data.block_length, cfg.train.batch_size, cfg.train.seed)
    _write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2))
    return manifest


def _plain(schema: pa.Schema) -> pa.Schema:
    """`schema` with dictionary columns as their value type (for code that wants plain strings)."""
    return pa.schema([pa.field(f.name, f.type.value_type if pa.types.is_dictionary(f.type) else f.type)
                      for f in schema])


def _pad_id(tokenizer_path: str, cfg: OikyoConfig) -> int:
    from oikyo_ray.data.curate import _tokenizer

    tok = _tokenizer(tokenizer_path, cfg.model.trust_remote_code)
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def packing_report(out_dir: Path, length: int, batch_size: int, seed: int) -> dict:
    """Blocks, rows and the non-pad token share packed vs right-padded batches of the same rows
    (shuffled with the training seed, as the loader would)."""
    import numpy as np
    import pyarrow.parquet as pq

    from oikyo_ray.data.packing import efficiency, padded_efficiency

    def column(split: str, name: str) -> list[int]:
        d = out_dir / split
        return pq.read_table(str(d), columns=[name])[name].to_pylist() if any(d.glob("*.parquet")) else []

    blocks, rows = column(mf.PACKED, "num_tokens"), column("train", "num_tokens")
    shuffled = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]
    return {"length": length, "rows": len(rows), "blocks": len(blocks),
            "efficiency": round(efficiency(blocks, length), 4),
            "padded_efficiency": round(padded_efficiency(shuffled, batch_size), 4), "padded_batch_size": batch_size}


# ---- cache ---------------------------------------------------------------------------------------

def cache_dir(cfg: OikyoConfig) -> Path:
    return Path(cfg.model.cache_dir).expanduser() / "data"


def _write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename: atomic, and never writes through a hard link into
    the cache (outputs and cache entries share parquet shards as hard links)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _link_or_copy(src: str, dst: str) -> None:
    """Parquet shards are hard-linked (never rewritten in place); other files are copied."""
    Path(dst).unlink(missing_ok=True)
    if not src.endswith(".parquet"):
        shutil.copy2(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _store(out_dir: Path, cache: Path) -> None:
    """Copy a finished dataset into the cache atomically (a half-written entry is never seen)."""
    tmp = cache.parent / f".tmp-{cache.name}-{uuid.uuid4().hex[:8]}"
    cache.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(out_dir, tmp, copy_function=_link_or_copy)
    try:
        os.replace(tmp, cache)
    except OSError:  # another run stored the same key first
        shutil.rmtree(tmp, ignore_errors=True)


def _restore(cache: Path, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in [*SPLITS, mf.PACKED, "rejects.jsonl"]:
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        src = cache / name
        if src.is_dir():
            shutil.copytree(src, target, copy_function=_link_or_copy)
        elif src.is_file():
            _link_or_copy(str(src), str(target))
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["cache"].update({"hit": True, "dir": str(cache)})
    _write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2))
    return manifest


# ---- readers of a prepared dataset -----------------------------------------------------------------

def read_split(data_dir: Path, split: str, packed: bool = False):
    """A prepared split as a Ray Dataset of TRAIN_COLUMNS (streamed to workers); `packed`: the
    train split's packed blocks (packing.PACKED_COLUMNS) instead."""
    import ray

    from oikyo_ray.data.packing import PACKED_COLUMNS

    columns = PACKED_COLUMNS if packed else TRAIN_COLUMNS
    split = mf.PACKED if packed else split
    files = sorted((data_dir / split).glob("*.parquet"))
    if sum(f.stat().st_size for f in files) <= IN_MEMORY_SPLIT_BYTES:
        # Small splits go to the object store straight from here: Ray Data's file listing task
        # wants a whole CPU (fixed in Ray 2.60), which training workers and sweep trials that
        # hold the cluster's CPUs would otherwise starve forever.
        import pyarrow.parquet as pq

        return ray.data.from_arrow(pq.ParquetDataset([str(f) for f in files]).read(columns=columns))
    return ray.data.read_parquet(str(data_dir / split), columns=columns, num_cpus=0.25)


def load_split_rows(data_dir: Path, split: str) -> list[dict]:
    """A prepared split read in-process (for small eval sets), sorted by content hash."""
    import pyarrow.parquet as pq

    d = data_dir / split
    if not any(d.glob("*.parquet")):
        return []
    rows = pq.read_table(str(d)).to_pylist()
    return sorted(rows, key=lambda r: r["hash"])
