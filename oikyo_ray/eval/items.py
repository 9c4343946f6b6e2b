"""What the evaluation scores (Ray-free): held-out rows, general-text chunks and probes as items.

build_items(cfg, tokenizer, rows) -> [Item]

task     a held-out test row: next-token loss on its labelled (answer) tokens, and a
         generation from its prompt (all turns but the last, tools passed to the template)
general  a chunk of the general-text slice: loss on every token (forgetting)
probe    a safety/robustness prompt: a generation only (see `probes`)
pair     a held-out preference pair's chosen or rejected answer: its log-prob after the prompt
         (two items per pair; the report compares them: preference accuracy and margin)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from oikyo_ray.config import OikyoConfig
from oikyo_ray.data.tokenize import IGNORE
from oikyo_ray.errors import DataError
from oikyo_ray.eval.probes import ASSETS, load_probes
from oikyo_ray.model.prompt import render_prompt


class ItemKind(str, Enum):
    TASK = "task"
    GENERAL = "general"
    PROBE = "probe"
    PAIR = "pair"


@dataclass(frozen=True)
class Item:
    """One thing both models are scored on: a loss where it has labels, a generation where it has
    a prompt. `id` is unique among the items (scores are matched to items by it)."""

    id: str
    kind: ItemKind
    prompt: str = ""  # the rendered generation prompt; "" = no generation
    input_ids: tuple[int, ...] = ()
    labels: tuple[int, ...] = ()  # () = no loss
    reference: str = ""  # the expected answer (task)
    tool_call: bool = False  # the reference is a tool call (task)
    max_new_tokens: int = 0
    probe_kind: str = ""  # probes.KINDS (probe)
    user: str = ""  # the last user turn, as the report shows it


def task_items(rows: list[dict], tokenizer, cfg: OikyoConfig) -> list[Item]:
    """Test rows (input_ids, labels, messages and meta JSON from the data stage) as task items."""
    items = []
    for i, r in enumerate(rows[: cfg.eval.max_samples]):
        conv = json.loads(r["messages"])
        meta = json.loads(r.get("meta") or "{}")
        last = conv[-1]
        user = next((m["content"] for m in reversed(conv[:-1]) if m["role"] == "user"), "")
        items.append(
            Item(
                f"task-{i}",
                ItemKind.TASK,
                render_prompt(tokenizer, conv[:-1], meta.get("tools")),
                tuple(r["input_ids"]),
                tuple(r["labels"]),
                last["content"],
                bool(last.get("tool_call")),
                cfg.eval.max_new_tokens,
                user=user,
            )
        )
    return items


def pair_items(rows: list[dict], cfg: OikyoConfig) -> list[Item]:
    """Test rows that are preference pairs fitting data.max_length as two loss items each,
    `pair-<i>-chosen` and `pair-<i>-rejected`: the prompt once (unlabelled), then the answer."""
    from oikyo_ray.train.objective import PAIR_COLUMNS, has_pair  # noqa: PLC0415 (torch, only when pairs)

    pairs = [r for r in rows if all(k in r for k in PAIR_COLUMNS) and has_pair(r)][: cfg.eval.max_samples]
    items = []
    for i, r in enumerate(pairs):
        prompt = tuple(r["prompt_ids"])
        for side in ("chosen", "rejected"):
            answer = tuple(r[f"{side}_ids"])
            items.append(
                Item(
                    f"pair-{i}-{side}",
                    ItemKind.PAIR,
                    input_ids=prompt + answer,
                    labels=(IGNORE,) * len(prompt) + answer,
                )
            )
    return items


def general_items(tokenizer, cfg: OikyoConfig) -> list[Item]:
    """The general-text slice cut into chunks of eval.general_chunk_tokens tokens (loss on all)."""
    path = Path(cfg.eval.general_text).expanduser() if cfg.eval.general_text else ASSETS / "general_text.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(
            f"cannot read the general-text slice {path}: {e.strerror}",
            hint="check eval.general_text, or set eval.forgetting=false",
        ) from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = cfg.eval.general_chunk_tokens
    chunks = [tuple(ids[i : i + n]) for i in range(0, len(ids), n)]
    chunks = [c for c in chunks if len(c) >= 2]
    if not chunks:
        raise DataError(f"the general-text slice {path} is empty", hint="or set eval.forgetting=false")
    return [Item(f"general-{i}", ItemKind.GENERAL, input_ids=c, labels=c) for i, c in enumerate(chunks)]


def probe_items(tokenizer, cfg: OikyoConfig) -> list[Item]:
    out = []
    for p in load_probes(cfg.eval.probes_path):
        msgs = ([{"role": "system", "content": p["system"]}] if p.get("system") else []) + [
            {"role": "user", "content": p["prompt"]}
        ]
        out.append(
            Item(
                f"probe-{p['id']}",
                ItemKind.PROBE,
                render_prompt(tokenizer, msgs),
                max_new_tokens=cfg.eval.probe_max_new_tokens,
                probe_kind=p["kind"],
                user=p["prompt"],
            )
        )
    return out


def build_items(cfg: OikyoConfig, tokenizer, rows: list[dict]) -> list[Item]:
    items = task_items(rows, tokenizer, cfg) + pair_items(rows, cfg)
    if cfg.eval.forgetting:
        items += general_items(tokenizer, cfg)
    if cfg.eval.probes:
        items += probe_items(tokenizer, cfg)
    return items
