"""Evaluate stage: generation, metrics and the base-vs-fine-tuned report."""
