"""The batch plan of a whole training run, made on the driver before any worker starts.

Each epoch, every dataset is cut into *global* batches of ``batch_size x world_size`` rows
(no duplicate texts, or pairs sharing a label, or plain shuffled), the datasets' batches are
interleaved (one dataset per batch, so that dataset's loss applies), and each global batch
is split into ``world_size`` equal slices, one per rank. So:

- in-batch negatives gathered across ranks see exactly the single-process batch;
- every rank takes the same number of micro-batches (an uneven tail would deadlock DDP);
- each rank's sequence is fixed by the seed, so a resumed run skips exactly what it did.

Rows that fit in no batch are counted with the reason, and the caller reports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

from raytrieve.data.batching import Batches, default_batches, group_by_label_batches, interleave, no_duplicates_batches
from raytrieve.train.config import TrainingConfig


@dataclass
class DatasetRows:
    """What the planner needs of one dataset: each row's text values and its label."""

    name: str
    texts: list[tuple[Hashable, ...]]  # per row, the values of its text columns (lists as tuples)
    labels: list[Any] | None
    weight: float = 1.0


@dataclass
class MicroBatch:
    epoch: int
    dataset: int
    rows: list[int]


@dataclass
class Plan:
    per_rank: list[list[MicroBatch]]  # the same length on every rank
    optimizer_steps: int
    steps_per_epoch: list[int]  # optimizer steps in each planned epoch
    dropped: list[str] = field(default_factory=list)  # "N rows of <dataset> in epoch E: <reason>"

    @property
    def micro_batches(self) -> int:
        return len(self.per_rank[0]) if self.per_rank else 0


def _hashable(value: Any) -> Hashable:
    return tuple(value) if isinstance(value, list) else value


def dataset_rows(name: str, columns: dict[str, list[Any]], text_columns: Sequence[str], label_column: str | None,
                 weight: float = 1.0) -> DatasetRows:
    texts = [tuple(_hashable(v) for v in row) for row in zip(*(columns[c] for c in text_columns))]
    labels = columns[label_column] if label_column else None
    return DatasetRows(name, texts, labels, weight)


def _global_batches(d: DatasetRows, sampler: str, size: int, seed: int) -> Batches:
    if sampler == "no_duplicates":
        return no_duplicates_batches(d.texts, size, seed)
    if sampler == "group_by_label":
        return group_by_label_batches([_hashable(label) for label in d.labels or []], size, seed)
    return default_batches(len(d.texts), size, seed)


def plan_training(datasets: Sequence[DatasetRows], training: TrainingConfig, world_size: int) -> Plan:
    per_rank: list[list[MicroBatch]] = [[] for _ in range(world_size)]
    dropped: list[str] = []
    steps_per_epoch: list[int] = []
    accumulation = training.gradient_accumulation_steps
    total = 0
    epoch = 0
    while True:
        seed = training.seed + epoch
        batches: list[list[list[int]]] = []
        for d in datasets:
            b = _global_batches(d, training.batch_sampler, training.batch_size * world_size, seed)
            kept = []
            for rows in b.batches:
                usable = len(rows) - len(rows) % world_size
                if usable < len(rows):
                    # A short last batch is cut to a multiple of world_size: every rank must
                    # hold the same number of rows for the cross-rank gather.
                    dropped.append(f"{len(rows) - usable} row(s) of {d.name} in epoch {epoch}: last batch cut to a "
                                   f"multiple of {world_size} workers")
                if usable:
                    kept.append(rows[:usable])
            if b.dropped:
                dropped.append(f"{b.dropped} row(s) of {d.name} in epoch {epoch}: {b.reason}")
            batches.append(kept)
        order = interleave([len(b) for b in batches], [d.weight for d in datasets], training.multi_dataset_sampler, seed)
        for i, d in enumerate(datasets):
            unused = len(batches[i]) - sum(1 for k, _ in order if k == i)
            if unused:
                dropped.append(f"{unused} batch(es) of {d.name} in epoch {epoch}: round_robin stops when the "
                               "smallest dataset runs out")
        tail = len(order) % accumulation
        if tail:
            dropped.append(f"{tail} batch(es) in epoch {epoch}: fewer than gradient_accumulation_steps={accumulation} left")
            order = order[: len(order) - tail]
        steps = len(order) // accumulation
        if training.max_steps is not None:
            steps = min(steps, training.max_steps - total)
            order = order[: steps * accumulation]
        for k, j in order:
            rows = batches[k][j]
            share = len(rows) // world_size
            for r in range(world_size):
                per_rank[r].append(MicroBatch(epoch, k, rows[r * share : (r + 1) * share]))
        steps_per_epoch.append(steps)
        total += steps
        epoch += 1
        if steps == 0 and training.max_steps is not None:
            break  # the data gives no full step: more epochs would not help
        done = total >= training.max_steps if training.max_steps is not None else epoch >= training.epochs
        if done:
            break
    return Plan(per_rank, total, steps_per_epoch, dropped)
