"""Content hashes and the deterministic, add-stable train/val/test split (Ray-free)."""

from __future__ import annotations

import hashlib
import json


def content_hash(msgs: list[dict]) -> str:
    """Hash of the normalised conversation (whitespace-trimmed), independent of source file."""
    canon = [[m["role"], m["content"].strip()] for m in msgs]
    return hashlib.sha256(json.dumps(canon, ensure_ascii=False).encode()).hexdigest()


def assign_split(chash: str, val_fraction: float, test_fraction: float, salt: str) -> str:
    """A row's split depends only on its content, so adding rows never moves existing ones."""
    u = int(hashlib.sha256(f"{salt}:{chash}".encode()).hexdigest()[:15], 16) / 16**15
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"
