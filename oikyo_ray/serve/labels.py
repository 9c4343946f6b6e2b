"""The `model` label on request metrics, from a set that cannot grow without bound (Ray-free).

A client chooses the `model` string: used as a label as is, every made-up name would become a new
time series in Prometheus. Known names are the base, the configured adapters and any adapter a
request has been answered with; everything else is counted under one label.
"""

from __future__ import annotations

UNKNOWN = "_unknown"


class ModelLabels:
    def __init__(self, known: set[str], most: int = 256):
        self.known, self.most = set(known), most

    def __call__(self, model: str, status: int) -> str:
        if model in self.known:
            return model
        if status < 400 and len(self.known) < self.most:  # answered: the adapter exists
            self.known.add(model)
            return model
        return UNKNOWN
