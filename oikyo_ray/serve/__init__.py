"""Serve stage: an OpenAI-compatible app on Ray Serve over one base model and its adapters."""
