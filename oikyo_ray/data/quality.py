"""Per-row quality filters, and the keys the duplicate and leakage pass compares (Ray-free).

Per row (inside `curate_row`, in parallel):
  `row_filters`   length/ratio filters on the assistant text (too short, too few letters and
                  digits, degenerate repetition);
  `row_keys`      exact keys (normalised-text hashes) and MinHash signatures of the conversation
                  and of its prompt, the only columns the global pass (`dedupe`) needs.

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
from functools import lru_cache

from datasketch import MinHash

from oikyo_ray.data.formats import RowError

SCHEME = "affine32"  # datasketch MinHash scheme, pinned: signatures are stored and compared
SEED = 1
NGRAM = 3


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
    return "\n".join(m["content"] for m in msgs if m["role"] == "assistant" and not (plain_only and m.get("tool_call")))


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
        raise RowError(
            f"assistant text is {len(answer)} characters < data.min_response_chars={data.min_response_chars}",
            kind="too_short",
        )
    plain = response_text(msgs, plain_only=True)
    ratio, n = alnum_ratio(plain)
    if n >= 20 and ratio < data.min_alnum_ratio:
        raise RowError(
            f"assistant text is {ratio:.0%} letters/digits < data.min_alnum_ratio={data.min_alnum_ratio}",
            kind="low_alnum",
        )
    rep, n = repetition(plain)
    if n >= 20 and rep > data.max_repetition:
        raise RowError(
            f"assistant text repeats {rep:.0%} of its word 3-grams > data.max_repetition={data.max_repetition}",
            kind="repetitive",
        )


# ---- keys and signatures -------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _permutations(num_perm: int):
    return MinHash(num_perm=num_perm, seed=SEED, scheme=SCHEME).permutations


def signature(text: str, num_perm: int) -> bytes:
    """MinHash of the normalised text's word 3-grams, as little-endian uint32 bytes."""
    words = norm_text(text).split()
    shingles = {" ".join(words[i : i + NGRAM]) for i in range(max(1, len(words) - NGRAM + 1))}
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
