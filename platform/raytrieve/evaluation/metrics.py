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
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

# A 1-D vector as the scoring functions read it (np.asarray): a list or an array.
Floats = Sequence[float] | np.ndarray
Ints = Sequence[int] | np.ndarray

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
    means = (
        {name: value / n for name, value in totals.items()}
        if n
        else {f"{m}@{k}": 0.0 for m in RANK_METRICS for k in ks}
    )
    return means


def pearson(a: Floats, b: Floats) -> float:
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


def spearman(a: Floats, b: Floats) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return pearson(_ranks(x), _ranks(y))


# -- scored lists (rerankers, classifiers): ties share credit, as scikit-learn defines it ------


def ndcg_with_ties(relevance: Floats, scores: Floats, k: int | None = None) -> float:
    """NDCG@k of one scored list, linear gains; tied scores get the mean gain of their group."""
    y = np.asarray(relevance, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    n = len(y)
    k = n if k is None else min(k, n)
    discount = 1.0 / np.log2(np.arange(n) + 2)
    discount[k:] = 0.0
    order = np.argsort(-s, kind="stable")
    ys, ss = y[order], s[order]
    dcg, i = 0.0, 0
    while i < n:
        j = i
        while j + 1 < n and ss[j + 1] == ss[i]:
            j += 1
        dcg += ys[i : j + 1].mean() * discount[i : j + 1].sum()
        i = j + 1
    ideal = float((np.sort(y)[::-1] * discount).sum())
    return dcg / ideal if ideal > 0 else 0.0


def average_precision(labels: Ints, scores: Floats) -> float:
    """Area under the precision-recall steps, tied scores entering together."""
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    total = y.sum()
    if total == 0:
        return 0.0
    order = np.argsort(-s, kind="stable")
    ys, ss = y[order], s[order]
    last_of_group = np.r_[ss[1:] != ss[:-1], True]
    tp = np.cumsum(ys)[last_of_group]
    seen = (np.arange(len(ys)) + 1)[last_of_group]
    recall = tp / total
    precision = tp / seen
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def first_relevant_rr(relevance: Ints, scores: Floats, k: int) -> float:
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]
    for rank, i in enumerate(order):
        if relevance[i]:
            return 1.0 / (rank + 1)
    return 0.0


def _threshold_sweep(scores: np.ndarray, labels: np.ndarray, high_is_positive: bool):
    """Rows sorted so that the first ones are predicted positive; yields (i, score, next score or None)
    at the end of each group of tied scores."""
    order = np.argsort(-scores if high_is_positive else scores, kind="stable")
    s, y = scores[order], labels[order]
    for i in range(len(s)):
        nxt = s[i + 1] if i + 1 < len(s) else None
        yield i, s[i], y[i], nxt


def best_accuracy_threshold(scores, labels, high_is_positive: bool = True) -> tuple[float, float]:
    """Best accuracy of "score beyond threshold means positive", and that threshold."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    n, negatives = len(y), int((y == 0).sum())
    best = negatives / n
    first = s.max() if high_is_positive else s.min()
    threshold = float(np.nextafter(first, np.inf if high_is_positive else -np.inf))
    positives_so_far, remaining_negatives = 0, negatives
    for _i, score, label, nxt in _threshold_sweep(s, y, high_is_positive):
        if label == 1:
            positives_so_far += 1
        else:
            remaining_negatives -= 1
        if nxt is not None and nxt == score:
            continue
        acc = (positives_so_far + remaining_negatives) / n
        if acc > best:
            best = acc
            threshold = float(score if nxt is None else (score + nxt) / 2)
            if nxt is not None and threshold == nxt:
                threshold = float(score)
    return best, threshold


def best_f1_threshold(scores, labels, high_is_positive: bool = True) -> tuple[float, float, float, float]:
    """(f1, precision, recall, threshold) at the threshold of best F1."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    total = int(y.sum())
    best = (0.0, 0.0, 0.0, 0.0)
    extracted = correct = 0
    for _i, score, label, nxt in _threshold_sweep(s, y, high_is_positive):
        extracted += 1
        correct += int(label == 1)
        if nxt is not None and nxt == score:
            continue
        if correct > 0:
            p, r = correct / extracted, correct / total
            f1 = 2 * p * r / (p + r)
            if f1 > best[0]:
                threshold = float(score if nxt is None else (score + nxt) / 2)
                if nxt is not None and threshold == nxt:
                    threshold = float(score)
                best = (f1, p, r, threshold)
    return best


def matthews_corrcoef(labels: Ints, predicted: Ints) -> float:
    y, p = np.asarray(labels, dtype=bool), np.asarray(predicted, dtype=bool)
    tp, tn = float((y & p).sum()), float((~y & ~p).sum())
    fp, fn = float((~y & p).sum()), float((y & ~p).sum())
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


def f1_scores(labels: Ints, predicted: Ints) -> dict[str, float]:
    """Macro, micro and support-weighted F1 over the classes present in labels or predictions."""
    y, p = np.asarray(labels), np.asarray(predicted)
    classes = np.union1d(y, p)
    per_class, support = [], []
    for c in classes:
        tp = float(((y == c) & (p == c)).sum())
        fp = float(((y != c) & (p == c)).sum())
        fn = float(((y == c) & (p != c)).sum())
        per_class.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        support.append(float((y == c).sum()))
    per_class, support = np.array(per_class), np.array(support)
    micro = float((y == p).mean()) if len(y) else 0.0
    weighted = float((per_class * support).sum() / support.sum()) if support.sum() else 0.0
    return {"f1_macro": float(per_class.mean()), "f1_micro": micro, "f1_weighted": weighted}
