"""The evaluator a training run uses, built from an eval file the driver read.

Columns by role, in the file's order:
- information_retrieval: query, document (one query per distinct query text, every document
  paired with it relevant; the corpus is every distinct document);
- embedding_similarity: sentence1, sentence2, and a numeric score column;
- reranking: query, positive, then negatives (one row per query).
"""

from __future__ import annotations

from typing import Any

from raytrieve.errors import DataError


def _texts(columns: dict[str, list[Any]]) -> list[str]:
    return [c for c, values in columns.items() if values and all(isinstance(v, str) for v in values)]


def check_eval_columns(columns: dict[str, list[Any]], evaluator: str, where: str) -> None:
    texts = _texts(columns)
    need = {"information_retrieval": 2, "embedding_similarity": 2, "reranking": 3}[evaluator]
    if len(texts) < need:
        raise DataError(f"{where}: {evaluator} needs {need} text columns, the file has {texts}")
    if evaluator == "embedding_similarity" and not any(
        c not in texts and all(isinstance(v, (int, float)) for v in vals) for c, vals in columns.items()
    ):
        raise DataError(f"{where}: embedding_similarity needs a numeric score column")


def build_evaluator(columns: dict[str, list[Any]], evaluator: str, kind: str) -> Any:
    texts = _texts(columns)
    if evaluator == "information_retrieval":
        from raytrieve.evaluation import InformationRetrievalEvaluator, SparseInformationRetrievalEvaluator

        # A query text in several pairs (a question with two answers) is one query with each of
        # them relevant: as separate queries, each would count the other's answer as a miss.
        doc_ids: dict[str, str] = {}
        query_ids: dict[str, str] = {}
        relevant: dict[str, set[str]] = {}
        for q, d in zip(columns[texts[0]], columns[texts[1]]):
            doc = doc_ids.setdefault(d, f"d{len(doc_ids)}")
            relevant.setdefault(query_ids.setdefault(q, f"q{len(query_ids)}"), set()).add(doc)
        cls = SparseInformationRetrievalEvaluator if kind == "sparse" else InformationRetrievalEvaluator
        return cls(
            queries={i: q for q, i in query_ids.items()},
            corpus={i: d for d, i in doc_ids.items()},
            relevant_docs={q: docs for q, docs in relevant.items()},  # the parameter's wider type
            name="eval",
            write_csv=False,
        )
    if evaluator == "embedding_similarity":
        from raytrieve.evaluation import EmbeddingSimilarityEvaluator

        score = next(c for c in columns if c not in texts)
        return EmbeddingSimilarityEvaluator(
            columns[texts[0]], columns[texts[1]], columns[score], name="eval", write_csv=False
        )
    samples = [
        {"query": row[0], "positive": [row[1]], "negative": list(row[2:])} for row in zip(*(columns[c] for c in texts))
    ]
    if kind == "cross":
        from raytrieve.evaluation import CrossEncoderRerankingEvaluator

        return CrossEncoderRerankingEvaluator(samples, name="eval", write_csv=False)
    from raytrieve.evaluation import RerankingEvaluator

    return RerankingEvaluator(samples, name="eval", write_csv=False)
