"""Batch composition for training, as plain functions over row indices (the Ray Data
pipeline and the train loop call them; they hold no Ray state).

- no_duplicates: a batch never holds the same text twice (in any column), or an in-batch
  negative would be a copy of the positive;
- group_by_label: batches hold at least two rows per label (batch triplet losses need pairs);
- multi-dataset: each batch comes from one dataset (its loss applies), datasets interleaved
  proportionally to their size x weight, or round robin;
- equal steps per rank: every data-parallel rank gets the same number of batches, and what
  does not fit is reported, never silently dropped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Hashable, Sequence


@dataclass
class Batches:
    batches: list[list[int]]
    dropped: int  # rows that fit in no batch
    reason: str = ""


def no_duplicates_batches(texts: Sequence[Sequence[Hashable]], batch_size: int, seed: int, drop_last: bool = False) -> Batches:
    """Batches of row indices where no text value repeats inside a batch.

    ``texts[i]`` are the values of row i (one per column). Rows are shuffled with ``seed``; a
    row that would repeat a text waits for a later batch.
    """
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    batches: list[list[int]] = []
    pending = [i for i in order if len(set(texts[i])) == len(texts[i])]
    # Each pass fills batches in order; a row clashing with the open batch waits for the
    # next pass. Clashes are rare, so this is close to one pass over the data.
    while pending:
        batch, seen, deferred = [], set(), []
        for i in pending:
            values = set(texts[i])
            if values & seen:
                deferred.append(i)
                continue
            batch.append(i)
            seen |= values
            if len(batch) == batch_size:
                batches.append(batch)
                batch, seen = [], set()
        if batch:
            batches.append(batch)
        if len(deferred) == len(pending):  # cannot happen: the first row always fits
            break
        pending = deferred
    dropped = len(texts) - sum(len(b) for b in batches)
    reason = "rows whose own columns repeat the same text" if dropped else ""
    if drop_last and batches and len(batches[-1]) < batch_size:
        dropped += len(batches.pop())
        reason = (reason + "; " if reason else "") + "incomplete last batch"
    return Batches(batches, dropped, reason)


def group_by_label_batches(labels: Sequence[Hashable], batch_size: int, seed: int) -> Batches:
    """Batches (size rounded down to even) filled with pairs of rows sharing a label."""
    rng = random.Random(seed)
    by_label: dict[Hashable, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    pairs: list[list[int]] = []
    leftover = 0
    for rows in by_label.values():
        rng.shuffle(rows)
        usable = len(rows) - len(rows) % 2
        pairs += [rows[j : j + 2] for j in range(0, usable, 2)]
        leftover += len(rows) - usable
    rng.shuffle(pairs)
    per_batch = max(1, batch_size // 2)
    batches = [sum(pairs[j : j + per_batch], []) for j in range(0, len(pairs), per_batch)]
    return Batches(batches, leftover, "one row of an odd-sized label group" if leftover else "")


def default_batches(n: int, batch_size: int, seed: int) -> Batches:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return Batches([order[j : j + batch_size] for j in range(0, n, batch_size)], 0)


def interleave(counts: Sequence[int], weights: Sequence[float], mode: str, seed: int) -> list[tuple[int, int]]:
    """Order in which datasets give their batches: [(dataset, its k-th batch), ...].

    proportional: every batch of every dataset once, in a seeded random order where dataset d
    appears with probability proportional to its remaining batches x weight; round_robin:
    one batch of each in turn, until the smallest runs out (the rest is reported by the caller).
    """
    if mode == "round_robin":
        rounds = min(counts) if counts else 0
        return [(d, k) for k in range(rounds) for d in range(len(counts))]
    rng = random.Random(seed)
    remaining = list(counts)
    taken = [0] * len(counts)
    out = []
    while any(remaining):
        scores = [r * w for r, w in zip(remaining, weights)]
        d = rng.choices(range(len(counts)), weights=scores)[0]
        out.append((d, taken[d]))
        taken[d] += 1
        remaining[d] -= 1
    return out


def equal_steps(steps: Sequence, world_size: int) -> tuple[list[list], int]:
    """Split a step sequence over ranks round-robin, each rank the same number of steps.

    Uneven tails would leave one rank waiting in an all-reduce forever (DDP deadlock); the
    extra steps (< world_size) are returned as a count for the caller to report.
    """
    usable = len(steps) - len(steps) % world_size
    return [list(steps[r:usable:world_size]) for r in range(world_size)], len(steps) - usable
