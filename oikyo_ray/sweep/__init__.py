"""Sweep stage: search spaces over any config field, budgets and results (Ray-free core), and ASHA
on Ray Tune (ray_tune.py, the stage's only Ray module)."""
