"""What the app keeps of its traffic (Ray-free): captured answers (`serve.capture`), feedback on
them (`serve.feedback`) and the recent completion ids feedback may name.

    t = Traffic(cfg.serve, root, counts)       # root: serve.capture.root or <run.root>/capture
    t.answered(rid, info, row)                 # after an answer went out: never raises, never waits
    t.feedback_row(body, answered)             # the row stored for a POST /v1/feedback
"""

from __future__ import annotations

import time
from collections.abc import Callable

from oikyo_ray.config import ServeConfig
from oikyo_ray.runs import store
from oikyo_ray.serve.capture import ParquetWriter, sampled, user_key
from oikyo_ray.serve.feedback import Answered, FeedbackRequest, Recent, UserCap
from oikyo_ray.serve.redact import load_redactor

OPTIONAL = ("prompt", "completion", "params", "user")  # serve.capture.fields; the rest is always kept


class Traffic:
    def __init__(self, cfg: ServeConfig, root: str, counts: Callable[[str, str, int], None]) -> None:
        """`counts(stream, outcome, rows)`: stream is "completions" or "feedback"."""
        cap, fb = cfg.capture, cfg.feedback
        redactor = load_redactor(cap.redact_function) if cap.redact else None

        def writer(stream: str) -> ParquetWriter:
            return ParquetWriter(
                store.join(root, stream),
                redactor,
                max_chars=cap.max_chars,
                queue_rows=cap.queue_rows,
                flush_rows=cap.flush_rows,
                flush_s=cap.flush_s,
                retention_days=cap.retention_days,
                counts=lambda outcome, n: counts(stream, outcome, n),
            )

        self.cfg, self.root = cfg, root
        self.capture = writer("completions") if cap.enabled else None
        self.feedback = writer("feedback") if fb.enabled else None
        self.recent = Recent(fb.recent_completions) if fb.enabled else None
        self.cap = UserCap(fb.max_per_user_per_hour)
        self.counts = counts

    def answered(self, completion_id: str, info: Answered, row: Callable[[], dict]) -> None:
        """Remember the answer for feedback and capture it if sampled; `row` builds the captured
        fields (prompt, completion, params, user) only when the answer is kept."""
        if self.recent is not None:
            self.recent.add(completion_id, info)
        cap = self.cfg.capture
        if self.capture is None:
            return
        if not sampled(completion_id, cap.sample_rate):
            return
        fields = row()
        kept = {k: v for k, v in fields.items() if k in cap.fields or k not in OPTIONAL}
        if "user" in kept:
            kept["user"] = user_key(kept["user"])
        base = {"id": completion_id, "created": info.created, "model": info.model, "route": info.route}
        self.capture.offer({**base, "role": info.role, **kept})

    def feedback_row(self, body: FeedbackRequest, answered: Answered, user: str | None) -> dict:
        return {
            "id": body.id,
            "created": time.time(),
            "completion_created": answered.created,
            "model": answered.model,
            "route": answered.route,
            "role": answered.role,
            "kind": body.kind(),
            "verdict": body.verdict(),
            "thumbs": body.thumbs,
            "score": body.score,
            "normalized": body.normalized(),
            "correction": body.correction,
            "preferred_over": body.preferred_over,
            "comment": body.comment,
            "user": user_key(user),
        }

    def close(self) -> None:
        for w in (self.capture, self.feedback):
            if w is not None:
                w.close()
