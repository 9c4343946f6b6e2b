"""`POST /v1/feedback` (Ray-free): what a client may say about an answer, which answers it may
say it about, and how often.

    {"id": "chatcmpl-…", "thumbs": "up"}                    # or "down"
    {"id": "chatcmpl-…", "score": 2, "correction": "…"}     # 1-5, a corrected answer
    {"id": "chatcmpl-…", "preferred_over": "chatcmpl-…"}    # a comparison of two answers

Feedback names completions this app answered recently (`Recent`, so a rating lands on the
version that gave the answer); each user (the body's `user`, else X-Oikyo-User) has a cap per hour.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ID = r"^(cmpl|chatcmpl)-[A-Za-z0-9]{1,64}$"


class FeedbackRequest(BaseModel):
    """The body of POST /v1/feedback (unknown fields are refused: a typo must not pass as no rating)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    id: str = Field(pattern=ID, description="The completion's id, as answered (`id` of the response).")
    thumbs: Literal["up", "down"] | None = None
    score: int | None = Field(None, ge=1, le=5)
    correction: str | None = Field(None, min_length=1)
    preferred_over: str | None = Field(None, pattern=ID, description="Another completion this one is better than.")
    comment: str | None = Field(None, max_length=2000)
    user: str | None = Field(None, max_length=256)

    @model_validator(mode="after")
    def _says_something(self) -> FeedbackRequest:
        if self.thumbs is None and self.score is None and self.correction is None and self.preferred_over is None:
            raise ValueError("give thumbs, score, correction or preferred_over")
        if self.thumbs is not None and self.score is not None:
            raise ValueError("give thumbs or score, not both")
        if self.preferred_over == self.id:
            raise ValueError("preferred_over: a completion cannot be preferred over itself")
        return self

    def kind(self) -> str:
        if self.preferred_over is not None:
            return "preference"
        if self.thumbs is not None or self.score is not None:
            return "rating"
        return "correction"

    def verdict(self) -> str:
        """positive | negative | neutral: what the A/B readout counts per variant. A correction
        alone says the answer was wrong; a preference says this answer was the better one."""
        if self.thumbs is not None:
            return "positive" if self.thumbs == "up" else "negative"
        if self.score is not None:
            return "positive" if self.score >= 4 else "negative" if self.score <= 2 else "neutral"
        if self.correction is not None:
            return "negative"
        return "positive"

    def normalized(self) -> float | None:
        """The rating on 0..1 (thumbs 0 or 1, score 1-5 -> 0, .25, ... 1), None without one."""
        if self.thumbs is not None:
            return 1.0 if self.thumbs == "up" else 0.0
        return None if self.score is None else (self.score - 1) / 4


@dataclass(frozen=True)
class Answered:
    """What the app knows of a completion it answered: under which name and role, and when."""

    model: str  # the served adapter name (a registry variant: NAME-vN)
    route: str
    role: str
    created: float


class Recent:
    """The last `size` completions this app answered (id -> `Answered`), oldest forgotten first."""

    def __init__(self, size: int) -> None:
        self.size, self.items = size, OrderedDict[str, Answered]()

    def add(self, completion_id: str, answered: Answered) -> None:
        self.items[completion_id] = answered
        if len(self.items) > self.size:
            self.items.popitem(last=False)

    def get(self, completion_id: str) -> Answered | None:
        return self.items.get(completion_id)


class UserCap:
    """At most `per_hour` feedback posts per user in any sliding hour (per app replica)."""

    def __init__(self, per_hour: int, max_users: int = 100_000) -> None:
        self.per_hour, self.max_users = per_hour, max_users
        self.seen = OrderedDict[str, deque[float]]()

    def allow(self, user: str, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        times = self.seen.pop(user, None) or deque()
        while times and times[0] <= now - 3600:
            times.popleft()
        ok = len(times) < self.per_hour
        if ok:
            times.append(now)
        self.seen[user] = times  # most recent last: the least recent user is forgotten first
        if len(self.seen) > self.max_users:
            self.seen.popitem(last=False)
        return ok
