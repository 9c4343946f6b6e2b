"""The model registry: named models, numbered versions (a run's adapter), movable aliases."""
