"""Runs: one directory per run with config, lineage, metrics, adapter and reports."""
