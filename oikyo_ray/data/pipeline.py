"""The data stage on Ray Data: files -> curated, tokenised parquet splits + rejects + manifest.

    prepare(cfg, tokenizer_path, out_dir) -> manifest dict         (Ray Data)
    prepare_local(cfg, tokenizer_path, out_dir) -> manifest dict   (same result, in-process, no Ray)

Steps: hash the inputs (sha256) and look the result up in the cache; curate every file (Ray Data
`from_items(pieces)` + `map_batches(curate_pieces)`: big jsonl files are cut at line ends into
~4 MiB pieces, each read by its own task; one record per row, accepted or rejected);
collect the small per-row summary on the driver and run the global pass there (exact and near
duplicates, leakage across splits: `quality.global_filter`); write what is kept per split.

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
from oikyo_ray.data.curate import FILE_ERROR, OUTPUT_COLUMNS, SCHEMA, SUMMARY_COLUMNS, curate_pieces
from oikyo_ray.data.pieces import plan
from oikyo_ray.data.quality import global_filter
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






# ---- curation backends: records for every row, then the kept rows written per split ---------------

def _fn_kwargs(cfg: OikyoConfig, tokenizer_path: str) -> dict:
    return {"data": cfg.data.model_dump(), "tokenizer_path": tokenizer_path,
            "trust_remote_code": cfg.model.trust_remote_code}


def _split_rows(batch: pa.Table, split: str, removed: frozenset) -> pa.Table:
    """Rows of `batch` kept in `split`, as the written columns."""
    import pyarrow.compute as pc

    mask = pc.and_(pc.equal(batch["status"], "ok"), pc.equal(batch["split"], split))
    if removed:
        keep = [f"{s}\0{r}" not in removed for s, r in zip(batch["source"].to_pylist(), batch["row"].to_pylist())]
        mask = pc.and_(mask, pa.array(keep, type=pa.bool_()))
    return batch.filter(mask).select(OUTPUT_COLUMNS)


def _pack_table(batch: pa.Table, length: int, pad_id: int) -> pa.Table:
    """Tokenised rows -> packed blocks (packing.PACKED_COLUMNS)."""
    from oikyo_ray.data.packing import pack_rows

    cols = pack_rows(batch["input_ids"].to_pylist(), batch["labels"].to_pylist(), length, pad_id)
    return pa.table({k: pa.array(v, type=pa.int64() if k == "num_tokens" else pa.list_(pa.int64()))
                     for k, v in cols.items()})


class _RayCuration:
    """Curated records go to parquet under `work` as each task finishes (Ray's object store holds
    only blocks in flight, so memory stays flat as the data grows); the summary and the splits
    are read back from there."""

    def __init__(self, pieces: list[dict], cfg: OikyoConfig, tokenizer_path: str, work: Path):
        import ray

        self.work = work
        shutil.rmtree(work, ignore_errors=True)
        # one piece per task, read by the task itself: big jsonl files spread over every core
        ds = ray.data.from_items(pieces, override_num_blocks=len(pieces))
        ds.map_batches(curate_pieces, batch_size=1, fn_kwargs=_fn_kwargs(cfg, tokenizer_path)).write_parquet(str(work))

    def summary(self) -> list[dict]:
        import pyarrow.parquet as pq

        return pq.read_table(str(self.work), columns=SUMMARY_COLUMNS).to_pylist()

    def _rows(self, split: str, removed: frozenset):
        import ray

        return ray.data.read_parquet(str(self.work)).map_batches(
            _split_rows, batch_format="pyarrow", batch_size=None, fn_kwargs={"split": split, "removed": removed})

    def write_split(self, split: str, removed: frozenset, out: Path) -> None:
        self._rows(split, removed).write_parquet(str(out))

    def write_packed(self, removed: frozenset, out: Path, length: int, pad_id: int) -> None:
        # one call per block of curated rows (a piece of a file): deterministic blocks
        self._rows("train", removed).map_batches(_pack_table, batch_format="pyarrow", batch_size=None,
                                                 fn_kwargs={"length": length, "pad_id": pad_id}).write_parquet(str(out))

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


class _LocalCuration:
    def __init__(self, pieces: list[dict], cfg: OikyoConfig, tokenizer_path: str, work: Path):
        from oikyo_ray.data.curate import _tokenizer, curate_file
        from oikyo_ray.data.pieces import read_piece

        tok = _tokenizer(tokenizer_path, cfg.model.trust_remote_code)
        self.records = []
        for p in pieces:
            self.records.extend(curate_file(p["path"], read_piece(p), cfg.data, tok, p["first_row"], p["whole"]))

    def summary(self) -> list[dict]:
        return [{k: r[k] for k in SUMMARY_COLUMNS} for r in self.records]

    def write_split(self, split: str, removed: frozenset, out: Path) -> None:
        import pyarrow.parquet as pq

        table = _split_rows(pa.Table.from_pylist(self.records, schema=SCHEMA), split, removed)
        if table.num_rows:
            out.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, out / "part-00000.parquet")

    def write_packed(self, removed: frozenset, out: Path, length: int, pad_id: int) -> None:
        import pyarrow.parquet as pq

        table = _split_rows(pa.Table.from_pylist(self.records, schema=SCHEMA), "train", removed)
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(_pack_table(table, length, pad_id), out / "part-00000.parquet")

    def close(self) -> None:
        pass


# ---- the stage ---------------------------------------------------------------------------------------

def prepare(cfg: OikyoConfig, tokenizer_path: str, out_dir: Path) -> dict:
    """Run the curation pipeline on Ray Data; raise DataError naming the file when a file is unusable."""
    return _prepare(cfg, tokenizer_path, Path(out_dir), _RayCuration)


def prepare_local(cfg: OikyoConfig, tokenizer_path: str, out_dir: Path) -> dict:
    """`prepare` without Ray, in this process (small data, tests, machines without Ray)."""
    return _prepare(cfg, tokenizer_path, Path(out_dir), _LocalCuration)


def _prepare(cfg: OikyoConfig, tokenizer_path: str, out_dir: Path, backend) -> dict:
    data = cfg.data
    inputs, pieces = plan(expand_paths(data.paths))
    key = mf.cache_key(inputs, data, tokenizer_path, cfg.model.trust_remote_code)
    cache = cache_dir(cfg) / key if data.cache else None
    if cache is not None and (cache / "manifest.json").is_file():
        return _restore(cache, out_dir)

    out_dir.mkdir(parents=True, exist_ok=True)
    cur = backend(pieces, cfg, tokenizer_path, out_dir / ".curated")
    try:
        manifest = _write_outputs(cur, cfg, tokenizer_path, out_dir, inputs, key)
    finally:
        cur.close()
    if cache is not None:
        _store(out_dir, cache)
    return manifest


def _write_outputs(cur, cfg: OikyoConfig, tokenizer_path: str, out_dir: Path, inputs: list[dict], key: str) -> dict:
    """The global pass over the curated records, then rejects, splits, packed blocks, manifest."""
    data = cfg.data
    files = [i["path"] for i in inputs]
    summary = cur.summary()
    bad_files = [r for r in summary if r["status"] == FILE_ERROR]
    if bad_files:
        raise DataError("\n".join(r["reason"] for r in bad_files), hint="fix or remove the file(s) from data.paths")

    accepted = [r for r in summary if r["status"] == "ok"]
    result = global_filter(accepted, data, files)
    rejects = [{"source": r["source"], "row": r["row"], "reason": r["reason"], "filter": r["filter"]}
               for r in summary if r["status"] == "reject"]
    rejects += [{"source": s, "row": n, "reason": d.reason, "filter": d.kind} for (s, n), d in result.removed.items()]
    rejects.sort(key=lambda r: (r["source"], r["row"]))
    kept = [r for r in accepted if (r["source"], r["row"]) not in result.removed]
    assert len(kept) + len(rejects) == len(summary), (len(kept), len(rejects), len(summary))  # nothing lost

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)  # no stale manifest beside new outputs
    for split in (*SPLITS, mf.PACKED):
        shutil.rmtree(out_dir / split, ignore_errors=True)  # never mix in shards of an earlier run
    _write_text(out_dir / "rejects.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    if not any(r["split"] == "train" for r in kept):
        raise DataError(
            f"no usable training rows ({len(rejects)} of {len(summary)} rejected; see {out_dir / 'rejects.jsonl'})",
            hint="check data.format and the rejects file (oikyo data inspect)",
        )
    removed = frozenset(f"{s}\0{n}" for s, n in result.removed)
    for split in SPLITS:
        target = out_dir / split
        cur.write_split(split, removed, target)
        target.mkdir(parents=True, exist_ok=True)  # an empty split is an empty directory
    if data.packing:
        cur.write_packed(removed, out_dir / mf.PACKED, data.block_length, _pad_id(tokenizer_path, cfg))

    manifest = mf.build(inputs=inputs, summary=summary, kept=kept, rejects=rejects, stats=result.stats,
                        leaks=result.leaks, data=data, tokenizer_path=tokenizer_path, key=key, out_dir=out_dir)
    if data.packing:
        manifest["packing"] = packing_report(out_dir, data.block_length, cfg.train.batch_size, cfg.train.seed)
    _write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2))
    return manifest


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
