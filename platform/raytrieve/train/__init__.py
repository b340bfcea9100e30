"""Training on Ray Train: the typed config (config.py), the batch plan (plan.py), the driver
(run.py: checks, Ray Data stage, TorchTrainer, MLflow), the worker entry (entry.py) and loop
(loop.py), DDP/FSDP (distributed.py), one optimizer step (step.py), evaluation during training
(evaluate.py), optimizers and schedules (optim.py) and checkpoints
(checkpoint.py)."""
