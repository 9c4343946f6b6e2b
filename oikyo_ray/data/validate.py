"""Row validation on the normalised `messages` schema (Ray-free)."""

from __future__ import annotations

from oikyo_ray.data.formats import RowError

ROLES = {"system", "user", "assistant", "tool"}


def validate_messages(msgs: list[dict], max_chars: int) -> None:
    """Raise RowError unless roles are legal and ordered and an assistant answers something."""
    if not msgs:
        raise RowError("no messages")
    for i, m in enumerate(msgs):
        if m["role"] not in ROLES:
            raise RowError(f"messages[{i}]: role {m['role']!r} is not one of {sorted(ROLES)}")
        if m["role"] == "system" and i != 0:
            raise RowError(f"messages[{i}]: system message only allowed first")
    body = [m for m in msgs if m["role"] != "system"]
    if not body:
        raise RowError("only a system message")
    if body[-1]["role"] != "assistant":
        raise RowError("last message must be from the assistant (nothing to learn otherwise)")
    for i, m in enumerate(msgs):
        if m["role"] == "assistant" and not m["content"].strip():
            raise RowError(f"messages[{i}]: empty assistant message")
    total = sum(len(m["content"]) for m in msgs)
    if total > max_chars:
        raise RowError(f"{total} characters > data.max_chars={max_chars}")
