"""Traffic split: one served model name answered by several adapters by weight (Ray-free).

`serve.routes` maps a name clients send (`support-bot`) to adapters and weights (`{bot-v3: 90,
bot-v4: 10}`: a 10% canary, or an A/B test). A request with a user key (OpenAI's `user` field, or
the `X-Oikyo-User` header) goes where that key's hash falls among the weights, so one user always
sees one variant while the weights stay as they are, and moving a weight moves only the users in
the slice that changed hands. Requests without a key are assigned at random.
"""

from __future__ import annotations

import hashlib
import random


def pick(route: str, weights: dict[str, float], user: str | None) -> str:
    """The variant of `route` that answers this request."""
    point = random.random() if user is None else _unit(f"{route}\0{user}")
    total = sum(weights.values())
    edge = 0.0
    names = sorted(weights)  # a fixed order: the same key lands in the same slice on every replica
    for name in names:
        edge += weights[name] / total
        if point < edge:
            return name
    return names[-1]  # the float sum may end a hair below 1


def _unit(key: str) -> float:
    """A key's point in [0, 1), the same in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
