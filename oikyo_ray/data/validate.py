"""Row validation on the normalised `messages` schema (Ray-free).

Rules, checked cheapest first so a huge row is rejected before anything copies it:
  length   total characters of the turns, reasoning included (and a preference pair's rejected answer) <= max_chars
  unicode  every string encodes as UTF-8 (JSON escapes can smuggle in unpaired surrogates)
  roles    optional system first, then user/assistant alternation starting with the user; an
           assistant function call (``tool_call``) is followed by one tool result per call, then
           the assistant again; the conversation ends with the assistant. A lone assistant turn
           (raw text for continued pre-training) is allowed.
  content  no empty user or assistant turn; function calls are JSON naming a declared tool.
"""

from __future__ import annotations

import json
import re

from oikyo_ray.data.formats import RowError, tool_name

ROLES = {"system", "user", "assistant", "tool"}
_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode(text: str, what: str) -> None:
    m = _SURROGATE.search(text)
    if m:
        raise RowError(
            f"{what}: invalid Unicode: unpaired surrogate U+{ord(m.group()):04X} at character "
            f"{m.start()} (cannot be stored as UTF-8)",
            kind="unicode",
        )


def _calls(m: dict, i: int, tools: list | None) -> int:
    """Number of calls in a function-call turn; checks its JSON and the names against `tools`."""
    try:
        call = json.loads(m["content"])
    except json.JSONDecodeError as e:
        raise RowError(
            f"messages[{i}]: function call is not valid JSON ({e.msg} at column {e.colno})", kind="tool_call"
        ) from None
    calls = call if isinstance(call, list) else [call]
    names = {n for t in tools or [] if (n := tool_name(t))}
    for c in calls:
        if not (isinstance(c, dict) and isinstance(c.get("name"), str) and c["name"]):
            raise RowError(f"messages[{i}]: function call needs a 'name'", kind="tool_call")
        if names and c["name"] not in names:
            raise RowError(
                f"messages[{i}]: calls function {c['name']!r}, not one of the row's tools {sorted(names)}",
                kind="tool_call",
            )
    if not calls:
        raise RowError(f"messages[{i}]: function call turn with no call", kind="tool_call")
    return len(calls)


def validate_messages(msgs: list[dict], max_chars: int, meta: dict | None = None) -> None:
    """Raise RowError (with `kind`) unless the conversation is usable; see the module doc."""
    meta = meta or {}
    if not msgs:
        raise RowError("no messages", kind="role_order")
    rejected = meta.get("rejected", {}).get("content", "")
    total = sum(len(m["content"]) + len(m.get("reasoning", "")) for m in msgs) + len(rejected)
    if total > max_chars:
        raise RowError(f"{total} characters > data.max_chars={max_chars}", kind="too_long")
    for i, m in enumerate(msgs):
        _unicode(m["content"], f"messages[{i}].content")
        _unicode(m.get("reasoning", ""), f"messages[{i}].reasoning")
    if meta:
        _unicode(json.dumps(meta, ensure_ascii=False), "meta")

    for i, m in enumerate(msgs):
        if m["role"] not in ROLES:
            raise RowError(f"messages[{i}]: role {m['role']!r} is not one of {sorted(ROLES)}", kind="role_order")
        if m["role"] == "system" and i != 0:
            raise RowError(f"messages[{i}]: system message only allowed first", kind="role_order")
    start = 1 if msgs[0]["role"] == "system" else 0
    if start == len(msgs):
        raise RowError("only a system message", kind="role_order")
    if len(msgs) == 1 and msgs[0]["role"] == "assistant" and not msgs[0].get("tool_call"):
        _nonempty(msgs[0], 0)
        return  # raw text
    _order(msgs, start, meta.get("tools"))


def _nonempty(m: dict, i: int) -> None:
    if m["role"] in ("user", "assistant") and not m["content"].strip():
        raise RowError(f"messages[{i}]: empty {m['role']} message", kind="empty_turn")


def _order(msgs: list[dict], start: int, tools: list | None) -> None:
    pending = 0  # tool results still owed to the last function call
    call_at = -1
    prev = None  # "user", "assistant", "call" or "tool"
    for i in range(start, len(msgs)):
        m = msgs[i]
        _nonempty(m, i)
        role = "call" if m["role"] == "assistant" and m.get("tool_call") else m["role"]
        if prev == "call" or (prev == "tool" and pending):
            if role != "tool":
                raise RowError(
                    f"messages[{i}]: the function call at messages[{call_at}] needs {pending} more "
                    f"tool result(s) before this {m['role']} turn",
                    kind="role_order",
                )
            pending -= 1
        elif role == "tool":
            what = (
                "more tool results than calls made"
                if prev == "tool"
                else "tool result without a preceding assistant function call"
            )
            raise RowError(f"messages[{i}]: {what}", kind="role_order")
        elif prev is None and role != "user":
            raise RowError(
                f"messages[{i}]: the conversation must start with a user turn (after an "
                f"optional system message), got {m['role']!r}",
                kind="role_order",
            )
        elif prev == "user" and role == "user":
            raise RowError(f"messages[{i}]: two user turns in a row (roles must alternate)", kind="role_order")
        elif prev == "tool" and role == "user":
            raise RowError(
                f"messages[{i}]: a user turn right after tool results (the assistant must answer them first)",
                kind="role_order",
            )
        elif prev == "assistant" and role in ("assistant", "call"):
            raise RowError(f"messages[{i}]: two assistant turns in a row (roles must alternate)", kind="role_order")
        if role == "call":
            pending, call_at = _calls(m, i, tools), i
        prev = role
    if prev not in ("assistant", "call"):
        raise RowError("last message must be from the assistant (nothing to learn otherwise)", kind="role_order")
