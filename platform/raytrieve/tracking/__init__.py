"""Experiment tracking (MLflow): the driver owns the run, rank 0 logs into it."""
