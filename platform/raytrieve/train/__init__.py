"""Training on Ray Train: the typed config (here now); the train loop, checkpoints and
MLflow tracking come with the distributed-training issue."""
