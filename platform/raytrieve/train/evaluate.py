"""The evaluator a training run uses, built from an eval file the driver read.

Columns by role (``eval.columns`` names them in this order; without it, the file's text columns
in the file's order, when they are as many as the evaluator takes):
- information_retrieval: query, document (one query per distinct query text, every document
  paired with it relevant; the corpus is every distinct document);
- embedding_similarity: sentence1, sentence2, and a numeric score column;
- reranking: query, positive, then negatives (one row per query).
"""

from __future__ import annotations

from typing import Any

from raytrieve.errors import ConfigError, DataError

# The text columns each evaluator takes (None: any number from 3 on), and whether a numeric score
# column follows them.
_ROLES: dict[str, tuple[str, int | None, bool]] = {
    "information_retrieval": ("query, document", 2, False),
    "embedding_similarity": ("sentence1, sentence2, score", 2, True),
    "reranking": ("query, positive, negative...", None, False),
}


def _is_text(values: list[Any]) -> bool:
    present = [v for v in values if v is not None]  # a column of nulls only is of no kind
    return bool(present) and all(isinstance(v, str) for v in present)


def _is_number(values: list[Any]) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present)


def _is_text_list(values: list[Any]) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and all(isinstance(v, list) and all(isinstance(t, str) for t in v) for v in present)


# Column names that usually hold each role, for the example in an error (never chosen silently).
_NAMES = {
    "query": ("query", "anchor", "question"),
    "document": ("document", "positive", "passage", "text", "doc", "answer", "corpus"),
    "positive": ("positive", "document", "passage", "pos"),
    "negative": ("negative", "neg", "hard_negative"),
    "sentence1": ("sentence1", "text1", "sentence_a", "anchor"),
    "sentence2": ("sentence2", "text2", "sentence_b", "positive"),
}


def _example(evaluator: str, texts: list[str]) -> list[str]:
    """eval.columns for an error's example: the file's text columns named like each role, or the
    roles as placeholders (the first columns would often be an id and a title)."""
    roles = {"information_retrieval": ["query", "document"], "embedding_similarity": ["sentence1", "sentence2"]}.get(
        evaluator, ["query", "positive", "negative"]
    )
    picked: list[str] = []
    candidates = [c for c in texts if not c.lower().endswith("id")]  # question_id, doc_id: never a text role
    for role in roles:
        names = _NAMES[role]
        if role == "negative":
            found = [c for c in candidates if c not in picked and c.lower().startswith(names)]
        else:  # the role's own names first, in their order; a name with a suffix after them
            exact = [c for n in names for c in candidates if c.lower() == n and c not in picked]
            found = exact or [c for n in names for c in candidates if c.lower().startswith(n) and c not in picked]
        if not found:
            return [f"<{role} column>" for role in roles]
        picked += found if role == "negative" else found[:1]
    return picked


def select_eval_columns(
    columns: dict[str, list[Any]], evaluator: str, chosen: list[str] | None, where: str, field: str
) -> dict[str, list[Any]]:
    """The eval file's columns the evaluator reads, in its roles' order (texts, then the score);
    refused, naming the column and the fix, where a role would take the wrong column (an id, a
    package name), a column is missing, or a value is null. ``field``: the eval.columns key."""
    roles, texts_taken, scored = _ROLES[evaluator]
    texts = [c for c, v in columns.items() if _is_text(v)]
    if chosen is None:
        numbers = [c for c, v in columns.items() if c not in texts and _is_number(v)]
        # reranking takes any number from 3 on, so only exactly 3 tell their roles (an id column
        # among 4 would be taken as the query)
        if len(texts) != (texts_taken or 3):
            example = _example(evaluator, texts) + ([numbers[0]] if scored and numbers else [])
            lists = [c for c, v in columns.items() if _is_text_list(v)]
            listed = f" ({lists} hold lists of texts: {evaluator} takes one text per column)" if lists else ""
            raise ConfigError(
                f"{where}: {evaluator} takes {roles}; the file has the text columns {texts}{listed}: set {field} "
                f"to the columns in that order (e.g. [{', '.join(example)}])"
            )
        if scored and len(numbers) != 1:
            raise ConfigError(
                f"{where}: {evaluator} takes {roles}; the file has the numeric columns {numbers}: set {field} "
                "to the two text columns and the score column"
            )
        chosen = texts + (numbers if scored else [])
    twice = sorted({c for c in chosen if chosen.count(c) > 1})
    if twice:
        raise ConfigError(f"{field}: {twice} named more than once; each role reads its own column")
    missing = [c for c in chosen if c not in columns]
    if missing:
        raise ConfigError(f"{field}: {missing} not in the file, whose columns are {list(columns)}")
    want = (texts_taken or max(3, len(chosen))) + scored
    if len(chosen) != want or (texts_taken is None and len(chosen) < 3):
        raise ConfigError(f"{field}: {evaluator} takes {roles}; got {chosen}")
    text_part, score_part = chosen[: len(chosen) - scored], chosen[len(chosen) - scored :]
    for c in text_part:
        if not _is_text(columns[c]):
            raise DataError(f"{where}: column {c!r} is not text; {field} names the text columns first ({roles})")
    for c in score_part:
        if not _is_number(columns[c]):
            raise DataError(f"{where}: column {c!r} is not numeric; {field} ends with the score column ({roles})")
    for c in chosen:
        nulls = sum(v is None for v in columns[c])
        if nulls:
            raise DataError(f"{where}: column {c!r} has {nulls} null value(s); fill or drop those rows")
    return {c: columns[c] for c in chosen}


def build_evaluator(columns: dict[str, list[Any]], evaluator: str, kind: str) -> Any:
    """``columns``: what ``select_eval_columns`` chose, in its roles' order."""
    names = list(columns)
    texts = names[:-1] if _ROLES[evaluator][2] else names
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

        score = names[-1]
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
