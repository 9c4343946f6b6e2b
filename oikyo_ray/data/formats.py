"""Normalise a raw row (alpaca, sharegpt, OpenAI messages, raw text) into one `messages` schema.

Every function here raises `RowError` with a reason a user can act on; the pipeline turns that
into a rejects-file entry naming the source file and row.
"""

from __future__ import annotations

from typing import Any


class RowError(ValueError):
    """This row cannot be used; the message is the reason written to the rejects file."""


SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool",
}


def detect_format(row: dict) -> str:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    raise RowError(f"unknown row format (keys: {sorted(row)[:8]}); set data.format explicitly")


def _text(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI typed parts: [{"type": "text", "text": ...}]
        parts = []
        for p in value:
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                raise RowError(f"{what}: only text parts are supported, got {str(p)[:60]!r}")
        return "".join(parts)
    raise RowError(f"{what} must be a string, got {type(value).__name__}")


def from_alpaca(row: dict) -> list[dict]:
    prompt = _text(row.get("instruction", ""), "instruction")
    extra = row.get("input") or ""
    if extra:
        prompt = f"{prompt}\n\n{_text(extra, 'input')}"
    msgs = []
    if row.get("system"):
        msgs.append({"role": "system", "content": _text(row["system"], "system")})
    for pair in row.get("history") or []:
        if not (isinstance(pair, list) and len(pair) == 2):
            raise RowError("history must be a list of [user, assistant] pairs")
        msgs += [{"role": "user", "content": _text(pair[0], "history")},
                 {"role": "assistant", "content": _text(pair[1], "history")}]
    msgs += [{"role": "user", "content": prompt},
             {"role": "assistant", "content": _text(row.get("output"), "output")}]
    return msgs


def from_sharegpt(row: dict) -> list[dict]:
    conv = row.get("conversations")
    if not isinstance(conv, list):
        raise RowError("conversations must be a list of {from, value} turns")
    msgs = []
    if row.get("system"):
        msgs.append({"role": "system", "content": _text(row["system"], "system")})
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RowError(f"conversations[{i}] needs 'from' and 'value'")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise RowError(f"conversations[{i}]: unknown role tag {turn['from']!r}")
        msgs.append({"role": role, "content": _text(turn["value"], f"conversations[{i}].value")})
    return msgs


def from_messages(row: dict) -> list[dict]:
    raw = row.get("messages")
    if not isinstance(raw, list):
        raise RowError("messages must be a list of {role, content}")
    msgs = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or "role" not in m:
            raise RowError(f"messages[{i}] needs 'role' and 'content'")
        msgs.append({"role": str(m["role"]), "content": _text(m.get("content"), f"messages[{i}].content")})
    return msgs


def from_text(row: dict) -> list[dict]:
    # raw text for continued pre-training: one assistant turn, trained on in full
    return [{"role": "assistant", "content": _text(row.get("text"), "text")}]


CONVERTERS = {"alpaca": from_alpaca, "sharegpt": from_sharegpt, "messages": from_messages, "text": from_text}


def to_messages(row: Any, fmt: str = "auto") -> list[dict]:
    if not isinstance(row, dict):
        raise RowError(f"row must be a JSON object, got {type(row).__name__}")
    return CONVERTERS[detect_format(row) if fmt == "auto" else fmt](row)
