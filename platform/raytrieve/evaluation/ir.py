"""Retrieval evaluation: encode queries and a corpus, retrieve the top k per query in
corpus chunks (memory grows with the chunk, not with the corpus squared), and score the
rankings against the relevant documents. Dense and sparse (SPLADE) models alike; for
sparse models it also reports how sparse the vectors are and the expected dot-product cost.

Keys follow sentence-transformers (``cosine_ndcg@10``, ``dot_mrr@10``, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from raytrieve.encoders import similarity as sim
from raytrieve.errors import InputError
from raytrieve.evaluation.base import Evaluator
from raytrieve.evaluation.metrics import query_metrics

ORDER = ("accuracy", "precision", "recall", "ndcg", "mrr", "map")


class InformationRetrievalEvaluator(Evaluator):
    def __init__(
        self,
        queries: dict[str, str],
        corpus: dict[str, str],
        relevant_docs: dict[str, set[str] | Sequence[str]],
        corpus_chunk_size: int = 50000,
        mrr_at_k: Sequence[int] = (10,),
        ndcg_at_k: Sequence[int] = (10,),
        accuracy_at_k: Sequence[int] = (1, 3, 5, 10),
        precision_recall_at_k: Sequence[int] = (1, 3, 5, 10),
        map_at_k: Sequence[int] = (100,),
        batch_size: int = 32,
        name: str = "",
        write_csv: bool = True,
        truncate_dim: int | None = None,
        score_functions: dict[str, Callable[[Tensor, Tensor], Tensor]] | None = None,
        main_score_function: str | None = None,
        query_prompt: str | None = None,
        query_prompt_name: str | None = None,
        corpus_prompt: str | None = None,
        corpus_prompt_name: str | None = None,
        show_progress_bar: bool = False,
    ) -> None:
        super().__init__(name, write_csv)
        self.relevant_docs = {q: set(d) for q, d in relevant_docs.items()}
        # Queries without any relevant document cannot be scored; they are left out.
        self.query_ids = [q for q in queries if self.relevant_docs.get(q)]
        self.queries = [queries[q] for q in self.query_ids]
        self.corpus_ids = list(corpus)
        self.corpus = [corpus[c] for c in self.corpus_ids]
        self.corpus_chunk_size = corpus_chunk_size
        self.ks = {
            "accuracy": list(accuracy_at_k),
            "precision": list(precision_recall_at_k),
            "recall": list(precision_recall_at_k),
            "ndcg": list(ndcg_at_k),
            "mrr": list(mrr_at_k),
            "map": list(map_at_k),
        }
        self.max_k = max(max(v) for v in self.ks.values())
        self.batch_size = batch_size
        self.truncate_dim = truncate_dim
        self.score_functions = score_functions
        self.main_score_function = main_score_function
        self.query_prompt, self.query_prompt_name = query_prompt, query_prompt_name
        self.corpus_prompt, self.corpus_prompt_name = corpus_prompt, corpus_prompt_name
        self.show_progress_bar = show_progress_bar

    def csv_file(self) -> str:
        return f"Information-Retrieval_evaluation{'_' + self.name if self.name else ''}_results.csv"

    # -- encoding (the sparse subclass overrides these) ----------------------------------------
    def encode_kwargs(self) -> dict[str, Any]:
        return {"convert_to_tensor": True, "truncate_dim": self.truncate_dim}

    def encode(self, model: Any, texts: list[str], side: str) -> Tensor:
        fn = model.encode_query if side == "query" else model.encode_document
        prompt = self.query_prompt if side == "query" else self.corpus_prompt
        prompt_name = self.query_prompt_name if side == "query" else self.corpus_prompt_name
        kwargs = {"batch_size": self.batch_size, "show_progress_bar": self.show_progress_bar, **self.encode_kwargs()}
        if prompt is not None:
            kwargs["prompt"] = prompt
        if prompt_name is not None:
            kwargs["prompt_name"] = prompt_name
        return fn(texts, **kwargs)

    def extra_metrics(self) -> dict[str, float]:
        return {}

    # -- retrieval ------------------------------------------------------------------------------
    def _score_functions(self, model: Any) -> dict[str, Callable]:
        if self.score_functions is not None:
            return self.score_functions
        name = model.similarity_fn_name
        return {name: lambda a, b, _n=name: sim.similarity(a, b, _n)}

    def retrieve(self, model: Any) -> dict[str, list[list[tuple[float, int]]]]:
        """Per score function, per query: [(score, corpus index)] best first, at most max_k."""
        functions = self._score_functions(model)
        q_emb = self.encode(model, self.queries, "query")
        top: dict[str, tuple[Tensor, Tensor] | None] = {name: None for name in functions}
        for start in range(0, len(self.corpus), self.corpus_chunk_size):
            c_emb = self.encode(model, self.corpus[start : start + self.corpus_chunk_size], "document")
            for name, fn in functions.items():
                scores = fn(q_emb, c_emb).float().cpu()
                k = min(self.max_k, scores.shape[1])
                values, idx = scores.topk(k, dim=1)
                idx = idx + start
                best = top[name]
                if best is not None:  # merge with the best of earlier chunks
                    values = torch.cat([best[0], values], dim=1)
                    idx = torch.cat([best[1], idx], dim=1)
                    values, pick = values.topk(min(self.max_k, values.shape[1]), dim=1)
                    idx = idx.gather(1, pick)
                top[name] = (values, idx)
        out = {}
        for name, pair in top.items():
            if pair is None:  # no corpus chunk was scored
                raise InputError(f"{type(self).__name__}: the corpus is empty")
            rows = []
            for values, idx in zip(pair[0].tolist(), pair[1].tolist()):
                # Ties: ascending corpus id, as sentence-transformers orders them.
                rows.append(sorted(zip(values, idx), key=lambda h: (-h[0], self.corpus_ids[h[1]])))
            out[name] = rows
        return out

    def compute(self, model: Any) -> dict[str, float]:
        hits = self.retrieve(model)
        all_ks = sorted({k for ks in self.ks.values() for k in ks})
        metrics: dict[str, float] = {}
        means: dict[str, dict[str, float]] = {}
        for name, per_query in hits.items():
            totals: dict[str, float] = {}
            for qid, ranked in zip(self.query_ids, per_query):
                ranking = [self.corpus_ids[i] for _, i in ranked]
                relevant = {d: 1.0 for d in self.relevant_docs[qid]}
                for key, value in query_metrics(ranking, relevant, all_ks).items():
                    totals[key] = totals.get(key, 0.0) + value
            means[name] = {k: v / max(len(self.query_ids), 1) for k, v in totals.items()}
            for metric in ORDER:
                for k in self.ks[metric]:
                    metrics[f"{name}_{metric}@{k}"] = means[name][f"{metric}@{k}"]
        ndcg_k = max(self.ks["ndcg"])
        if self.primary_metric is None:
            best = self.main_score_function or max(sorted(means), key=lambda n: means[n][f"ndcg@{ndcg_k}"])
            self.primary_metric = f"{best}_ndcg@{ndcg_k}"
        metrics.update(self.extra_metrics())
        return metrics


class SparseInformationRetrievalEvaluator(InformationRetrievalEvaluator):
    """Retrieval metrics for SPLADE models plus query/corpus active dimensions, sparsity and
    avg_flops (expected nonzero products of a query-document dot product)."""

    def __init__(self, *args: Any, max_active_dims: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_active_dims = max_active_dims
        self._stats: dict[str, list[tuple[dict[str, float], int]]] = {}
        self._counts: dict[str, np.ndarray] = {}

    def encode_kwargs(self) -> dict[str, Any]:
        return {"max_active_dims": self.max_active_dims}

    def encode(self, model: Any, texts: list[str], side: str) -> Tensor:
        emb = super().encode(model, texts, side).coalesce().cpu()
        self._stats.setdefault(side, []).append((model.sparsity(emb), len(texts)))
        per_dim = torch.zeros(emb.shape[1], dtype=torch.int64)
        per_dim.index_add_(0, emb.indices()[1], (emb.values() != 0).to(torch.int64))
        self._counts[side] = self._counts.get(side, 0) + per_dim.numpy()
        return emb

    def compute(self, model: Any) -> dict[str, float]:
        self._stats, self._counts = {}, {}
        return super().compute(model)

    def extra_metrics(self) -> dict[str, float]:
        out = {}
        for side, label in (("query", "query"), ("document", "corpus")):
            stats = self._stats.get(side, [])
            n = sum(c for _, c in stats) or 1
            out[f"{label}_active_dims"] = sum(s["active_dims"] * c for s, c in stats) / n
            out[f"{label}_sparsity_ratio"] = sum(s["sparsity_ratio"] * c for s, c in stats) / n
        if "query" in self._counts and "document" in self._counts:
            q = self._counts["query"] / len(self.queries)
            d = self._counts["document"] / len(self.corpus)
            out["avg_flops"] = float(np.dot(q, d))
        else:
            out["avg_flops"] = 0.0
        return out
