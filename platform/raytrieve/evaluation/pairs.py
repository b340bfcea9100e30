"""Evaluators for embedding models on pairs, triplets and small candidate lists:
EmbeddingSimilarity (correlation with gold scores), BinaryClassification (best threshold),
Triplet (accuracy), MSE (distillation), ParaphraseMining, Reranking."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from raytrieve.encoders import similarity as sim
from raytrieve.evaluation.base import Evaluator
from raytrieve.evaluation.metrics import (
    average_precision,
    best_accuracy_threshold,
    best_f1_threshold,
    first_relevant_rr,
    matthews_corrcoef,
    ndcg_with_ties,
    pearson,
    spearman,
)


def encode_unique(model: Any, texts: Sequence[str], side: str | None = None, **kwargs: Any) -> np.ndarray:
    """Embeddings of ``texts`` as a float numpy array, each distinct text encoded once.
    Works for dense and sparse models (sparse vectors come back dense)."""
    unique = list(dict.fromkeys(texts))
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    by_side: dict[str | None, Any] = {"query": model.encode_query, "document": model.encode_document}
    encode = by_side.get(side, model.encode)
    if hasattr(model, "sparsity"):  # SparseEncoder
        kwargs.pop("truncate_dim", None)
        emb = encode(unique, convert_to_sparse_tensor=False, **kwargs).cpu().numpy()
    else:
        emb = encode(unique, **kwargs)
    index = {t: i for i, t in enumerate(unique)}
    return np.asarray(emb)[[index[t] for t in texts]]


def pairwise_scores(a: np.ndarray, b: np.ndarray, fn: str) -> np.ndarray:
    """Row-wise similarity (distances negated: higher = more similar)."""
    return sim.pairwise(torch.as_tensor(a).float(), torch.as_tensor(b).float(), fn).numpy()


class EmbeddingSimilarityEvaluator(Evaluator):
    def __init__(
        self,
        sentences1: Sequence[str],
        sentences2: Sequence[str],
        scores: Sequence[float],
        batch_size: int = 16,
        main_similarity: str | None = None,
        similarity_fn_names: Sequence[str] | None = None,
        name: str = "",
        write_csv: bool = True,
        precision: str | None = None,
        truncate_dim: int | None = None,
        show_progress_bar: bool = False,
    ) -> None:
        super().__init__(name, write_csv)
        self.sentences1, self.sentences2, self.scores = list(sentences1), list(sentences2), list(scores)
        self.batch_size, self.main_similarity = batch_size, main_similarity
        self.similarity_fn_names = list(similarity_fn_names or ([main_similarity] if main_similarity else []))
        self.precision, self.truncate_dim = precision, truncate_dim
        self.show_progress_bar = show_progress_bar

    def compute(self, model: Any) -> dict[str, float]:
        kwargs: dict[str, Any] = dict(
            batch_size=self.batch_size, truncate_dim=self.truncate_dim, show_progress_bar=self.show_progress_bar
        )
        if self.precision:
            kwargs.update(precision=self.precision, normalize_embeddings=True)
        emb = encode_unique(model, self.sentences1 + self.sentences2, **kwargs).astype(np.float32)
        e1, e2 = emb[: len(self.sentences1)], emb[len(self.sentences1) :]
        names = self.similarity_fn_names or [model.similarity_fn_name]
        out: dict[str, float] = {}
        for fn in names:
            s = pairwise_scores(e1, e2, fn)
            out[f"pearson_{fn}"] = pearson(self.scores, s)
            out[f"spearman_{fn}"] = spearman(self.scores, s)
        if len(names) > 1:
            out["pearson_max"] = max(out[f"pearson_{fn}"] for fn in names)
            out["spearman_max"] = max(out[f"spearman_{fn}"] for fn in names)
        if self.main_similarity:
            self.primary_metric = f"spearman_{self.main_similarity}"
        else:
            self.primary_metric = "spearman_max" if len(names) > 1 else f"spearman_{names[0]}"
        return out


class BinaryClassificationEvaluator(Evaluator):
    """Is (s1, s2) a positive pair? Best accuracy / F1 over thresholds on the similarity, AP, MCC."""

    def __init__(
        self,
        sentences1: Sequence[str],
        sentences2: Sequence[str],
        labels: Sequence[int],
        name: str = "",
        batch_size: int = 32,
        write_csv: bool = True,
        truncate_dim: int | None = None,
        similarity_fn_names: Sequence[str] | None = None,
        show_progress_bar: bool = False,
    ) -> None:
        super().__init__(name, write_csv)
        if any(label not in (0, 1) for label in labels):
            from raytrieve.errors import InputError

            raise InputError("BinaryClassificationEvaluator: labels must be 0 or 1")
        self.sentences1, self.sentences2, self.labels = list(sentences1), list(sentences2), np.asarray(labels)
        self.batch_size, self.truncate_dim = batch_size, truncate_dim
        self.similarity_fn_names = list(similarity_fn_names or [])
        self.show_progress_bar = show_progress_bar

    def compute(self, model: Any) -> dict[str, float]:
        emb = encode_unique(
            model,
            self.sentences1 + self.sentences2,
            batch_size=self.batch_size,
            truncate_dim=self.truncate_dim,
            show_progress_bar=self.show_progress_bar,
        )
        e1, e2 = emb[: len(self.sentences1)], emb[len(self.sentences1) :]
        names = self.similarity_fn_names or [model.similarity_fn_name]
        out: dict[str, float] = {}
        for fn in names:
            scores = pairwise_scores(e1, e2, fn)
            higher = fn in ("cosine", "dot")
            if not higher:
                scores = -scores  # distances, as sentence-transformers reports their thresholds
            acc, acc_t = best_accuracy_threshold(scores, self.labels, higher)
            f1, p, r, f1_t = best_f1_threshold(scores, self.labels, higher)
            ap = average_precision(self.labels, scores if higher else -scores)
            predicted = scores >= f1_t if higher else scores <= f1_t
            out.update(
                {
                    f"{fn}_accuracy": acc,
                    f"{fn}_accuracy_threshold": acc_t,
                    f"{fn}_f1": f1,
                    f"{fn}_f1_threshold": f1_t,
                    f"{fn}_precision": p,
                    f"{fn}_recall": r,
                    f"{fn}_ap": ap,
                    f"{fn}_mcc": matthews_corrcoef(self.labels, predicted),
                }
            )
        if len(names) > 1:
            for metric in ("accuracy", "accuracy_threshold", "f1", "f1_threshold", "precision", "recall", "ap", "mcc"):
                out[f"max_{metric}"] = max(out[f"{fn}_{metric}"] for fn in names)
        self.primary_metric = "max_ap" if len(names) > 1 else f"{names[0]}_ap"
        return out


class TripletEvaluator(Evaluator):
    """Share of triplets where sim(anchor, positive) > sim(anchor, negative) + margin."""

    def __init__(
        self,
        anchors: Sequence[str],
        positives: Sequence[str],
        negatives: Sequence[str],
        main_similarity_function: str | None = None,
        margin: float | dict[str, float] | None = None,
        name: str = "",
        batch_size: int = 16,
        write_csv: bool = True,
        truncate_dim: int | None = None,
        similarity_fn_names: Sequence[str] | None = None,
        show_progress_bar: bool = False,
    ) -> None:
        super().__init__(name, write_csv)
        self.anchors, self.positives, self.negatives = list(anchors), list(positives), list(negatives)
        self.main_similarity_function = main_similarity_function
        self.margin = margin
        self.batch_size, self.truncate_dim = batch_size, truncate_dim
        self.similarity_fn_names = list(
            similarity_fn_names or ([main_similarity_function] if main_similarity_function else [])
        )
        self.show_progress_bar = show_progress_bar

    def _margin(self, fn: str) -> float:
        if self.margin is None:
            return 0.0
        if isinstance(self.margin, dict):
            return float(self.margin.get(fn, 0.0))
        return float(self.margin)

    def compute(self, model: Any) -> dict[str, float]:
        kw = dict(batch_size=self.batch_size, truncate_dim=self.truncate_dim, show_progress_bar=self.show_progress_bar)
        a = encode_unique(model, self.anchors, "query", **kw)
        docs = encode_unique(model, self.positives + self.negatives, "document", **kw)
        p, n = docs[: len(self.positives)], docs[len(self.positives) :]
        names = self.similarity_fn_names or [model.similarity_fn_name]
        out = {}
        for fn in names:
            out[f"{fn}_accuracy"] = float(
                np.mean(pairwise_scores(a, p, fn) > pairwise_scores(a, n, fn) + self._margin(fn))
            )
        if len(names) > 1:
            out["max_accuracy"] = max(out.values())
        if self.main_similarity_function:
            self.primary_metric = f"{self.main_similarity_function}_accuracy"
        else:
            self.primary_metric = "max_accuracy" if len(names) > 1 else f"{names[0]}_accuracy"
        return out


class MSEEvaluator(Evaluator):
    """Negative MSE (x100) between a teacher's embeddings of source texts and the student's of target texts."""

    def __init__(
        self,
        source_sentences: Sequence[str],
        target_sentences: Sequence[str],
        teacher_model: Any = None,
        batch_size: int = 32,
        name: str = "",
        write_csv: bool = True,
        truncate_dim: int | None = None,
        show_progress_bar: bool = False,
    ) -> None:
        super().__init__(name, write_csv)
        if len(source_sentences) != len(target_sentences):
            from raytrieve.errors import InputError

            raise InputError(
                f"MSEEvaluator: source_sentences has {len(source_sentences)} texts but target_sentences "
                f"{len(target_sentences)}; give one target (student) text per source (teacher) text"
            )
        self.target_sentences, self.batch_size, self.truncate_dim = list(target_sentences), batch_size, truncate_dim
        self.source_embeddings = teacher_model.encode(
            list(source_sentences),
            batch_size=batch_size,
            truncate_dim=truncate_dim,
            show_progress_bar=show_progress_bar,
        )
        self.primary_metric = "negative_mse"

    def compute(self, model: Any) -> dict[str, float]:
        target = model.encode(self.target_sentences, batch_size=self.batch_size, truncate_dim=self.truncate_dim)
        return {"negative_mse": -float(((self.source_embeddings - target) ** 2).mean() * 100)}


class RerankingEvaluator(Evaluator):
    """A bi-encoder ranking each query's own candidates: MAP, MRR@k, NDCG@k."""

    def __init__(
        self,
        samples: Sequence[dict[str, Any]],
        at_k: int = 10,
        name: str = "",
        write_csv: bool = True,
        similarity_fn_name: str | None = None,
        batch_size: int = 64,
        truncate_dim: int | None = None,
        show_progress_bar: bool = False,
    ) -> None:
        super().__init__(name, write_csv)
        self.samples = []
        for s in samples.values() if isinstance(samples, dict) else samples:
            pos = [s["positive"]] if isinstance(s["positive"], str) else list(s["positive"])
            neg = [s["negative"]] if isinstance(s["negative"], str) else list(s["negative"])
            if pos and neg:
                self.samples.append((s["query"], pos, neg))
        self.at_k, self.similarity_fn_name = at_k, similarity_fn_name
        self.batch_size, self.truncate_dim, self.show_progress_bar = batch_size, truncate_dim, show_progress_bar
        self.primary_metric = f"ndcg@{at_k}"

    def compute(self, model: Any) -> dict[str, float]:
        fn = self.similarity_fn_name or model.similarity_fn_name
        kw: dict[str, Any] = dict(batch_size=self.batch_size, show_progress_bar=self.show_progress_bar)
        if self.truncate_dim is not None:  # a dense model's (a sparse one takes no such argument)
            kw["truncate_dim"] = self.truncate_dim
        q_emb = model.encode_query([q for q, _, _ in self.samples], **kw)
        docs = [d for _, p, n in self.samples for d in p + n]
        d_emb = model.encode_document(docs, **kw)
        # A sparse model's vectors are sparse tensors, which take index_select but no slicing.
        q_emb, d_emb = (torch.as_tensor(e) if isinstance(e, np.ndarray) else e for e in (q_emb, d_emb))
        aps, rrs, ndcgs, offset = [], [], [], 0
        for i, (_q, pos, neg) in enumerate(self.samples):
            n_docs = len(pos) + len(neg)
            query = q_emb.index_select(0, torch.tensor([i]))
            scores = sim.similarity(query, d_emb.index_select(0, torch.arange(offset, offset + n_docs)), fn)[0].numpy()
            offset += n_docs
            relevant = [1] * len(pos) + [0] * len(neg)
            aps.append(average_precision(relevant, scores))
            rrs.append(first_relevant_rr(relevant, scores, self.at_k))
            ndcgs.append(ndcg_with_ties(relevant, scores, self.at_k))
        return {
            "map": float(np.mean(aps)),
            f"mrr@{self.at_k}": float(np.mean(rrs)),
            f"ndcg@{self.at_k}": float(np.mean(ndcgs)),
        }


class ParaphraseMiningEvaluator(Evaluator):
    """Mine the most similar pairs of a sentence collection and score them against known duplicates."""

    def __init__(
        self,
        sentences_map: dict[str, str],
        duplicates_list: Sequence[tuple[str, str]] | None = None,
        duplicates_dict: dict[str, dict[str, bool]] | None = None,
        add_transitive_closure: bool = False,
        top_k: int = 100,
        max_pairs: int = 500000,
        batch_size: int = 16,
        chunk_size: int = 5000,
        name: str = "",
        write_csv: bool = True,
        truncate_dim: int | None = None,
    ) -> None:
        super().__init__(name, write_csv)
        self.ids, self.sentences = list(sentences_map), list(sentences_map.values())
        dup: dict[str, set[str]] = {}
        for a, b in duplicates_list or []:
            dup.setdefault(a, set()).add(b)
            dup.setdefault(b, set()).add(a)
        for a, others in (duplicates_dict or {}).items():
            for b, is_dup in others.items():
                if is_dup:
                    dup.setdefault(a, set()).add(b)
                    dup.setdefault(b, set()).add(a)
        if add_transitive_closure:
            dup = _transitive_closure(dup)
        self.duplicates = dup
        known = set(self.ids)
        self.total = sum(1 for a, bs in dup.items() for b in bs if a < b and a in known and b in known)
        self.top_k, self.max_pairs, self.batch_size, self.chunk_size = top_k, max_pairs, batch_size, chunk_size
        self.truncate_dim = truncate_dim
        self.primary_metric = "average_precision"

    def mine(self, model: Any) -> list[tuple[float, int, int]]:
        emb = model.encode(
            self.sentences, batch_size=self.batch_size, convert_to_tensor=True, truncate_dim=self.truncate_dim
        )
        pairs: dict[tuple[int, int], float] = {}
        k = min(self.top_k + 1, len(self.sentences))
        for start in range(0, len(self.sentences), self.chunk_size):
            scores = sim.cosine(emb[start : start + self.chunk_size], emb)
            values, idx = scores.topk(k, dim=1)
            for row, (vals, cols) in enumerate(zip(values.tolist(), idx.tolist())):
                i, kept = start + row, 0
                for v, j in zip(vals, cols):
                    if j == i or kept >= self.top_k:
                        continue
                    kept += 1
                    key = (min(i, j), max(i, j))
                    pairs[key] = max(pairs.get(key, float("-inf")), v)
        ranked = sorted(((v, i, j) for (i, j), v in pairs.items()), key=lambda t: -t[0])
        return ranked[: self.max_pairs]

    def compute(self, model: Any) -> dict[str, float]:
        mined = self.mine(model)
        extracted = correct = previous = 0
        ap = best_f1 = best_p = best_r = threshold = 0.0
        for n, (score, i, j) in enumerate(mined):
            extracted += 1
            if self.ids[j] in self.duplicates.get(self.ids[i], ()):
                correct += 1
            if n + 1 < len(mined) and mined[n + 1][0] == score:
                continue
            if correct > previous:
                p = correct / extracted
                r = correct / self.total if self.total else 0.0
                f1 = 2 * p * r / (p + r)
                ap += p * (correct - previous)
                if f1 > best_f1:
                    best_f1, best_p, best_r = f1, p, r
                    threshold = (score + mined[min(n + 1, len(mined) - 1)][0]) / 2
            previous = correct
        ap = ap / self.total if self.total else 0.0
        return {"average_precision": ap, "f1": best_f1, "precision": best_p, "recall": best_r, "threshold": threshold}


def _transitive_closure(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    closed: dict[str, set[str]] = {}
    for start in graph:
        if start in closed:
            continue
        component, frontier = {start}, [start]
        while frontier:
            for nxt in graph.get(frontier.pop(), ()):
                if nxt not in component:
                    component.add(nxt)
                    frontier.append(nxt)
        for node in component:
            closed[node] = component - {node}
    return closed
