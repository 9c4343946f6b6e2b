"""One request inside the continuous engine (Ray-free): its sampling, its stop rules and the text
it has streamed so far.

Sampling follows `generate`'s order (OpenAI penalties, temperature, top-p) on the row's own
logits with the row's own random generator, so a seeded request draws the same tokens whatever
else runs beside it, and a sampling value that makes torch raise fails this request only.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import cast

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from oikyo_ray.eval.generate import penalty_processors

OnPiece = Callable[[str], None]


@dataclass
class Sequence:
    prompt: list[int]
    adapter: str | None
    sampling: dict
    stop_ids: set[int]
    decode: Callable[[list[int]], str]  # token ids -> text, special tokens skipped
    on_piece: OnPiece | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    deadline: float | None = None  # time.monotonic() after which the request fails with TimeoutError
    future: Future = field(default_factory=Future)
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already given to on_piece
    cut: int | None = None  # where a stop string starts in `text`

    def __post_init__(self) -> None:
        s = self.sampling
        self.processors = penalty_processors(s.get("presence_penalty"), s.get("frequency_penalty"))
        if s.get("temperature", 0.0) > 0:
            self.processors = LogitsProcessorList([*self.processors, TemperatureLogitsWarper(s["temperature"])])
            if s.get("top_p", 1.0) < 1.0:
                self.processors.append(TopPLogitsWarper(s["top_p"]))
        seed = s.get("seed")
        self.generator = torch.Generator(device="cpu").manual_seed(random.getrandbits(63) if seed is None else seed)

    @torch.no_grad()
    def plain_greedy(self) -> bool:
        """Greedy with nothing changing the logits: the batch's one argmax gives this row's token."""
        return not self.processors and self.sampling.get("temperature", 0.0) <= 0

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's logits [vocab]."""
        scores = logits[None].float()
        if self.processors:
            ids = cast(torch.LongTensor, torch.tensor([self.prompt + self.generated], device=logits.device))
            scores = self.processors(ids, scores)
        if self.sampling.get("temperature", 0.0) <= 0:
            return int(scores.argmax())
        probs = torch.softmax(scores, dim=-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def push(self, token: int) -> str | None:
        """Take the token chosen for this row; the finish reason once the request is complete."""
        if token in self.stop_ids:
            return "stop"
        self.generated.append(token)
        self.text = self.decode(self.generated)
        stops = [s for s in self.sampling.get("stop") or [] if s]
        self.cut = min((self.text.index(s) for s in stops if s in self.text), default=None)
        self._send(final=self.cut is not None)
        if self.cut is not None:
            return "stop"
        return "length" if len(self.generated) >= self.sampling["max_new_tokens"] else None

    def _send(self, final: bool) -> None:
        """Give on_piece the new text, holding back what a stop string or an unfinished UTF-8
        character could still change."""
        end = len(self.text) if self.cut is None else self.cut
        if not final:
            end = min(end, len(self.text) - _held_back(self.text, self.sampling.get("stop") or []))
        if end > self.sent and self.on_piece:
            self.on_piece(self.text[self.sent : end])
        self.sent = max(self.sent, end)

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def finish(self, reason: str) -> None:
        if self.future.done():  # cancelled by its caller
            return
        self._send(final=True)
        self.future.set_result(
            {
                "text": self.text if self.cut is None else self.text[: self.cut],
                "prompt_tokens": len(self.prompt),
                "completion_tokens": len(self.generated),
                "finish_reason": reason,
            }
        )

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters to keep unsent: an unfinished character, or the longest tail
    that begins a stop string."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
