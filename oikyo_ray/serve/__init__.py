"""Serve stage: an OpenAI-compatible API over one base model and its adapters. The HTTP app, the
replica's batching and the engine are Ray-free; `ray_serve.py` deploys them on Ray Serve."""
