"""Evaluators for cross-encoders: Reranking (MAP / MRR@k / NDCG@k, and the first-stage
ranking's metrics when candidates come from a retriever), Correlation, Classification."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from raytrieve.evaluation.base import Evaluator
from raytrieve.evaluation.metrics import (
    average_precision,
    best_accuracy_threshold,
    best_f1_threshold,
    f1_scores,
    first_relevant_rr,
    ndcg_with_ties,
    pearson,
    spearman,
)


def _listwise(relevant: list[int], scores: Sequence[float], k: int) -> tuple[float, float, float]:
    if sum(relevant) == 0:
        return 0.0, 0.0, 0.0
    return (
        average_precision(relevant, scores),
        first_relevant_rr(relevant, scores, k),
        ndcg_with_ties(relevant, scores, k),
    )


class CrossEncoderRerankingEvaluator(Evaluator):
    """Samples: {"query", "positive": [...], "negative": [...]} or {"query", "positive", "documents": [...]}
    (documents in first-stage order: their own metrics are reported as base_*)."""

    def __init__(
        self,
        samples: Sequence[dict[str, Any]],
        at_k: int = 10,
        always_rerank_positives: bool = True,
        name: str = "",
        batch_size: int = 64,
        write_csv: bool = True,
        show_progress_bar: bool = False,
    ) -> None:
        super().__init__(name, write_csv)
        self.samples, self.at_k = list(samples), at_k
        self.always_rerank_positives = always_rerank_positives
        self.batch_size, self.show_progress_bar = batch_size, show_progress_bar
        self.primary_metric = f"ndcg@{at_k}"

    def compute(self, model: Any) -> dict[str, float]:
        plans, base = [], []
        for s in self.samples:
            positives = [s["positive"]] if isinstance(s["positive"], str) else list(s["positive"])
            if s.get("documents"):
                documents = list(s["documents"])
                base_rel = [int(d in positives) for d in documents]
                if sum(base_rel) == 0:
                    base.append((0.0, 0.0, 0.0))
                else:
                    base_rel += [1] * (len(positives) - sum(base_rel))  # positives the retriever missed
                    base.append(_listwise(base_rel, list(range(len(base_rel), 0, -1)), self.at_k))
                if self.always_rerank_positives:
                    rest = [d for d in documents if d not in positives]
                    docs, rel = positives + rest, [1] * len(positives) + [0] * len(rest)
                else:
                    docs, rel = documents, base_rel[: len(documents)]
            else:
                docs = positives + list(s["negative"])
                rel = [1] * len(positives) + [0] * len(s["negative"])
            plans.append((s["query"], docs, rel))
        pairs = [(q, d) for q, docs, _ in plans for d in docs]
        scores = (
            model.predict(pairs, batch_size=self.batch_size, show_progress_bar=self.show_progress_bar) if pairs else []
        )
        results, offset = [], 0
        for _, docs, rel in plans:
            results.append(_listwise(rel, scores[offset : offset + len(docs)], self.at_k))
            offset += len(docs)
        r = np.array(results) if results else np.zeros((1, 3))
        out = {
            "map": float(r[:, 0].mean()),
            f"mrr@{self.at_k}": float(r[:, 1].mean()),
            f"ndcg@{self.at_k}": float(r[:, 2].mean()),
        }
        if base:
            b = np.array(base)
            out.update(
                {
                    "base_map": float(b[:, 0].mean()),
                    f"base_mrr@{self.at_k}": float(b[:, 1].mean()),
                    f"base_ndcg@{self.at_k}": float(b[:, 2].mean()),
                }
            )
        return out


class CrossEncoderCorrelationEvaluator(Evaluator):
    def __init__(
        self,
        sentence_pairs: Sequence[Sequence[str]],
        scores: Sequence[float],
        name: str = "",
        batch_size: int = 32,
        write_csv: bool = True,
    ) -> None:
        super().__init__(name, write_csv)
        self.pairs, self.scores, self.batch_size = [tuple(p) for p in sentence_pairs], list(scores), batch_size
        self.primary_metric = "spearman"

    def compute(self, model: Any) -> dict[str, float]:
        pred = model.predict(self.pairs, batch_size=self.batch_size)
        return {"pearson": pearson(self.scores, pred), "spearman": spearman(self.scores, pred)}


class CrossEncoderClassificationEvaluator(Evaluator):
    def __init__(
        self,
        sentence_pairs: Sequence[Sequence[str]],
        labels: Sequence[int],
        name: str = "",
        batch_size: int = 32,
        write_csv: bool = True,
    ) -> None:
        super().__init__(name, write_csv)
        self.pairs, self.labels, self.batch_size = [tuple(p) for p in sentence_pairs], np.asarray(labels), batch_size

    def compute(self, model: Any) -> dict[str, float]:
        pred = model.predict(self.pairs, batch_size=self.batch_size)
        if pred.ndim == 1:
            acc, acc_t = best_accuracy_threshold(pred, self.labels, True)
            f1, p, r, f1_t = best_f1_threshold(pred, self.labels, True)
            self.primary_metric = "average_precision"
            return {
                "accuracy": acc,
                "accuracy_threshold": acc_t,
                "f1": f1,
                "f1_threshold": f1_t,
                "precision": p,
                "recall": r,
                "average_precision": average_precision(self.labels, pred),
            }
        self.primary_metric = "f1_macro"
        return f1_scores(self.labels, pred.argmax(axis=1))
