"""Batch composition: no duplicate texts, label groups, dataset interleaving, equal steps."""

from __future__ import annotations

from collections import Counter

from raytrieve.data.batching import (
    default_batches,
    equal_steps,
    group_by_label_batches,
    interleave,
    no_duplicates_batches,
)


def test_no_duplicates_batches_never_repeat_a_text():
    # Many rows share positives: a naive batch would hold the same text twice.
    rows = [(f"q{i}", f"doc{i % 5}") for i in range(40)] + [("same", "same")]
    result = no_duplicates_batches(rows, batch_size=4, seed=0)
    for batch in result.batches:
        values = [v for i in batch for v in rows[i]]
        assert len(values) == len(set(values))
    used = sorted(i for b in result.batches for i in b)
    assert used == list(range(40))  # every valid row placed exactly once
    assert result.dropped == 1 and "repeat the same text" in result.reason
    again = no_duplicates_batches(rows, batch_size=4, seed=0)
    assert again.batches == result.batches  # deterministic for a seed


def test_group_by_label_pairs():
    labels = [0, 0, 1, 1, 1, 2, 2, 2, 2, 3]
    result = group_by_label_batches(labels, batch_size=4, seed=1)
    for batch in result.batches:
        counts = Counter(labels[i] for i in batch)
        assert all(c >= 2 for c in counts.values())
    assert result.dropped == 2  # one row of label 1, the single row of label 3


def test_interleave_and_equal_steps():
    order = interleave([3, 1], [1.0, 1.0], "proportional", seed=0)
    assert sorted(order) == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert interleave([3, 2], [1, 1], "round_robin", 0) == [(0, 0), (1, 0), (0, 1), (1, 1)]
    per_rank, extra = equal_steps(list(range(7)), 2)
    assert per_rank == [[0, 2, 4], [1, 3, 5]] and extra == 1
    assert sum(len(b) for b in default_batches(10, 3, 0).batches) == 10
