"""Quality filters, duplicate and leakage detection (Ray-free).

Per row (inside `curate_row`, in parallel):
  `row_filters`   length/ratio filters on the assistant text (too short, too few letters and
                  digits, degenerate repetition);
  `row_keys`      exact keys (normalised-text hashes) and MinHash signatures of the conversation
                  and of its prompt, the only columns the global pass needs.
Over all accepted rows (one pass on the driver, rows in file order then row order):
  `global_filter` exact duplicates, then near-duplicates (MinHash + LSH, `datasketch`), then
                  leakage: prompts equal or nearly equal across splits. Every removed row gets a
                  reason naming the row it duplicates; nothing is dropped silently.

Text is normalised (NFKC, casefolded, whitespace collapsed) before hashing; near-duplicates are
measured as the Jaccard similarity of word 3-gram sets. The leakage check compares prompts (the
turns before the final answer, system prompt excluded), so the same question answered
differently in train and test is caught too. Rows only count as (near-)duplicates of
rows with the same tools (and, for duplicates, the same KTO label): the same words offered with
different tools or opposite labels are different examples.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from oikyo_ray.data.formats import RowError

SCHEME = "affine32"  # datasketch MinHash scheme, pinned: signatures are stored and compared
SEED = 1
NGRAM = 3
SPLIT_RANK = {"test": 0, "val": 1, "train": 2}  # a leak is removed from the later split


def norm_text(text: str) -> str:
    if not text.isascii():  # NFKC leaves ASCII as it is: skip the pass for the common case
        text = unicodedata.normalize("NFKC", text)
    return " ".join(text.casefold().split())  # split() cuts at the same characters as \s


def conversation_text(msgs: list[dict], meta: dict) -> str:
    lines = [f"{m['role']}: {m['content']}" for m in msgs]
    if "rejected" in meta:
        lines.append(f"rejected: {meta['rejected']['content']}")
    return "\n".join(lines)


def prompt_text(msgs: list[dict]) -> str:
    """What the final answer responds to, for the leakage check: the turns before it, without the
    system prompt (boilerplate shared by whole datasets, it would make every pair look alike) and
    without role tags; raw text (no prompt) is its own prompt."""
    head = msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs
    return "\n".join(m["content"] for m in head if m["role"] != "system") or "\n".join(m["content"] for m in msgs)


@lru_cache(maxsize=1024)
def _tags(tags: tuple) -> bytes:
    return json.dumps(tags).encode() + b"\0"  # JSON holds no raw NUL: the first one ends the tags


def _key(text: str, *tags, size: int = 16) -> bytes:
    """A compact digest of `text` and `tags` (keys stay small on the driver: 16 bytes a row, not
    a hex str); rows share a few tags (tools, label), so their encoding is cached."""
    return hashlib.blake2b(_tags(tags) + text.encode(), digest_size=size).digest()


# ---- per-row filters -----------------------------------------------------------------------------

def response_text(msgs: list[dict], plain_only: bool = False) -> str:
    return "\n".join(m["content"] for m in msgs
                     if m["role"] == "assistant" and not (plain_only and m.get("tool_call")))


_NOT_WORD = re.compile(r"\W+")  # \w is str.isalnum() or "_" for str patterns
_ASCII = [chr(c) for c in range(128)]
_ASCII_SPACE = "".join(c for c in _ASCII if c.isspace()).encode()
_ASCII_NOT_ALNUM = "".join(c for c in _ASCII if not c.isalnum()).encode()


def alnum_ratio(text: str) -> tuple[float, int]:
    """(share of letters and digits among non-space characters, non-space characters)."""
    if text.isascii():  # the common case, counted by bytes.translate in C
        raw = text.encode()
        n, alnum = len(raw.translate(None, _ASCII_SPACE)), len(raw.translate(None, _ASCII_NOT_ALNUM))
    else:
        n = sum(map(len, text.split()))  # split() cuts at exactly the str.isspace() characters
        alnum = len(_NOT_WORD.sub("", text)) - text.count("_")
    return (alnum / n if n else 1.0), n


def repetition(text: str) -> tuple[float, int]:
    """Share of word 3-grams that repeat an earlier one (0: none, ->1: one phrase over and over)."""
    words = text.casefold().split()
    n = len(words) - NGRAM + 1
    return (1 - len(set(zip(*(words[i:] for i in range(NGRAM))))) / n if n > 0 else 0.0), len(words)


def row_filters(msgs: list[dict], meta: dict, data) -> None:
    """Raise RowError (kind = the filter) when the row fails a quality filter of `data`."""
    if data.reject_undesired and meta.get("label") is False:
        raise RowError("labelled undesired (label=false) and data.reject_undesired is set", kind="undesired")
    answer = response_text(msgs).strip()
    if len(answer) < data.min_response_chars:
        raise RowError(f"assistant text is {len(answer)} characters < data.min_response_chars="
                       f"{data.min_response_chars}", kind="too_short")
    plain = response_text(msgs, plain_only=True)
    ratio, n = alnum_ratio(plain)
    if n >= 20 and ratio < data.min_alnum_ratio:
        raise RowError(f"assistant text is {ratio:.0%} letters/digits < data.min_alnum_ratio="
                       f"{data.min_alnum_ratio}", kind="low_alnum")
    rep, n = repetition(plain)
    if n >= 20 and rep > data.max_repetition:
        raise RowError(f"assistant text repeats {rep:.0%} of its word 3-grams > data.max_repetition="
                       f"{data.max_repetition}", kind="repetitive")


# ---- keys and signatures -------------------------------------------------------------------------

@lru_cache(maxsize=8)
def _permutations(num_perm: int):
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=SEED, scheme=SCHEME).permutations


def signature(text: str, num_perm: int) -> bytes:
    """MinHash of the normalised text's word 3-grams, as little-endian uint32 bytes."""
    from datasketch import MinHash

    words = norm_text(text).split()
    shingles = {" ".join(words[i:i + NGRAM]) for i in range(max(1, len(words) - NGRAM + 1))}
    m = MinHash(num_perm=num_perm, seed=SEED, scheme=SCHEME, permutations=_permutations(num_perm))
    m.update_batch([s.encode("utf-8") for s in shingles])
    return m.hashvalues.astype("<u4").tobytes()


@lru_cache(maxsize=1024)
def _groups(tools_json: str, label) -> tuple[str, bytes]:
    """(tools key, duplicate group) of a row's tools (canonical JSON) and KTO label: most rows
    share a few, so both are cached."""
    tools = hashlib.blake2b(tools_json.encode(), digest_size=8).hexdigest()
    return tools, _key(tools, label, size=8)


def row_keys(msgs: list[dict], meta: dict, data) -> dict:
    """Columns the global pass uses: exact keys, group keys and MinHash signatures."""
    tools_json = json.dumps(meta.get("tools") or [], ensure_ascii=False, sort_keys=True)
    tools, dup_group = _groups(tools_json, meta.get("label"))
    conv = conversation_text(msgs, meta)
    prompt = prompt_text(msgs)
    keys = {
        "dup_key": _key(norm_text(conv), tools, meta.get("label")),
        "dup_group": dup_group,
        "leak_group": bytes.fromhex(tools),
        "prompt_key": _key(norm_text(prompt), tools),
        "text_sig": b"",
        "prompt_sig": b"",
    }
    if data.near_dup_threshold is not None:
        keys["text_sig"] = signature(conv, data.minhash_num_perm)
    if data.leakage != "off" and data.leakage_threshold is not None:
        keys["prompt_sig"] = signature(prompt, data.minhash_num_perm)
    return keys


# ---- the global pass -----------------------------------------------------------------------------

@dataclass
class Removal:
    kind: str  # duplicate | near_duplicate | leakage
    reason: str


@dataclass
class GlobalResult:
    removed: dict = field(default_factory=dict)  # (source, row) -> Removal
    leaks: list = field(default_factory=list)  # every leaked pair, removed or only reported
    stats: dict = field(default_factory=dict)


class _Near:
    """LSH index of kept rows; `match` returns the most similar kept row at or above threshold."""

    def __init__(self, threshold: float, num_perm: int):
        from datasketch import MinHashLSH

        self.threshold, self.num_perm = threshold, num_perm
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.sigs: dict[int, tuple[np.ndarray, str]] = {}

    def _minhash(self, sig: np.ndarray):
        from datasketch import LeanMinHash

        return LeanMinHash(seed=SEED, hashvalues=sig, scheme=SCHEME)

    def match(self, sig_bytes: bytes, group: str) -> tuple[int, float] | None:
        sig = np.frombuffer(sig_bytes, dtype="<u4")
        if len(sig) != self.num_perm:
            raise ValueError(f"MinHash signature has {len(sig)} values, expected {self.num_perm}")
        best = None
        for key in self.lsh.query(self._minhash(sig)):
            other, other_group = self.sigs[key]
            if other_group != group:
                continue
            j = float(np.mean(sig == other))
            if j >= self.threshold and (best is None or (j, -key) > (best[1], -best[0])):
                best = (key, j)
        return best

    def add(self, key: int, sig_bytes: bytes, group: str) -> None:
        sig = np.frombuffer(sig_bytes, dtype="<u4")
        self.sigs[key] = (sig, group)
        self.lsh.insert(key, self._minhash(sig))


def _ref(r: dict) -> str:
    return f"{r['source']}:{r['row']}"


def global_filter(rows: list[dict], data, file_order: list[str] | None = None) -> GlobalResult:
    """Decide which accepted rows go: duplicates, near-duplicates, leaked rows (see module doc).

    `rows`: accepted rows with source, row, split and the `row_keys` columns. The first occurrence
    (in `file_order`, then row number) is kept; the result names, for each removed row, the row
    it duplicates or leaks into.
    """
    rank = {s: i for i, s in enumerate(file_order or [])}
    rows = sorted(rows, key=lambda r: (rank.get(r["source"], len(rank)), r["source"], r["row"]))
    res = GlobalResult()
    stats = {"duplicate": 0, "near_duplicate": 0}
    kept: list[dict] = []
    exact: dict[str, dict] = {}
    near = _Near(data.near_dup_threshold, data.minhash_num_perm) if data.near_dup_threshold else None
    for r in rows:
        if data.dedupe and r["dup_key"] in exact:
            res.removed[(r["source"], r["row"])] = Removal("duplicate", f"duplicate of {_ref(exact[r['dup_key']])}")
            stats["duplicate"] += 1
            continue
        if near is not None:
            hit = near.match(r["text_sig"], r["dup_group"])
            if hit is not None:
                other = kept[hit[0]]
                res.removed[(r["source"], r["row"])] = Removal(
                    "near_duplicate", f"near-duplicate of {_ref(other)} (estimated Jaccard {hit[1]:.2f} >= "
                    f"data.near_dup_threshold={data.near_dup_threshold})")
                stats["near_duplicate"] += 1
                continue
            near.add(len(kept), r["text_sig"], r["dup_group"])
        exact.setdefault(r["dup_key"], r)
        kept.append(r)
    res.stats = {"dedupe": stats, "leakage": _leakage(kept, data, res)}
    return res


def _leakage(rows: list[dict], data, res: GlobalResult) -> dict:
    """Prompts shared across splits: test is kept, then val; the later split's copy leaks."""
    pairs: dict[str, int] = {}
    out = {"action": data.leakage, "threshold": data.leakage_threshold, "exact": 0, "near": 0,
           "removed": 0, "pairs": pairs}
    if data.leakage == "off":
        return out
    rows = sorted(rows, key=lambda r: SPLIT_RANK[r["split"]])  # stable: file order within a split
    exact: dict[str, dict] = {}
    near = _Near(data.leakage_threshold, data.minhash_num_perm) if data.leakage_threshold else None
    held: list[dict] = []  # rows of earlier (held-out) splits indexed so far
    current = None
    pending: list[tuple[dict, int]] = []  # rows of the current split, indexed when it ends
    for r in rows + [None]:
        split = r["split"] if r else None
        if split != current:  # index the finished split so later splits are checked against it
            for p, idx in pending:
                exact.setdefault(p["prompt_key"], p)
                if near is not None:
                    near.add(idx, p["prompt_sig"], p["leak_group"])
            pending, current = [], split
        if r is None:
            break
        other, how = exact.get(r["prompt_key"]), "same prompt as"
        if other is not None and other["split"] == split:
            other = None
        if other is None and near is not None:
            hit = near.match(r["prompt_sig"], r["leak_group"])
            if hit is not None:
                other = held[hit[0]]
                how = f"prompt near-duplicate (estimated Jaccard {hit[1]:.2f}) of"
        if other is not None:
            kind = "exact" if how == "same prompt as" else "near"
            out[kind] += 1
            pair = f"{split}~{other['split']}"
            pairs[pair] = pairs.get(pair, 0) + 1
            reason = f"leaks into {other['split']}: {how} {_ref(other)}"
            res.leaks.append({"source": r["source"], "row": r["row"], "split": split, "kind": kind,
                              "other": _ref(other), "other_split": other["split"]})
            if data.leakage == "remove":
                res.removed[(r["source"], r["row"])] = Removal("leakage", reason)
                out["removed"] += 1
                continue
        held.append(r)
        pending.append((r, len(held) - 1))
    return out
