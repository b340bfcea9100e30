"""The demo's fine-tuning step: the shipped training config (with the demo's overrides) on Ray
Train, tracked and registered in the demo's MLflow store."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from raytrieve.demo.config import FineTuneConfig
from raytrieve.demo.phase_configs import EXPERIMENT, PhaseConfig
from raytrieve.demo.progress import Progress


def _training_status(uri: str, kind: str) -> str | None:
    from raytrieve.tracking import mlflow_run

    c = mlflow_run.client(uri)
    exp = c.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return None
    runs = c.search_runs(
        [exp.experiment_id],
        filter_string=f"attributes.run_name = 'demo-{kind}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    loss = runs[0].data.metrics.get("loss")
    steps = c.get_metric_history(runs[0].info.run_id, "loss")
    return f"step {steps[-1].step}, loss {loss:.4f}" if steps and loss is not None else None


def fine_tune(kind: str, ft: FineTuneConfig, train: PhaseConfig[Any], saved: Path, progress: Progress) -> dict:
    from raytrieve.train.checkpoint import checkpoint_dir
    from raytrieve.train.run import run_training

    tc = train.config
    # A changed config must not resume from (or be refused by) an older run's checkpoints.
    for stale in (Path(tc.output_dir), checkpoint_dir(tc)):
        shutil.rmtree(stale, ignore_errors=True)
    train.save(saved, "raytrieve train")
    uri = tc.mlflow.tracking_uri
    with progress.heartbeat(f"training {kind}", lambda: _training_status(uri, kind)):
        result = run_training(tc, where=f"demo {kind}_training", ray_address=None)
    return {
        "model_dir": result.output_dir,
        "run_id": result.run_id,
        "steps": result.steps,
        "uri": f"models:/{ft.register_as}/{result.model_version}",
        "config": str(saved),
    }


def registered(uri: str, model_uri: str) -> bool:
    """Whether a cached training step's registry version still exists (the store may be gone)."""
    from raytrieve.tracking import mlflow_run

    try:
        name, version = model_uri.removeprefix("models:/").split("/")
        mlflow_run.client(uri).get_model_version(name, version)
        return True
    except Exception:
        return False
