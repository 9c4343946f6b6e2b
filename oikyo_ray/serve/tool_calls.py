"""The model's tool calls, read back out of its text (Ray-free).

The chat template (`model/chat_template.py`) teaches a call as `<tool_call>\\n{"name", "arguments"}
\\n</tool_call>` (one call, or a JSON list of calls, per block), so a fine-tuned model answers in
that form. Here that text becomes OpenAI's `tool_calls`, in one piece (`split`) or while streaming
(`ToolCallStream`). A block that is not a valid call of an offered tool stays in the content: the
client sees what the model said rather than a call that would fail.

`prefix(tool_choice)` is what the assistant turn starts with to make the model call a tool
(`required`) or one named tool: the generation continues a call instead of choosing whether to.
"""

from __future__ import annotations

import json
import re
import uuid

from oikyo_ray.model.reasoning import held_back

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|\Z)", re.S)


def prefix(tool_choice) -> str:
    """Text the assistant turn is started with for this `tool_choice` ('' for auto or none)."""
    if tool_choice == "required":
        return OPEN + "\n"
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        return OPEN + "\n" + '{"name": ' + json.dumps(name) + ', "arguments": '
    return ""


def _calls(block: str, names: frozenset[str] | set[str]) -> list[dict] | None:
    """OpenAI tool calls from one block's JSON, or None when it is not a valid call of a tool."""
    try:
        value = json.loads(block)
    except json.JSONDecodeError:
        return None
    calls = value if isinstance(value, list) else [value]
    out = []
    for c in calls:
        if not (isinstance(c, dict) and isinstance(c.get("name"), str) and c["name"] in names):
            return None
        args = c.get("arguments", {})
        out.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": c["name"], "arguments": args if isinstance(args, str) else json.dumps(args)},
            }
        )
    return out


def split(text: str, names: frozenset[str] | set[str]) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a whole answer; content is None when only calls remain."""
    calls: list[dict] = []

    def take(m: re.Match) -> str:
        found = _calls(m.group(1), names)
        if found is None:
            return m.group(0)
        calls.extend(found)
        return ""

    content = _BLOCK.sub(take, text).strip()
    return (content or None), calls


class ToolCallStream:
    """Feed streamed text pieces; get back content to send now and tool calls as they complete.

    Text that might be the start of `<tool_call>` is held until it is clear; a block is held until
    it closes (or the stream ends), then sent as calls, or as content if it is not a valid call."""

    def __init__(self, names: frozenset[str] | set[str], start: str = ""):
        self.names, self._buf, self._in_block = names, start, False

    def feed(self, piece: str) -> tuple[str, list[dict]]:
        self._buf += piece
        content, calls = "", list[dict]()
        while True:
            if not self._in_block:
                at = self._buf.find(OPEN)
                if at < 0:
                    keep = held_back(self._buf, OPEN)
                    content += self._buf[: len(self._buf) - keep]
                    self._buf = self._buf[len(self._buf) - keep :]
                    return content, calls
                content += self._buf[:at]
                self._buf, self._in_block = self._buf[at:], True
            end = self._buf.find(CLOSE)
            if end < 0:
                return content, calls
            block, self._buf = self._buf[: end + len(CLOSE)], self._buf[end + len(CLOSE) :]
            self._in_block = False
            text, found = split(block, self.names)
            content += text or ""
            calls += found

    def finish(self) -> tuple[str, list[dict]]:
        """What is left when generation ends (an unclosed block is read as far as it goes)."""
        text, calls = split(self._buf, self.names) if self._in_block else (self._buf, [])
        self._buf, self._in_block = "", False
        return text or "", calls
