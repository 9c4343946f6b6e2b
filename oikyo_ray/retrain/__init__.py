"""Retraining: a registry model's captured traffic and feedback become a challenger that must beat its champion."""
