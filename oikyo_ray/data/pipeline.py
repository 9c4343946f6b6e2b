"""The data stage on Ray Data: files -> curated, tokenised parquet splits + rejects + manifest.

    prepare(cfg, tokenizer_path, out_dir) -> manifest dict

Layout written under ``out_dir``: ``train/ val/ test/`` (parquet shards), ``rejects.jsonl``
(source, row, reason for every rejected row) and ``manifest.json`` (counts, content hash).
"""

from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path

import pyarrow.fs as pafs

from oikyo_ray.config import DEMO_DATA, OikyoConfig
from oikyo_ray.data.curate import FILE_ERROR, curate_batch
from oikyo_ray.errors import DataError
from oikyo_ray.storage import filesystem

SPLITS = ("train", "val", "test")
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
                groups["s3"] += sorted(f.path for f in files if f.type == pafs.FileType.File)
            elif info.type == pafs.FileType.File:
                groups["s3"].append(key)
            else:
                raise DataError(f"data file not found: {p}", hint="check data.paths and AWS_ENDPOINT_URL")
        else:
            local = Path(p).expanduser()
            if local.is_dir():
                found = sorted(str(f) for f in local.rglob("*") if f.is_file())
            else:
                found = sorted(glob.glob(str(local)))
            if not found:
                raise DataError(f"data file not found: {p}", hint="check data.paths (globs allowed)")
            groups["local"] += [str(Path(f).resolve()) for f in found]
    return {k: v for k, v in groups.items() if v}


def _read(groups: dict[str, list[str]]):
    import ray

    parts = []
    for kind, files in groups.items():
        fs = filesystem("s3://x")[0] if kind == "s3" else pafs.LocalFileSystem()
        parts.append(ray.data.read_binary_files(files, include_paths=True, filesystem=fs))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def prepare(cfg: OikyoConfig, tokenizer_path: str, out_dir: Path) -> dict:
    """Run the curation pipeline; raise DataError naming the file when a file is unusable."""
    groups = expand_paths(cfg.data.paths)
    ds = _read(groups).map_batches(
        curate_batch,
        batch_size=1,  # one file per call: row numbers stay per file
        fn_kwargs={
            "data": cfg.data.model_dump(),
            "tokenizer_path": tokenizer_path,
            "trust_remote_code": cfg.model.trust_remote_code,
        },
    ).materialize()

    bad_files = ds.filter(lambda r: r["status"] == FILE_ERROR).take_all()
    if bad_files:
        raise DataError("; ".join(r["reason"] for r in bad_files),
                        hint="fix or remove the file(s) from data.paths")

    out_dir.mkdir(parents=True, exist_ok=True)
    rejects = ds.filter(lambda r: r["status"] == "reject").select_columns(["source", "row", "reason"])
    rejected = rejects.take_all()
    with (out_dir / "rejects.jsonl").open("w", encoding="utf-8") as f:
        for r in sorted(rejected, key=lambda r: (r["source"], r["row"])):
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

    ok = ds.filter(lambda r: r["status"] == "ok")
    stats = ok.select_columns(["split", "hash", "num_tokens"]).take_all()
    read = ds.count()
    counts = {"read": read, "accepted": len(stats), "rejected": len(rejected)}
    assert counts["accepted"] + counts["rejected"] == read, counts  # nothing silently lost
    for split in SPLITS:
        counts[split] = sum(1 for s in stats if s["split"] == split)
    if counts["train"] == 0:
        raise DataError(
            f"no usable training rows ({counts['rejected']} of {read} rejected; see {out_dir / 'rejects.jsonl'})",
            hint="check data.format and the rejects file",
        )
    for split in SPLITS:
        sub = ok.filter(lambda r, s=split: r["split"] == s).select_columns(
            ["hash", "messages", "input_ids", "labels", "num_tokens"])
        sub.write_parquet(str(out_dir / split))

    digest = hashlib.sha256()
    for s in sorted(stats, key=lambda s: s["hash"]):
        digest.update(f"{s['hash']}:{s['split']}\n".encode())
    tokens = [s["num_tokens"] for s in stats]
    manifest = {
        "inputs": [p for files in groups.values() for p in files],
        "content_hash": digest.hexdigest(),
        "counts": counts,
        "tokens": {"total": sum(tokens), "max": max(tokens), "mean": sum(tokens) / len(tokens)},
        "data_config": cfg.data.model_dump(),
        "tokenizer": tokenizer_path,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def read_split(data_dir: Path, split: str):
    """A prepared split as a Ray Dataset of TRAIN_COLUMNS (streamed to workers)."""
    import ray

    return ray.data.read_parquet(str(data_dir / split), columns=TRAIN_COLUMNS)


def load_split_rows(data_dir: Path, split: str) -> list[dict]:
    """A prepared split read in-process (for small eval sets), sorted by content hash."""
    import pyarrow.parquet as pq

    d = data_dir / split
    if not any(d.glob("*.parquet")):
        return []
    rows = pq.read_table(str(d)).to_pylist()
    return sorted(rows, key=lambda r: r["hash"])
