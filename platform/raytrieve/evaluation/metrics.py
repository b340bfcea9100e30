"""Ranking and correlation metrics, one definition each, shared by every evaluator.

A run is ``{query_id: {doc_id: score}}``; qrels are ``{query_id: {doc_id: relevance}}``
(relevance > 0 means relevant; NDCG uses the grade as a linear gain, so binary qrels give
binary NDCG). Rankings sort by score descending and break ties by doc id descending, the
rule trec_eval uses, so results are reproducible and comparable with it.

Definitions (k cuts the ranking; R = number of relevant documents of the query):
  accuracy@k  1 if any relevant document is in the top k
  precision@k relevant in top k / k
  recall@k    relevant in top k / R
  mrr@k       1 / rank of the first relevant document in the top k (0 if none)
  ndcg@k      DCG@k / ideal DCG@k, DCG = sum grade_i / log2(i + 1) over ranks i = 1..k
  map@k       sum over relevant ranks i <= k of precision@i, / min(k, R)
              (sentence-transformers' convention; trec_eval's map_cut divides by R)
Queries without any relevant document are left out of the means (and counted).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np

RANK_METRICS = ("accuracy", "precision", "recall", "mrr", "ndcg", "map")


def rank_documents(scores: Mapping[str, float]) -> list[str]:
    """Doc ids by score descending, ties by doc id descending (trec_eval's order)."""
    return [d for d, _ in sorted(scores.items(), key=lambda kv: (kv[1], str(kv[0])), reverse=True)]


def query_metrics(ranking: Sequence[str], relevant: Mapping[str, float], ks: Iterable[int]) -> dict[str, float]:
    """Every rank metric at every k for one query (``relevant``: doc id -> grade > 0)."""
    rel = {d: g for d, g in relevant.items() if g > 0}
    n_rel = len(rel)
    out: dict[str, float] = {}
    hits = np.array([d in rel for d in ranking], dtype=bool)
    gains = np.array([rel.get(d, 0.0) for d in ranking], dtype=np.float64)
    ideal = np.sort(np.array(list(rel.values()), dtype=np.float64))[::-1]
    for k in ks:
        top = hits[:k]
        found = int(top.sum())
        first = int(np.argmax(top)) if found else -1
        discounts = 1.0 / np.log2(np.arange(2, k + 2))
        dcg = float((gains[:k] * discounts[: len(gains[:k])]).sum())
        idcg = float((ideal[:k] * discounts[: len(ideal[:k])]).sum())
        precisions = np.cumsum(top) / np.arange(1, len(top) + 1)
        out[f"accuracy@{k}"] = 1.0 if found else 0.0
        out[f"precision@{k}"] = found / k
        out[f"recall@{k}"] = found / n_rel if n_rel else 0.0
        out[f"mrr@{k}"] = 1.0 / (first + 1) if found else 0.0
        out[f"ndcg@{k}"] = dcg / idcg if idcg > 0 else 0.0
        out[f"map@{k}"] = float(precisions[top].sum()) / min(k, n_rel) if n_rel else 0.0
    return out


def ranking_metrics(
    run: Mapping[str, Mapping[str, float]] | Mapping[str, Sequence[str]],
    qrels: Mapping[str, Mapping[str, float]],
    ks: Iterable[int] = (1, 3, 5, 10, 100),
) -> dict[str, float]:
    """Mean of every metric at every k over the queries that have a relevant document.

    ``run`` maps a query to scores per doc, or to an already ranked list of doc ids.
    A query in qrels but missing from the run scores 0.
    """
    ks = sorted(set(int(k) for k in ks))
    totals: dict[str, float] = {}
    n = 0
    for qid, relevant in qrels.items():
        if not any(g > 0 for g in relevant.values()):
            continue
        docs = run.get(qid, {})
        ranking = rank_documents(docs) if isinstance(docs, Mapping) else list(docs)
        for name, value in query_metrics(ranking, relevant, ks).items():
            totals[name] = totals.get(name, 0.0) + value
        n += 1
    means = {name: value / n for name, value in totals.items()} if n else {f"{m}@{k}": 0.0 for m in RANK_METRICS for k in ks}
    return means


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based), ties sharing the mean of their positions."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return pearson(_ranks(x), _ranks(y))


def is_finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
