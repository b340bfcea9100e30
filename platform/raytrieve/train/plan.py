"""The batch plan of a whole training run, made on the driver before any worker starts.

Each epoch, every dataset is cut into *global* batches of ``batch_size x world_size`` rows
(no duplicate texts, or pairs sharing a label, or plain shuffled), the datasets' batches are
interleaved (one dataset per batch, so that dataset's loss applies), and each global batch
is split into ``world_size`` equal slices, one per rank. So:

- in-batch negatives gathered across ranks see exactly the single-process batch;
- every rank takes the same number of micro-batches (an uneven tail would deadlock DDP);
- each rank's sequence is fixed by the seed, so a resumed run skips exactly what it did.

The planner sees row counts and small per-row keys (a 64-bit hash per text value, or the
label), never a text; the plan is numpy arrays of row indices. Rows that fit in no batch
are counted with the reason, and the caller reports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from raytrieve.data.batching import Batches, default_batches, group_by_label_batches, interleave, no_duplicates_batches
from raytrieve.errors import ConfigError
from raytrieve.train.config import TrainingConfig

POSITION_BITS = 24  # a row's stream key is (micro-batch << 24) | position in the rank's slice


@dataclass
class DatasetKeys:
    """What the planner needs of one dataset: its row count and the sampler's per-row keys."""

    name: str
    rows: int
    text_keys: np.ndarray | None = None  # (rows, text columns) uint64, for no_duplicates
    label_keys: np.ndarray | None = None  # (rows,), for group_by_label
    weight: float = 1.0
    # Fewest rows of a global batch that give its loss something to learn from: 2 (or 2 per
    # rank where the ranks do not gather) for a loss whose negatives are the batch's other
    # rows and no hard-negative column; a batch below it would train on a constant loss.
    least_batch: int = 1


@dataclass
class Plan:
    """Micro-batch m of the run is global batch ``rows[offsets[m]:offsets[m+1]]`` of dataset
    ``dataset[m]`` in epoch ``epoch[m]``; rank r trains on its r-th equal slice."""

    world_size: int
    rows: np.ndarray  # row indices (int32/int64), global batch after global batch
    offsets: np.ndarray  # int64, micro_batches + 1
    epoch: np.ndarray  # int32 per micro-batch
    dataset: np.ndarray  # int32 per micro-batch
    optimizer_steps: int
    steps_per_epoch: list[int]  # optimizer steps in each planned epoch
    dropped: list[str] = field(default_factory=list)  # "N rows of <dataset> in epoch E: <reason>"

    @property
    def micro_batches(self) -> int:
        return len(self.offsets) - 1

    @property
    def rank_sizes(self) -> np.ndarray:
        """Rows per rank in each micro-batch (the same on every rank)."""
        return np.diff(self.offsets) // self.world_size

    def rank_rows(self, rank: int, micro_batch: int) -> np.ndarray:
        share = int(self.offsets[micro_batch + 1] - self.offsets[micro_batch]) // self.world_size
        start = int(self.offsets[micro_batch]) + rank * share
        return self.rows[start : start + share]

    def rank_stream(self, rank: int, micro_batches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row indices, stream keys) of ``rank``'s rows in those micro-batches, in training order;
        a stream key is ``(micro-batch << POSITION_BITS) | position``."""
        micro_batches = np.asarray(micro_batches, dtype=np.int64)
        sizes = self.rank_sizes[micro_batches]
        total = int(sizes.sum())
        within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        starts = self.offsets[micro_batches] + rank * sizes
        rows = self.rows[np.repeat(starts, sizes) + within]
        return rows, (np.repeat(micro_batches, sizes) << POSITION_BITS) | within


def _global_batches(d: DatasetKeys, sampler: str, size: int, seed: int) -> Batches:
    if sampler == "no_duplicates":
        if d.text_keys is None:
            raise ConfigError(f"{d.name}: batch_sampler no_duplicates needs the dataset's text_keys")
        return no_duplicates_batches(d.text_keys, size, seed)
    if sampler == "group_by_label":
        if d.label_keys is None:
            raise ConfigError(f"{d.name}: batch_sampler group_by_label needs the dataset's label_keys")
        return group_by_label_batches(d.label_keys, size, seed)
    return default_batches(d.rows, size, seed)


def plan_training(datasets: Sequence[DatasetKeys], training: TrainingConfig, world_size: int) -> Plan:
    if training.batch_size >= 1 << POSITION_BITS:
        raise ConfigError(f"training.batch_size {training.batch_size} is above {(1 << POSITION_BITS) - 1}")
    dtype = np.int32 if max((d.rows for d in datasets), default=0) < 2**31 else np.int64
    parts: list[np.ndarray] = []
    sizes: list[int] = []
    epochs: list[int] = []
    sources: list[int] = []
    dropped: list[str] = []
    steps_per_epoch: list[int] = []
    accumulation = training.gradient_accumulation_steps
    total = 0
    epoch = 0
    while True:
        seed = training.seed + epoch
        batches: list[list[np.ndarray]] = []
        sampler = training.batch_sampler
        for d in datasets:
            b = _global_batches(d, sampler, training.batch_size * world_size, seed)
            kept = []
            cut = cut_batches = alone = lone_batches = 0
            for rows in b.batches:
                # A short batch (the last, or one no_duplicates closed early) is cut to a multiple
                # of world_size: every rank must hold the same number of rows for the gather.
                usable = len(rows) - len(rows) % world_size
                if usable < len(rows):
                    cut += len(rows) - usable
                    cut_batches += 1
                if 0 < usable < d.least_batch:
                    # Its loss would be constant (no other row to be a negative): a step that
                    # changes nothing but the optimizer's state. no_duplicates makes such
                    # batches wherever the data repeats a text more often than it has batches.
                    alone += usable
                    lone_batches += 1
                elif usable:
                    kept.append(rows[:usable])
            if cut:
                dropped.append(
                    f"{cut} row(s) of {d.name} in epoch {epoch}: {cut_batches} short batch(es) cut to a multiple of "
                    f"{world_size} workers"
                )
            if alone:
                dropped.append(
                    f"{alone} row(s) of {d.name} in epoch {epoch}: {lone_batches} batch(es) of fewer than "
                    f"{d.least_batch} rows, where its loss takes its negatives from the batch's other rows and "
                    "would be constant"
                    # One such batch may be a pass's remainder; several are texts the data repeats.
                    + (
                        " (no_duplicates kept repeated texts apart)"
                        if sampler == "no_duplicates" and lone_batches > 1
                        else ""
                    )
                )
            if b.dropped:
                dropped.append(f"{b.dropped} row(s) of {d.name} in epoch {epoch}: {b.reason}")
            batches.append(kept)
        order = interleave(
            [len(b) for b in batches], [d.weight for d in datasets], training.multi_dataset_sampler, seed
        )
        for i, d in enumerate(datasets):
            unused = len(batches[i]) - sum(1 for k, _ in order if k == i)
            if unused:
                dropped.append(
                    f"{unused} batch(es) of {d.name} in epoch {epoch}: round_robin stops when the "
                    "smallest dataset runs out"
                )
        tail = len(order) % accumulation
        if tail:
            dropped.append(
                f"{tail} batch(es) in epoch {epoch}: fewer than gradient_accumulation_steps={accumulation} left"
            )
            order = order[: len(order) - tail]
        steps = len(order) // accumulation
        if training.max_steps is not None and steps > training.max_steps - total:
            steps = training.max_steps - total
            for i, d in enumerate(datasets):  # what the step limit leaves unread this epoch
                cut = sum(len(batches[k][j]) for k, j in order[steps * accumulation :] if k == i)
                if cut:
                    dropped.append(
                        f"{cut} row(s) of {d.name} in epoch {epoch}: training.max_steps={training.max_steps} "
                        "reached first"
                    )
            order = order[: steps * accumulation]
        for k, j in order:
            rows = batches[k][j]
            parts.append(rows.astype(dtype, copy=False))
            sizes.append(len(rows))
            epochs.append(epoch)
            sources.append(k)
        del batches
        steps_per_epoch.append(steps)
        total += steps
        epoch += 1
        if steps == 0 and training.max_steps is not None:
            break  # the data gives no full step: more epochs would not help
        done = total >= training.max_steps if training.max_steps is not None else epoch >= training.epochs
        if done:
            break
    rows = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
    return Plan(
        world_size,
        rows,
        offsets,
        np.asarray(epochs, dtype=np.int32),
        np.asarray(sources, dtype=np.int32),
        total,
        steps_per_epoch,
        dropped,
    )
