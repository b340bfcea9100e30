"""Batch composition: no duplicate texts, label groups, dataset interleaving, equal steps.

The planner works on numpy row indices and 64-bit keys; the reference functions below are
the list-and-text planner it replaced, kept as an oracle: same data and seed, same batches."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from raytrieve.data.batching import (
    default_batches,
    group_by_label_batches,
    interleave,
    no_duplicates_batches,
    shuffle,
)
from raytrieve.data.row_keys import text_keys


def _reference_no_duplicates(texts, batch_size, seed):
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    batches = []
    pending = [i for i in order if len(set(texts[i])) == len(texts[i])]
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
        if len(deferred) == len(pending):
            break
        pending = deferred
    return batches


def _reference_group_by_label(labels, batch_size, seed):
    rng = random.Random(seed)
    by_label = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    pairs = []
    for rows in by_label.values():
        rng.shuffle(rows)
        usable = len(rows) - len(rows) % 2
        pairs += [rows[j : j + 2] for j in range(0, usable, 2)]
    rng.shuffle(pairs)
    per_batch = max(1, batch_size // 2)
    return [sum(pairs[j : j + per_batch], []) for j in range(0, len(pairs), per_batch)]


def _keys(rows):
    return np.stack([text_keys([r[c] for r in rows]) for c in range(len(rows[0]))], axis=1)


def test_no_duplicates_batches_never_repeat_a_text():
    # Many rows share positives: a naive batch would hold the same text twice.
    rows = [(f"q{i}", f"doc{i % 5}") for i in range(40)] + [("same", "same")]
    result = no_duplicates_batches(_keys(rows), batch_size=4, seed=0)
    for batch in result.batches:
        values = [v for i in batch for v in rows[i]]
        assert len(values) == len(set(values))
    used = sorted(int(i) for b in result.batches for i in b)
    assert used == list(range(40))  # every valid row placed exactly once
    assert result.dropped == 1 and "repeat the same text" in result.reason
    again = no_duplicates_batches(_keys(rows), batch_size=4, seed=0)
    assert np.array_equal(again.rows, result.rows) and np.array_equal(again.sizes, result.sizes)


@pytest.mark.parametrize("n,seed", [(41, 0), (3000, 7)])  # 3000: the bulk (numpy) shuffle path
def test_same_batches_as_the_text_planner(n, seed):
    rows = [(f"q{i % (n // 2)}", f"doc{i % 17}", f"neg{i % 23}") for i in range(n)]
    want = _reference_no_duplicates(rows, 8, seed)
    got = no_duplicates_batches(_keys(rows), 8, seed)
    assert [b.tolist() for b in got.batches] == want
    assert got.rows.dtype == np.int32


def test_shuffle_draws_as_python():
    for n in (5, 1500, 70_000):
        a, b = random.Random(3), random.Random(3)
        values = list(range(n))
        a.shuffle(values)
        x = np.arange(n, dtype=np.int64)
        shuffle(x, b)
        assert x.tolist() == values
        assert a.random() == b.random()  # the generator continues in step


def test_group_by_label_pairs():
    labels = [0, 0, 1, 1, 1, 2, 2, 2, 2, 3]
    result = group_by_label_batches(labels, batch_size=4, seed=1)
    for batch in result.batches:
        counts = Counter(labels[i] for i in batch)
        assert all(c >= 2 for c in counts.values())
    assert result.dropped == 2  # one row of label 1, the single row of label 3
    big = [int(x) for x in np.random.default_rng(0).integers(0, 3, 5000)] + [7, 5, 5]
    assert [b.tolist() for b in group_by_label_batches(np.array(big), 6, 2).batches] == \
        _reference_group_by_label(big, 6, 2)


def test_interleave_and_default_batches():
    order = interleave([3, 1], [1.0, 1.0], "proportional", seed=0)
    assert sorted(order) == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert interleave([3, 2], [1, 1], "round_robin", 0) == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert sum(len(b) for b in default_batches(10, 3, 0).batches) == 10
    order = list(range(10))
    random.Random(0).shuffle(order)
    assert default_batches(10, 3, 0).rows.tolist() == order
