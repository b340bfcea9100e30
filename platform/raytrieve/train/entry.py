"""The entry points of training, each light to import: ``train_from_args`` (what ``raytrieve
train`` and ``jobs/train.py`` share: load the config, run, print the result) and what Ray Train
is handed, the worker entry ``train_loop_per_worker`` and the ``WorkerSpec`` it runs.

Ray Train's controller actor unpickles the worker entry and its spec before any worker starts,
so this module imports nothing heavy: pickled by reference to ``raytrieve.train.loop`` (torch,
transformers, every loss) they cost the controller's process about 3 s of imports per run on 2
cores, on the critical path of every training job. The worker imports the loop itself.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from typing import Any

from raytrieve.errors import RaytrieveError
from raytrieve.train.config import TrainConfig


def train_from_args(config: str, overrides: list[str], ray_address: str | None) -> int:
    from raytrieve.train.config import load_train_config
    from raytrieve.train.run import run_training

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_train_config(config, overrides)
        result = run_training(cfg, where=config, ray_address=ray_address)
    except RaytrieveError as e:
        print(f"raytrieve train: error: {e}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "output_dir": result.output_dir,
                "steps": result.steps,
                "mlflow_run_id": result.run_id,
                "model_version": result.model_version,
                "not_trained_on": result.dropped,
            }
        )
    )
    return 0


@dataclass
class WorkerSpec:
    """Everything a worker needs, resolved on the driver (picklable, no Ray objects)."""

    config: TrainConfig
    model_path: str  # local sentence-transformers folder
    optimizer_steps: int
    stream: Any  # data.pipeline.StreamSpec: columns, prompts, routes, label kinds per dataset
    micro_batch_epoch: Any  # numpy int32 per micro-batch: its epoch
    micro_batch_rows: Any  # numpy int64 per micro-batch: rows per rank
    tracking_uri: str | None = None
    run_id: str | None = None
    eval_columns: dict[str, list[Any]] | None = None
    threads: int | None = None
    samples_per_step: int = 0  # global rows per optimizer step


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: ``loop_config = {"spec": WorkerSpec}``."""
    from raytrieve.train.loop import run_worker

    run_worker(loop_config["spec"])
