"""Each judged query's dense top k on a demo split, in process (no Ray): the candidate lists the
reranker benchmarks reorder (rerank_weight.py, rerank_steps.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Head:
    query: str
    relevant: dict[str, float]  # its qrels: document id -> grade (> 0: relevant)
    hits: list[tuple[str, float]]  # (doc id, dense score), best first

    def texts(self, corpus: dict[str, str]) -> list[str]:
        return [corpus[d] for d, _ in self.hits]

    def ndcg10(self, cross_scores: list[float] | None = None, weight: float = 1.0) -> float:
        """NDCG@10 of the dense order, or with ``cross_scores`` (one per hit) of the head reranked
        as /search does with ``rerank_weight`` ``weight`` (serve/fusion.py ``interpolate``)."""
        from raytrieve.evaluation.metrics import query_metrics
        from raytrieve.serve.fusion import interpolate

        ranked = self.hits if cross_scores is None else interpolate(self.hits, cross_scores, weight)
        return query_metrics([d for d, _ in ranked], self.relevant, (10,))["ndcg@10"]


def dense_heads(dense: Any, split: Any, queries: int, depth: int) -> list[Head]:
    """The first ``queries`` judged queries of ``split`` (demo.sample's Split) with the dense
    model's top ``depth`` documents by cosine score (ties keep corpus order)."""
    import numpy as np

    ids = list(split.corpus)
    qids = [q for q in split.queries if q in split.qrels][:queries]
    docs = dense.encode_document([split.corpus[d] for d in ids], normalize_embeddings=True)
    scores = dense.encode_query([split.queries[q] for q in qids], normalize_embeddings=True) @ docs.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
    return [
        Head(split.queries[q], split.qrels[q], [(ids[j], float(scores[i, j])) for j in top[i]])
        for i, q in enumerate(qids)
    ]
