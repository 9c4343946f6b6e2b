"""Experiment tracking (Ray-free): runs, sweeps and registry aliases logged to MLflow and W&B from the driver."""
