"""Sweep stage: search spaces over any config field (core) and ASHA on Ray Tune (tuner)."""
