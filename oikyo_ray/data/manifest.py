"""What a prepared dataset records about itself (Ray-free): hashes, counts, histogram, cache key.

    manifest.json = {
      "format_version", "inputs": [{path, sha256, bytes, read, accepted, rejected}],
      "outputs": {relative path: sha256}, "content_hash", "data_config", "data_config_hash",
      "tokenizer", "tokenizer_fingerprint", "cache": {key, hit, dir},
      "counts": {read, accepted, rejected, train, val, test}, "filters": {filter: rejected rows},
      "dedupe", "leakage", "meta": {tools, preference, label_true, label_false},
      "tokens": {total, max, mean, truncated, histogram: {edges, train, val, test}},
    }
`content_hash` depends only on what was kept (row hash, split, tokens, metadata), not on file
names or the order Ray wrote them, so the same inputs and config give the same hash anywhere.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

FORMAT_VERSION = 2
CURATION_VERSION = "2"  # bump when curation logic changes what is kept: invalidates cached datasets
SPLITS = ("train", "val", "test")
PACKED = "train_packed"  # the train split packed into blocks (data.packing)
HIST_BINS = 16
CHUNK = 1 << 20
_TOKENIZER_FILES = ("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "chat_template",
                    "spiece", "sentencepiece")


def sha256_stream(read) -> tuple[str, int]:
    """(sha256 hex, bytes) of a stream given its read(n) method, in 1 MiB chunks."""
    h, n = hashlib.sha256(), 0
    while chunk := read(CHUNK):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f.read)[0]


def data_config_hash(data) -> str:
    """Hash of the data section as configured (`cache` only says whether to reuse: left out)."""
    dump = data.model_dump(mode="json")
    dump.pop("cache", None)
    return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:16]


def tokenizer_fingerprint(path: str) -> str:
    """Hash of a local tokenizer's files (so a changed tokenizer at the same path is noticed);
    for a hub id, the id itself."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return path
    h = hashlib.sha256()
    for f in sorted(p.iterdir()):
        if f.is_file() and f.name.lower().startswith(_TOKENIZER_FILES):
            h.update(f.name.encode() + b"\0" + file_sha256(f).encode() + b"\n")
    return h.hexdigest()[:16]


def cache_key(inputs: list[dict], data, tokenizer_path: str, trust_remote_code: bool) -> str:
    parts = [CURATION_VERSION, [[i["path"], i["sha256"]] for i in inputs], data_config_hash(data),
             tokenizer_path, tokenizer_fingerprint(tokenizer_path), trust_remote_code]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def histogram(lengths_by_split: dict[str, list[int]], max_length: int) -> dict:
    """Token-length histogram over [0, max_length] in HIST_BINS equal bins (last bin closed)."""
    step = max(1, -(-max_length // HIST_BINS))
    edges = list(range(0, step * HIST_BINS + 1, step))
    out: dict = {"edges": edges}
    for split in SPLITS:
        counts = [0] * HIST_BINS
        for n in lengths_by_split.get(split, []):
            counts[min(n // step, HIST_BINS - 1)] += 1
        out[split] = counts
    return out


def content_hash(kept: list[dict]) -> str:
    digest = hashlib.sha256()
    for r in sorted(kept, key=lambda r: (r["hash"], r["split"], r["tokens_sha"], r["meta_sha"])):
        digest.update(f"{r['hash']}:{r['split']}:{r['tokens_sha']}:{r['meta_sha']}\n".encode())
    return digest.hexdigest()


def output_hashes(out_dir: Path) -> dict[str, str]:
    names = [out_dir / "rejects.jsonl"] + [f for s in (*SPLITS, PACKED) for f in sorted((out_dir / s).glob("*.parquet"))]
    return {str(f.relative_to(out_dir)): file_sha256(f) for f in names if f.is_file()}


def build(*, inputs: list[dict], summary: list[dict], kept: list[dict], rejects: list[dict], stats: dict,
          leaks: list[dict], data, tokenizer_path: str, key: str, out_dir: Path) -> dict:
    """The manifest of a finished preparation (outputs already written under out_dir)."""
    per_file = Counter((r["source"], r["status"] == "ok") for r in summary)
    rejected_by_file = Counter(r["source"] for r in rejects)
    for i in inputs:
        i["read"] = per_file[(i["path"], True)] + per_file[(i["path"], False)]
        i["rejected"] = rejected_by_file[i["path"]]
        i["accepted"] = i["read"] - i["rejected"]
    counts = {"read": len(summary), "accepted": len(kept), "rejected": len(rejects)}
    counts.update({s: sum(1 for r in kept if r["split"] == s) for s in SPLITS})
    tokens = [r["num_tokens"] for r in kept]
    tags = Counter(t for r in kept for t in r["meta_tags"].split(",") if t)
    return {
        "format_version": FORMAT_VERSION,
        "inputs": inputs,
        "outputs": output_hashes(out_dir),
        "content_hash": content_hash(kept),
        "data_config": data.model_dump(mode="json"),
        "data_config_hash": data_config_hash(data),
        "tokenizer": tokenizer_path,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer_path),
        "cache": {"key": key, "hit": False, "dir": None},
        "counts": counts,
        "filters": dict(sorted(Counter(r["filter"] for r in rejects).items())),
        "dedupe": {"exact": data.dedupe, "near_threshold": data.near_dup_threshold, **stats["dedupe"]},
        "leakage": {**stats["leakage"], "examples": leaks[:20]},
        "meta": {"tools": tags["tools"], "preference": tags["preference"],
                 "label_true": tags["label:true"], "label_false": tags["label:false"]},
        "tokens": {
            "total": sum(tokens), "max": max(tokens, default=0),
            "mean": sum(tokens) / len(tokens) if tokens else 0.0,
            "truncated": sum(1 for r in kept if r["full_tokens"] > r["num_tokens"]),
            "histogram": histogram({s: [r["num_tokens"] for r in kept if r["split"] == s] for s in SPLITS},
                                   data.max_length),
        },
    }


def meta_tags(meta: dict) -> str:
    tags = []
    if meta.get("tools"):
        tags.append("tools")
    if "rejected" in meta:
        tags.append("preference")
    if "label" in meta:
        tags.append(f"label:{str(meta['label']).lower()}")
    return ",".join(tags)
