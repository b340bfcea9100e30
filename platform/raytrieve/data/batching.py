"""Batch composition for training, as plain functions over row indices and small per-row keys
(the driver plans with them; they hold no Ray state and never see a text).

- no_duplicates: a batch never holds the same text twice (in any column), or an in-batch
  negative would be a copy of the positive; texts are compared by a 64-bit hash per value;
- group_by_label: batches hold at least two rows per label (batch triplet losses need pairs);
- multi-dataset: each batch comes from one dataset (its loss applies), datasets interleaved
  proportionally to their size x weight, or round robin;
Equal steps per rank (what does not fit reported, never dropped silently) are the planner's
job: train/plan.py.

Row indices are numpy arrays (int32 below 2**31 rows): a million rows cost 4 MB, not the
~36 MB of a Python list of ints. Shuffles draw exactly what ``random.Random(seed).shuffle``
draws, so a plan is the same one the list-based planner made for the same data and seed.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from numpy.random._mt19937 import _MT19937State

_CHUNK = 65_536  # rows converted to Python ints at a time in the no-duplicates pass


@dataclass
class Batches:
    rows: np.ndarray  # every batch's row indices, batch after batch
    sizes: np.ndarray  # rows per batch (int64)
    dropped: int  # rows that fit in no batch
    reason: str = ""

    @property
    def batches(self) -> list[np.ndarray]:
        """Each batch's rows (views into ``rows``)."""
        return np.split(self.rows, np.cumsum(self.sizes)[:-1]) if len(self.sizes) else []


def index_dtype(n: int) -> type:
    return np.int32 if n < 2**31 else np.int64


def shuffle(x: np.ndarray, rng: random.Random) -> None:
    """Shuffle ``x`` in place exactly as ``rng.shuffle(list(x))`` would, advancing ``rng`` the same.

    CPython's shuffle draws ``randbelow(i + 1)`` for i = n-1 .. 1, each from 32-bit Mersenne
    Twister words (rejection sampling on the top bits); numpy's MT19937 gives the same words
    from the same state, in bulk, so only the swap loop runs in Python.
    """
    n = len(x)
    if n < 2:
        return
    if n <= 1024:  # small: the state round trip costs more than the list
        values = x.tolist()
        rng.shuffle(values)
        x[:] = values
        return
    version, internal, gauss = rng.getstate()
    state: _MT19937State = {
        "bit_generator": "MT19937",
        "state": {"key": np.array(internal[:-1], dtype=np.uint32), "pos": internal[-1]},
    }
    bits = np.random.MT19937()
    bits.state = state
    view = memoryview(x)  # pyright: ignore[reportArgumentType]  # numpy declares ndarray.__buffer__ for 3.12+ only
    words: list[int] = []
    p = used = 0
    for i in range(n - 1, 0, -1):
        m = i + 1
        shift = 32 - m.bit_length()
        while True:
            if p == len(words):
                words = bits.random_raw(_CHUNK).tolist()
                p = 0
            r = words[p] >> shift
            p += 1
            used += 1
            if r < m:
                break
        view[i], view[r] = view[r], view[i]
    bits.state = state  # replay exactly the words used, so the caller's rng continues in step
    bits.random_raw(used)
    after = bits.state["state"]
    rng.setstate((version, (*tuple(int(k) for k in after["key"]), int(after["pos"])), gauss))


def shuffled_range(n: int, rng: random.Random) -> np.ndarray:
    order = np.arange(n, dtype=index_dtype(n))
    shuffle(order, rng)
    return order


def no_duplicates_batches(keys: np.ndarray, batch_size: int, seed: int, drop_last: bool = False) -> Batches:
    """Batches of row indices where no text value repeats inside a batch.

    ``keys[i]`` are the 64-bit hashes of row i's text values (one per column, shape (rows,
    columns)). Rows are shuffled with ``seed``; a row that would repeat a value waits for a
    later pass.
    """
    keys = np.asarray(keys)
    if keys.ndim == 1:
        keys = keys[:, None]
    n = len(keys)
    order = shuffled_range(n, random.Random(seed))
    if keys.shape[1] > 1:
        clash = np.zeros(n, dtype=bool)  # column pairs compared in place: no copy of the keys
        for a in range(keys.shape[1]):
            for b in range(a + 1, keys.shape[1]):
                clash |= keys[:, a] == keys[:, b]
        pending = order[~clash[order]] if clash.any() else order
        del clash
    else:
        pending = order
    del order
    out = np.empty(len(pending), dtype=pending.dtype)
    filled = 0
    sizes: list[int] = []
    # Each pass fills batches in order; a row clashing with the open batch waits for the
    # next pass. Clashes are rare, so this is close to one pass over the data.
    while len(pending):
        deferred = array("q")
        seen: set[int] = set()
        count = 0
        for start in range(0, len(pending), _CHUNK):
            idx = pending[start : start + _CHUNK]
            for i, values in zip(idx.tolist(), keys[idx].tolist()):
                if any(v in seen for v in values):
                    deferred.append(i)
                    continue
                out[filled] = i
                filled += 1
                seen.update(values)
                count += 1
                if count == batch_size:
                    sizes.append(count)
                    count, seen = 0, set()
        if count:
            sizes.append(count)
        if len(deferred) == len(pending):  # cannot happen: the first row always fits
            break
        pending = np.frombuffer(deferred, dtype=np.int64).astype(out.dtype)
    rows, size_array = out[:filled], np.asarray(sizes, dtype=np.int64)
    dropped = n - filled
    reason = "rows whose own columns repeat the same text" if dropped else ""
    if drop_last and len(size_array) and size_array[-1] < batch_size:
        dropped += int(size_array[-1])
        rows, size_array = rows[: filled - int(size_array[-1])], size_array[:-1]
        reason = (reason + "; " if reason else "") + "incomplete last batch"
    return Batches(rows, size_array, dropped, reason)


def group_by_label_batches(labels: np.ndarray | Sequence, batch_size: int, seed: int) -> Batches:
    """Batches (size rounded down to even) filled with pairs of rows sharing a label.

    ``labels`` holds one hashable key per row (the label itself, or a hash of a list label).
    Label groups are taken in order of first appearance, each shuffled, then the pairs.
    """
    labels = np.asarray(labels)
    n = len(labels)
    rng = random.Random(seed)
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    group = rank[inverse.reshape(-1)]
    rows = np.argsort(group, kind="stable").astype(index_dtype(n))  # grouped, ascending inside a group
    counts = np.bincount(group, minlength=len(first)) if n else np.zeros(0, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else counts
    pair_starts = array("q")
    leftover = 0
    for start, count in zip(starts.tolist(), counts.tolist()):
        shuffle(rows[start : start + count], rng)
        usable = count - count % 2
        pair_starts.extend(range(start, start + usable, 2))
        leftover += count - usable
    pairs = np.frombuffer(pair_starts, dtype=np.int64) if len(pair_starts) else np.zeros(0, dtype=np.int64)
    shuffle(pairs, rng)
    ordered = np.stack([rows[pairs], rows[pairs + 1]], axis=1).reshape(-1) if len(pairs) else rows[:0]
    per_batch = max(1, batch_size // 2)
    full, tail = divmod(len(pairs), per_batch)
    sizes = np.array([2 * per_batch] * full + ([2 * tail] if tail else []), dtype=np.int64)
    return Batches(ordered, sizes, leftover, "one row of an odd-sized label group" if leftover else "")


def default_batches(n: int, batch_size: int, seed: int) -> Batches:
    order = shuffled_range(n, random.Random(seed))
    full, tail = divmod(n, batch_size)
    return Batches(order, np.array([batch_size] * full + ([tail] if tail else []), dtype=np.int64), 0)


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
