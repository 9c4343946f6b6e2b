"""Drift: captured traffic against the prompts a served model was trained on."""
