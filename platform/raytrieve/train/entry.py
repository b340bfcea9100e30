"""What Ray Train is handed: the worker entry ``train_loop_per_worker`` and the ``WorkerSpec`` it
runs (the command-line entries of training are in ``raytrieve.jobs_entry``).

Ray Train's controller actor unpickles the worker entry and its spec before any worker starts,
so this module imports nothing heavy: pickled by reference to ``raytrieve.train.loop`` (torch,
transformers, every loss) they cost the controller's process about 3 s of imports per run on 2
cores, on the critical path of every training job. The worker imports the loop itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raytrieve.train.config import TrainConfig


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
