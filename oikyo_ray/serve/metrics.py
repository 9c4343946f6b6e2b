"""Per-adapter Prometheus metrics, exported through Ray's metrics agent (`ray_oikyo_*`)."""

from __future__ import annotations

import time


class ServeMetrics:
    def __init__(self):
        from ray.serve import metrics

        tags = ("model", "status")
        self.requests = metrics.Counter("oikyo_requests", description="Requests by model and HTTP status.",
                                        tag_keys=tags)
        self.tokens = metrics.Counter("oikyo_tokens", description="Tokens by model and kind.",
                                      tag_keys=("model", "kind"))
        self.latency = metrics.Histogram("oikyo_request_latency_ms", description="End-to-end latency.",
                                         boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000],
                                         tag_keys=tags)

    def done(self, model: str, status: int, t0: float, outs: list[dict] | None = None) -> None:
        tags = {"model": model, "status": str(status)}
        self.requests.inc(1, tags=tags)
        self.latency.observe((time.perf_counter() - t0) * 1000, tags=tags)
        for o in outs or []:
            for kind in ("prompt", "completion"):
                if o.get(f"{kind}_tokens"):
                    self.tokens.inc(o[f"{kind}_tokens"], tags={"model": model, "kind": kind})
