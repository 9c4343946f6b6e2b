"""A sweep's step budgets (Ray-free), counted as training counts its steps (train/steps.py): with
data.packing on, in packed blocks."""

from __future__ import annotations

from oikyo_ray.config import OikyoConfig
from oikyo_ray.train.steps import run_steps


def max_t(cfg: OikyoConfig, manifest: dict) -> int:
    """ASHA's full budget: sweep.max_t, else the steps the sweep's base config trains."""
    return cfg.sweep.max_t or run_steps(cfg, manifest)


def trial_budget(cfg: OikyoConfig, trial_cfg: OikyoConfig, manifest: dict) -> int:
    """The steps a trial (`trial_cfg`, the base `cfg` with its sampled values) trains, capped at
    sweep.max_t: a trial that reached them completed."""
    steps = run_steps(trial_cfg, manifest)
    return min(steps, cfg.sweep.max_t or steps)
