"""The evaluator a training run uses, built from an eval file the driver read.

Columns by role (``eval.columns`` names them in this order; without it, the file's text columns
in the file's order, when they are as many as the evaluator takes):
- information_retrieval: query, document (one query per distinct query text, every document
  paired with it relevant; the corpus is every distinct document);
- embedding_similarity: sentence1, sentence2, and a numeric score column;
- reranking, one row per query, in one of three layouts: query, positive, then negatives (a text
  each); query, positives, negatives where positives and negatives may be lists of texts; or a
  listwise file's query, documents (a list of texts) and labels (a list of numbers, one per
  document: above 0 is relevant, as sentence-transformers' reranking evaluator counts relevance).
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


def _is_number_list(values: list[Any]) -> bool:
    """Lists of numbers (a null inside a list is no number: it is not read as a missing label)."""
    present = [v for v in values if v is not None]
    return bool(present) and all(isinstance(v, list) and None not in v and _is_number(v) for v in present)


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
    lists = [c for c, v in columns.items() if _is_text_list(v)]
    if evaluator == "reranking" and (lists or (chosen and any(c in lists for c in chosen))):
        return _reranking_lists(columns, texts, lists, chosen, where, field)
    if chosen is None:
        numbers = [c for c, v in columns.items() if c not in texts and _is_number(v)]
        # reranking takes any number from 3 on, so only exactly 3 tell their roles (an id column
        # among 4 would be taken as the query)
        if len(texts) != (texts_taken or 3):
            example = _example(evaluator, texts) + ([numbers[0]] if scored and numbers else [])
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


_LAYOUTS = (
    "query, positive, negative... (a text each, or lists of texts for positive and negative), or query, documents, "
    "labels (a list of texts and a list of numbers per row)"
)


def _reranking_lists(
    columns: dict[str, list[Any]],
    texts: list[str],
    lists: list[str],
    chosen: list[str] | None,
    where: str,
    field: str,
) -> dict[str, list[Any]]:
    """reranking's columns where lists of texts are given: a listwise query, documents, labels; or
    query, positive(s), negative(s) with texts or lists of texts. Without ``field`` the file's
    columns must say their roles by type alone: one text column (the query) and one list of
    texts and one list of numbers (listwise), or exactly three text and text-list columns, the
    query a text column first in the file."""
    labels = [c for c, v in columns.items() if _is_number_list(v)]
    if chosen is None:
        ordered = [c for c in columns if c in texts or c in lists]
        if len(texts) == 1 and len(lists) == 1 and len(labels) == 1:
            chosen = [texts[0], lists[0], labels[0]]
        elif not labels and len(ordered) == 3 and ordered[0] in texts:
            chosen = ordered
        else:
            raise ConfigError(
                f"{where}: reranking takes {_LAYOUTS}; the file has the text columns {texts}, the text-list columns "
                f"{lists} and the number-list columns {labels}: set {field} to the columns in one of those orders "
                f"(e.g. [{', '.join((texts or ['<query column>'])[:1] + (lists or ['<documents column>'])[:1])}, "
                f"{(labels or ['<labels column>'])[0]}])"
            )
    missing = [c for c in chosen if c not in columns]
    if missing:
        raise ConfigError(f"{field}: {missing} not in the file, whose columns are {list(columns)}")
    twice = sorted({c for c in chosen if chosen.count(c) > 1})
    if twice:
        raise ConfigError(f"{field}: {twice} named more than once; each role reads its own column")
    listwise = len(chosen) == 3 and chosen[2] in labels
    if len(chosen) < 3 or not _is_text(columns[chosen[0]]):
        raise ConfigError(f"{field}: reranking takes {_LAYOUTS}; got {chosen} (the query: one text per row)")
    for c in chosen:
        nulls = sum(v is None for v in columns[c])
        if nulls:
            raise DataError(f"{where}: column {c!r} has {nulls} null value(s); fill or drop those rows")
    if listwise:
        documents, scores = chosen[1], chosen[2]
        if chosen[1] not in lists:
            raise DataError(
                f"{where}: column {documents!r} is not a list of texts; listwise reranking reads "
                f"query, documents, labels ({field})"
            )
        for i, (docs, given) in enumerate(zip(columns[documents], columns[scores])):
            if len(docs) != len(given):
                raise DataError(
                    f"{where}: row {i} has {len(docs)} document(s) in {documents!r} and {len(given)} label(s) in "
                    f"{scores!r}; give one label per document"
                )
    else:
        for c in chosen[1:]:
            if c not in texts and c not in lists:
                raise DataError(f"{where}: column {c!r} is neither text nor a list of texts; {field} names {_LAYOUTS}")
    return {c: columns[c] for c in chosen}


def _reranking_samples(columns: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """One sample per row ({"query", "positive": [...], "negative": [...]}) from reranking's
    columns in their roles' order: listwise (labels above 0 relevant), else texts or lists."""
    names = list(columns)
    rows = zip(*(columns[c] for c in names))
    if len(names) == 3 and _is_number_list(columns[names[2]]):
        return [
            {
                "query": q,
                "positive": [d for d, y in zip(docs, ys) if y > 0],
                "negative": [d for d, y in zip(docs, ys) if not y > 0],
            }
            for q, docs, ys in rows
        ]

    def texts(value: Any) -> list[str]:
        return list(value) if isinstance(value, list) else [value]

    return [
        {"query": row[0], "positive": texts(row[1]), "negative": [t for v in row[2:] for t in texts(v)]} for row in rows
    ]


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
    samples = _reranking_samples(columns)
    if kind == "cross":
        from raytrieve.evaluation import CrossEncoderRerankingEvaluator

        return CrossEncoderRerankingEvaluator(samples, name="eval", write_csv=False)
    from raytrieve.evaluation import RerankingEvaluator

    return RerankingEvaluator(samples, name="eval", write_csv=False)
