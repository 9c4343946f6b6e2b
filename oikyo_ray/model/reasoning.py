"""A model's thinking trace, read back out of its answer (Ray-free).

The chat template writes an assistant turn's reasoning first, as `<think>\\n...\\n</think>\\n\\n`
(`chat_template.THINK_BLOCK`), so a model trained on traces answers that way. Serving returns the
trace as `reasoning_content` apart from `content`, as vLLM's reasoning parsers do, whole (`split`)
or while streaming (`ReasoningStream`); evaluation scores the answer without it (`answer`).

Only a block that opens the answer is a trace: `<think>` later in the text is content.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def split(text: str) -> tuple[str | None, str]:
    """(reasoning, content) of a whole answer; reasoning is None when the answer has no trace.
    An unclosed trace (the answer ran out of tokens while thinking) is all reasoning."""
    head = text.lstrip()
    if not head.startswith(OPEN):
        return None, text
    body = head[len(OPEN) :]
    end = body.find(CLOSE)
    if end < 0:
        return body.strip(), ""
    return body[:end].strip(), body[end + len(CLOSE) :].lstrip()


def answer(text: str) -> str:
    """The answer without its thinking trace (what evaluation compares with the reference)."""
    return split(text)[1]


class ReasoningStream:
    """Feed streamed text pieces; get back (reasoning, content) to send now.

    Text that might still become `<think>` (at the start) or `</think>` (inside the trace) is held
    until it is clear, so neither tag reaches the client; so is whitespace at the trace's edges
    and between it and the answer, which `split` drops too."""

    def __init__(self) -> None:
        # start -> opened -> thinking -> after -> answering, or start -> answering
        self._buf, self._state = "", "start"

    def feed(self, piece: str) -> tuple[str, str]:
        self._buf += piece
        reasoning = ""
        if self._state == "start":
            head = self._buf.lstrip()
            if head.startswith(OPEN):
                self._buf, self._state = head[len(OPEN) :], "opened"
            elif not head or OPEN.startswith(head):
                return "", ""  # blank so far, or the beginning of "<think>": wait
            else:
                self._state = "answering"
        if self._state == "opened":
            self._buf = self._buf.lstrip()
            if not self._buf:
                return "", ""
            self._state = "thinking"
        if self._state == "thinking":
            end = self._buf.find(CLOSE)
            if end < 0:
                cut = len(self._buf) - held_back(self._buf, CLOSE)
                reasoning = self._buf[:cut].rstrip()
                self._buf = self._buf[len(reasoning) :]
                return reasoning, ""
            reasoning, self._buf = self._buf[:end].rstrip(), self._buf[end + len(CLOSE) :]
            self._state = "after"
        if self._state == "after":
            self._buf = self._buf.lstrip()
            if not self._buf:
                return reasoning, ""
            self._state = "answering"
        content, self._buf = self._buf, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is held when generation ends: the end of an unclosed trace, or a start that never
        became one."""
        held, state = self._buf, self._state
        self._buf, self._state = "", "answering"
        if state in ("opened", "thinking"):
            return held.strip(), ""
        if state == "start":
            return "", held
        return "", ""  # after (blank) or answering (nothing is held)


def held_back(text: str, token: str) -> int:
    """Length of the longest end of `text` that is a beginning of `token` (streamed text a parser
    holds until the next piece tells whether the token follows)."""
    for n in range(min(len(text), len(token) - 1), 0, -1):
        if token.startswith(text[-n:]):
            return n
    return 0
