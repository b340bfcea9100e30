"""What Ray Train is handed: the worker entry ``train_loop_per_worker`` and the ``WorkerSpec`` it
runs (the command-line entries of training are in ``raytrieve.jobs_entry``).

Ray Train's controller actor unpickles the worker entry and its spec before any worker starts,
so this module imports nothing heavy: pickled by reference to ``raytrieve.train.loop`` (torch,
transformers, every loss) they cost the controller's process about 3 s of imports per run on 2
cores, on the critical path of every training job. The worker imports the loop itself.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from raytrieve.train.config import TrainConfig


@dataclass
class WorkerSpec:
    """Everything a worker needs, resolved on the driver (picklable; its one Ray object is the
    shipped model's object ref)."""

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
    card: Any = None  # train.model_card.CardFacts: what the driver knows; rank 0 completes and writes it
    progress_key: str | None = None  # rank 0 posts its steps there (progress.ClusterCount) for the driver's bar
    shipped: Any = None  # model_ref.ShippedModel: model_path as workers on any machine reach it
    # The prompts the data trained with, by role ("query", "document"): the model's own from the
    # first step, so that its evaluation and the saved model encode as it trained (run.py).
    model_prompts: dict[str, str] | None = None
    # The prompt predict adds by default: a cross-encoder's trained one, by its name in model_prompts.
    model_default_prompt: str | None = None


def epoch_batches(spec: WorkerSpec, rank: int, epoch: int) -> Iterable[Any]:
    """This rank's rows of ``epoch`` as Arrow tables of at most the epoch's largest micro-batch,
    streamed from the dataset Ray Train hands the worker (``get_dataset_shard``)."""
    import numpy as np
    import ray.train

    sizes = np.asarray(spec.micro_batch_rows)[np.asarray(spec.micro_batch_epoch) == epoch]
    shard = ray.train.get_dataset_shard(f"rank{rank}_epoch{epoch}")
    assert shard is not None, "the trainer is given every rank's dataset of every epoch"
    return shard.iter_batches(batch_size=int(sizes.max()), batch_format="pyarrow", prefetch_batches=2)


class FirstEpoch:
    """The first epoch's stream, started on a thread as the worker starts: Ray Data's pipeline
    (its coordinator actor, read and tokenize tasks) takes seconds to deliver a first batch, and
    it now does so while the worker imports torch and loads the model and losses instead of after.
    ``tables()`` hands the stream over, first batch included, to the training loop's thread."""

    def __init__(self, spec: WorkerSpec, rank: int, epoch: int) -> None:
        self.epoch = epoch
        self._rest: Iterator[Any] = iter(())
        self._first: list[Any] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._start, args=(spec, rank), daemon=True, name="first-epoch")
        self._thread.start()

    def _start(self, spec: WorkerSpec, rank: int) -> None:
        try:
            self._rest = iter(epoch_batches(spec, rank, self.epoch))
            self._first = [b for b in (next(self._rest, None),) if b is not None]
        except BaseException as e:  # re-raised on the training thread, which owns the error
            self._error = e

    def tables(self) -> Iterator[Any]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        yield from self._first
        yield from self._rest


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: ``loop_config = {"spec": WorkerSpec}``."""
    import ray.train

    from raytrieve.ray_cluster import quiet_train_worker

    quiet_train_worker()
    spec: WorkerSpec = loop_config["spec"]
    # A fresh run reads its first epoch from the start: begin streaming it now. A resumed run
    # knows where it starts only after reading its checkpoint (the loop opens its streams then).
    first = None
    if ray.train.get_checkpoint() is None and len(spec.micro_batch_epoch):
        first = FirstEpoch(spec, ray.train.get_context().get_world_rank(), int(min(spec.micro_batch_epoch)))
    from raytrieve.train.loop import run_worker

    run_worker(spec, first)
