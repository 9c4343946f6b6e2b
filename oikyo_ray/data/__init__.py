"""Data stage: read, normalise, validate, split and tokenise (core, Ray-free) + the Ray Data pipeline."""
