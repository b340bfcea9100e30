"""The demo's fine-tuning steps: the shipped training config (with the demo's overrides) on Ray
Train, tracked and registered in the demo's MLflow store; for the reranker, first the hard
negatives the fine-tuned dense model mines from the train pairs (`raytrieve mine`)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from raytrieve.demo.config import DemoConfig, FineTuneConfig
from raytrieve.demo.phase_configs import EXPERIMENT, PhaseConfig, mine_config
from raytrieve.demo.progress import Progress, StageStore


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
    from raytrieve.data.files import OutputStore
    from raytrieve.train.checkpoint import checkpoint_dir
    from raytrieve.train.run import run_training

    tc = train.config
    # A changed config must not resume from (or be refused by) an older run's checkpoints.
    shutil.rmtree(Path(tc.output_dir), ignore_errors=True)
    store = OutputStore(checkpoint_dir(tc))  # on disk, or an object store's URI
    if store.is_folder():
        store.fs.delete_dir(store.root)
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
        with mlflow_run.registry(uri) as c:
            c.get_model_version(name, version)
        return True
    except Exception:
        return False


def mine_negatives(
    cfg: DemoConfig, train_path: Path, dense: dict, store: StageStore, progress: Progress, base_key: dict
) -> dict:
    """The mining job's result (``output_path``, ``rows``...) for the train pairs, mined with the
    fine-tuned dense model ``dense`` (its training step's record); reused while both, the samples
    and the stage format (``base_key``) hold."""
    from dataclasses import asdict

    from raytrieve.inference.mine import run_mine

    output = cfg.out / "mined" / "train_hard_negatives.parquet"
    mine = mine_config(cfg, train_path, dense["uri"], output)
    key = {**base_key, "mine": mine.config.model_dump(mode="json"), "dense": [dense["uri"], dense.get("run_id")]}
    cached = store.get("mine", key, lambda r: Path(r["output_path"]).exists())
    if cached is not None:
        progress(f"  mining: reused {cached['rows']} rows")
        return cached
    shutil.rmtree(output.parent, ignore_errors=True)  # an older run's negatives and work folder
    mine.save(cfg.out / "configs" / "mine.yaml", "raytrieve mine")
    progress(f"  mining hard negatives for the reranker with {dense['uri']} ({mine.source} with the demo's overrides)")
    with progress.heartbeat("mining"):
        result = run_mine(mine.config, where="demo mine", ray_address=None)
    progress(f"  mined {result.rows} rows ({result.pairs_dropped} pairs without 3 negatives left out)")
    return store.put("mine", key, asdict(result))
