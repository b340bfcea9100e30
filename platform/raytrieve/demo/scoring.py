"""The demo's metrics: NDCG@10, MRR@10 and Recall@k, scored by the shared per-query code
(raytrieve.evaluate.scoring) with the split's graded qrels, which also gives the paired
bootstrap intervals."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from raytrieve.evaluate import scoring
from raytrieve.evaluate.scoring import mean, paired_interval

__all__ = ["mean", "metric_names", "paired_interval", "per_query"]


def metric_names(recall_k: int) -> tuple[str, str, str]:
    return ("ndcg@10", "mrr@10", f"recall@{recall_k}")


def per_query(
    rankings: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, float]], recall_k: int
) -> dict[str, list[float]]:
    """Metric -> one value per query, in sorted query-id order (so two systems pair up)."""
    return scoring.per_query(rankings, qrels, metric_names(recall_k))
