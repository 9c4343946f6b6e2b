"""What a prepared dataset records about itself (Ray-free): hashes, counts, histogram, cache key.

    manifest.json = {
      "format_version", "inputs": [{path, sha256, bytes, read, accepted, rejected, preference, labelled,
                                    no_room}],
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

import numpy as np

from oikyo_ray.data.columns import codes, keys
from oikyo_ray.data.prepared import split_files

FORMAT_VERSION = 2
CURATION_VERSION = "6"  # bump when curation changes what is kept or why a row goes: invalidates cached datasets
SPLITS = ("train", "val", "test")
PACKED = "train_packed"  # the train split packed into blocks (data.packing)
HIST_BINS = 16
CHUNK = 1 << 20
_TOKENIZER_FILES = (
    "tokenizer",
    "vocab",
    "merges",
    "special_tokens",
    "added_tokens",
    "chat_template",
    "spiece",
    "sentencepiece",
)


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
    parts = [
        CURATION_VERSION,
        [[i["path"], i["sha256"]] for i in inputs],
        data_config_hash(data),
        tokenizer_path,
        tokenizer_fingerprint(tokenizer_path),
        trust_remote_code,
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def histogram(lengths_by_split: dict, max_length: int) -> dict:
    """Token-length histogram over [0, max_length] in HIST_BINS equal bins (last bin closed)."""
    step = max(1, -(-max_length // HIST_BINS))
    edges = list(range(0, step * HIST_BINS + 1, step))
    out: dict = {"edges": edges}
    for split in SPLITS:
        n = np.asarray(lengths_by_split.get(split, []), dtype=np.int64)
        out[split] = np.bincount(np.minimum(n // step, HIST_BINS - 1), minlength=HIST_BINS).tolist()
    return out


def content_hash(digests) -> str:
    """Hash of the kept rows' digests (content, split, tokens, metadata), sorted: independent
    of file names and of the order rows were written."""
    return hashlib.sha256(np.sort(np.asarray(digests, dtype="S16")).tobytes()).hexdigest()


def output_hashes(out_dir: Path) -> dict[str, str]:
    names = [out_dir / "rejects.jsonl"] + [f for s in (*SPLITS, PACKED) for f in split_files(out_dir, s)]
    return {str(f.relative_to(out_dir)): file_sha256(f) for f in names if f.is_file()}


def _counts(col) -> Counter:
    """Rows per distinct value of an Arrow column."""
    names, idx = codes(col)
    return Counter(dict(zip(names, np.bincount(idx, minlength=len(names)).tolist())))


def build(
    *,
    inputs: list[dict],
    summary,
    kept,
    rejects: list[dict],
    stats: dict,
    leaks: list[dict],
    data,
    tokenizer_path: str,
    key: str,
    out_dir: Path,
) -> dict:
    """The manifest of a finished preparation (outputs already written under out_dir); `summary`
    (every row) and `kept` are Arrow tables of the curated summary columns."""
    read_by_file = _counts(summary["source"])
    rejected_by_file = Counter(r["source"] for r in rejects)
    pairs_by_file, labelled_by_file, no_room_by_file = _preference_by_file(kept)
    for i in inputs:
        i["read"] = read_by_file[i["path"]]
        i["rejected"] = rejected_by_file[i["path"]]
        i["accepted"] = i["read"] - i["rejected"]
        # what preference objectives can use of the file (train/checks.check_objective_data)
        i["preference"] = pairs_by_file[i["path"]]
        i["labelled"] = labelled_by_file[i["path"]]
        i["no_room"] = no_room_by_file[i["path"]]
    names, split_idx = codes(kept["split"])
    tokens = kept["num_tokens"].to_numpy()
    per_split = {s: tokens[split_idx == names.index(s)] if s in names else tokens[:0] for s in SPLITS}
    counts = {"read": summary.num_rows, "accepted": kept.num_rows, "rejected": len(rejects)}
    counts.update({s: len(per_split[s]) for s in SPLITS})
    tags: Counter[str] = Counter()
    for value, n in _counts(kept["meta_tags"]).items():
        for t in filter(None, value.split(",")):
            tags[t] += n
    return {
        "format_version": FORMAT_VERSION,
        "inputs": inputs,
        "outputs": output_hashes(out_dir),
        "content_hash": content_hash(keys(kept["digest"])),
        "data_config": data.model_dump(mode="json"),
        "data_config_hash": data_config_hash(data),
        "tokenizer": tokenizer_path,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer_path),
        "cache": {"key": key, "hit": False, "dir": None},
        "counts": counts,
        "filters": dict(sorted(Counter(r["filter"] for r in rejects).items())),
        "dedupe": {"exact": data.dedupe, "near_threshold": data.near_dup_threshold, **stats["dedupe"]},
        "leakage": {**stats["leakage"], "examples": leaks[:20]},
        "meta": {
            "tools": tags["tools"],
            "preference": tags["preference"],
            "label_true": tags["label:true"],
            "label_false": tags["label:false"],
            # keys of accepted rows that nothing read (a misspelt column shows up here)
            "ignored_keys": {t.split(":", 1)[1]: n for t, n in sorted(tags.items()) if t.startswith("ignored:")},
        },
        "tokens": {
            "total": int(tokens.sum()),
            "max": int(tokens.max(initial=0)),
            "mean": float(tokens.mean()) if len(tokens) else 0.0,
            "truncated": int((kept["full_tokens"].to_numpy() > tokens).sum()),
            "histogram": histogram(per_split, data.max_length),
        },
    }


def _preference_by_file(kept) -> tuple[Counter, Counter, Counter]:
    """Kept rows per source file that are preference pairs, that carry a KTO label, and of
    those, whose prompt leaves no room for the answers (preference training skips them)."""
    files, file_at = codes(kept["source"])
    tags, tag_at = codes(kept["meta_tags"])
    per_file = lambda rows: Counter(dict(zip(files, np.bincount(file_at[rows], minlength=len(files)).tolist())))
    tagged = lambda test: np.array([test(t.split(",")) for t in tags] or [False])[tag_at]
    return (
        per_file(tagged(lambda t: "preference" in t)),
        per_file(tagged(lambda t: any(x.startswith("label:") for x in t))),
        per_file(kept["no_room"].to_numpy(zero_copy_only=False)),
    )


def meta_tags(meta: dict, ignored: list[str] | tuple = ()) -> str:
    """A row's tags, counted in the manifest: tools, preference, label and each key nothing read."""
    tags = [f"ignored:{k.replace(',', ';')}" for k in ignored]  # "," separates tags
    if meta.get("tools"):
        tags.append("tools")
    if "rejected" in meta:
        tags.append("preference")
    if "label" in meta:
        tags.append(f"label:{str(meta['label']).lower()}")
    return ",".join(tags)
