"""Train stage: the explicit training loop (core, Ray-free) and its Ray Train orchestration."""
