"""Per-query retrieval metrics and the noise around them (numpy only; `raytrieve evaluate` and
the demo both score here).

Every figure reported is a mean over queries, so each comes with a paired bootstrap: resample
the queries, recompute the difference between two systems on the same queries, and report the
95% interval. Two systems whose interval includes zero are "equal within noise".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from raytrieve.evaluation.metrics import query_metrics


def metric_k(name: str) -> int:
    """The cut of a metric name such as ``ndcg@10``."""
    _, _, k = name.partition("@")
    if not k.isdigit() or int(k) < 1:
        raise ValueError(f"metric {name!r} must look like name@k with k >= 1")
    return int(k)


def per_query(
    rankings: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, float]], names: Sequence[str]
) -> dict[str, list[float]]:
    """Metric -> one value per query, in sorted query-id order (so two systems pair up).
    ``qrels``: query id -> document id -> grade (> 0 relevant; NDCG's gain is the grade)."""
    missing = sorted(set(qrels) - set(rankings))
    if missing:
        raise ValueError(f"no ranking for {len(missing)} queries, e.g. {missing[:3]}")
    ks = sorted({metric_k(m) for m in names})
    out: dict[str, list[float]] = {m: [] for m in names}
    for qid in sorted(qrels):
        values = query_metrics(list(rankings[qid]), qrels[qid], ks)
        for m in names:
            out[m].append(float(values[m]))
    return out


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def paired_interval(
    a: Sequence[float], b: Sequence[float], rounds: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of b - a with its 95% paired-bootstrap interval (low, high)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"paired values need equal, non-empty lengths, got {x.size} and {y.size}")
    diff = y - x
    picks = np.random.default_rng(seed).integers(0, diff.size, size=(rounds, diff.size))
    means = diff[picks].mean(axis=1)
    return float(diff.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))
