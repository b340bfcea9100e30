"""The evaluator a training run uses, built from an eval file the driver read.

Columns by role (``eval.columns`` names them in this order; without it, the file's text columns
in the file's order, when they are as many as the evaluator takes):
- information_retrieval: query, document (one query per distinct query text, every document
  paired with it relevant; the corpus is every distinct document);
- embedding_similarity: sentence1, sentence2, and a numeric score column;
- reranking, in one of its layouts (``_LAYOUTS``): one row per query with its positive and
  negatives (texts, or lists of texts); a listwise file's query, documents (a list of texts) and
  labels (one per document); or one row per (query, document, label) pair, grouped by query. A
  label is a relevance grade (a whole number or a boolean); above 0 (or true) is relevant, the
  positives and negatives sentence-transformers' reranking evaluators take.
"""

from __future__ import annotations

from typing import Any

from raytrieve.errors import ConfigError, DataError

# The text columns each evaluator takes, and whether a numeric score column follows them
# (reranking's layouts: _reranking_columns).
_ROLES: dict[str, tuple[str, int, bool]] = {
    "information_retrieval": ("query, document", 2, False),
    "embedding_similarity": ("sentence1, sentence2, score", 2, True),
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
    if evaluator == "reranking":
        return _reranking_columns(columns, chosen, where, field)
    roles, texts_taken, scored = _ROLES[evaluator]
    texts = [c for c, v in columns.items() if _is_text(v)]
    lists = [c for c, v in columns.items() if _is_text_list(v)]
    if chosen is None:
        numbers = [c for c, v in columns.items() if c not in texts and _is_number(v)]
        if len(texts) != texts_taken:
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
    if len(chosen) != texts_taken + scored:
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
    "query, positive, negative... (a text each, or lists of texts for positive and negative); query, documents, "
    "labels (a list of texts and a list of labels per row); or query, document, label (one row per pair, grouped "
    "by query)"
)
# Names a pair file's label column goes by, for taking it without eval.columns (an id is a number too).
_LABEL_NAMES = ("label", "labels", "score", "scores", "relevance", "is_relevant", "is_selected")


def _is_label(values: list[Any]) -> bool:
    """Numbers or booleans (is_selected): above 0, or true, is relevant."""
    present = [v for v in values if v is not None]
    return bool(present) and all(isinstance(v, (int, float)) for v in present)


def _is_label_list(values: list[Any]) -> bool:
    """Lists of labels, some empty (a row without candidates) but not all; a null inside a list
    is no label (it is not read as a missing one)."""
    present = [v for v in values if v is not None]
    return (
        any(present)
        and all(isinstance(v, list) for v in present)
        and all(isinstance(x, (int, float)) for v in present for x in v)
    )


def _grades(values: list[Any], flat: bool) -> float | None:
    """The first label that is no relevance grade (a whole number or a boolean), else None."""
    for v in values if flat else (x for row in values for x in row):
        if isinstance(v, float) and not v.is_integer():
            return v
    return None


def _reranking_columns(
    columns: dict[str, list[Any]], chosen: list[str] | None, where: str, field: str
) -> dict[str, list[Any]]:
    """reranking's columns in their roles' order, in one of its layouts (``_LAYOUTS``; above 0
    relevant). Without ``field`` the file's columns must tell their roles by type: one text, one
    list of texts and one list of labels (listwise); two texts and a label column named like one
    (pairs); or exactly three text and text-list columns, the query a text column first."""
    texts = [c for c, v in columns.items() if _is_text(v)]
    lists = [c for c, v in columns.items() if _is_text_list(v)]
    label_lists = [c for c, v in columns.items() if _is_label_list(v)]
    labels = [c for c, v in columns.items() if c not in texts and _is_label(v)]
    if chosen is None:
        ordered = [c for c in columns if c in texts or c in lists]
        named = [c for c in labels if c.lower() in _LABEL_NAMES]
        # A column named like a label or an id is never taken for a text role: a label stored as
        # text ("1") would be read as a negative document, a text id as the query.
        unsure = [c for c in columns if c.lower() in _LABEL_NAMES or c.lower().endswith("id")]
        if len(texts) == 1 and len(lists) == 1 and len(label_lists) == 1 and texts[0] not in unsure:
            chosen = [texts[0], lists[0], label_lists[0]]
        elif not lists and len(texts) == 2 and len(named) == 1 and not set(texts) & set(unsure):
            chosen = [*texts, named[0]]
        elif not label_lists and len(ordered) == 3 and ordered[0] in texts and not unsure:
            chosen = ordered
        else:
            query = next((c for c in texts if c.lower() in _NAMES["query"]), None) or next(
                (c for c in texts if c not in unsure), "<query column>"
            )
            if lists:  # listwise
                example = [query, lists[0], (label_lists or ["<labels column>"])[0]]
            elif len(texts) == 2 and not set(texts) & set(unsure):  # pairs
                example = [*texts, (named or ["<label column>"])[0]]  # an id is a number, not a label
            else:
                example = _example("reranking", texts)
            raise ConfigError(
                f"{where}: reranking takes {_LAYOUTS}; the file has the text columns {texts}, the text-list columns "
                f"{lists}, the label-list columns {label_lists} and the number columns {labels}: set {field} to "
                f"the columns in one of those orders (e.g. [{', '.join(example)}])"
            )
    missing = [c for c in chosen if c not in columns]
    if missing:
        raise ConfigError(f"{field}: {missing} not in the file, whose columns are {list(columns)}")
    twice = sorted({c for c in chosen if chosen.count(c) > 1})
    if twice:
        raise ConfigError(f"{field}: {twice} named more than once; each role reads its own column")
    if len(chosen) < 3 or not _is_text(columns[chosen[0]]):
        raise ConfigError(f"{field}: reranking takes {_LAYOUTS}; got {chosen} (the query: one text per row)")
    for c in chosen:
        nulls = sum(v is None for v in columns[c])
        if nulls:
            raise DataError(f"{where}: column {c!r} has {nulls} null value(s); fill or drop those rows")
    layout = _layout(columns, chosen)
    if layout == "listwise":
        documents, scores = chosen[1], chosen[2]
        if documents not in lists:
            raise DataError(
                f"{where}: column {documents!r} is not a list of texts; listwise reranking reads query, documents, "
                f"labels ({field})"
            )
        bad = [i for i, (d, y) in enumerate(zip(columns[documents], columns[scores])) if len(d) != len(y)]
        if bad:
            i = bad[0]
            raise DataError(
                f"{where}: {len(bad)} row(s) have another number of labels in {scores!r} than documents in "
                f"{documents!r} (the first: row {i}, counting from 0, with {len(columns[documents][i])} document(s) "
                f"and {len(columns[scores][i])} label(s)); give one label per document"
            )
    elif layout == "pairs":
        if chosen[1] not in texts:
            raise DataError(f"{where}: column {chosen[1]!r} is not text; pairs read query, document, label ({field})")
    else:
        for c in chosen[1:]:
            if c not in texts and c not in lists:
                raise DataError(f"{where}: column {c!r} is neither text nor a list of texts; {field} names {_LAYOUTS}")
    if layout != "texts" and (odd := _grades(columns[chosen[2]], flat=layout == "pairs")) is not None:
        raise DataError(
            f"{where}: column {chosen[2]!r} holds {odd}, no relevance grade: reranking reads whole numbers (0: not "
            "relevant) or booleans as labels; turn scores into grades first (e.g. score > 0.5)"
        )
    return {c: columns[c] for c in chosen}


def _layout(columns: dict[str, list[Any]], chosen: list[str]) -> str:
    """listwise (query, documents, labels), pairs (query, document, label) or texts."""
    if len(chosen) == 3 and _is_label_list(columns[chosen[2]]):
        return "listwise"
    if len(chosen) == 3 and not _is_text(columns[chosen[2]]) and _is_label(columns[chosen[2]]):
        return "pairs"
    return "texts"


def _reranking_samples(columns: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """One sample per query ({"query", "positive": [...], "negative": [...]}) from reranking's
    columns in their roles' order (``_reranking_columns``); a label above 0 (or true) is relevant."""
    names = list(columns)
    rows = list(zip(*(columns[c] for c in names)))
    layout = _layout(columns, names)
    if layout == "listwise":
        return [
            {
                "query": q,
                "positive": [d for d, y in zip(docs, ys) if y > 0],
                "negative": [d for d, y in zip(docs, ys) if not y > 0],
            }
            for q, docs, ys in rows
        ]
    if layout == "pairs":  # grouped by query text, in the order queries first appear
        grouped: dict[str, dict[str, Any]] = {}
        for q, d, y in rows:
            sample = grouped.setdefault(q, {"query": q, "positive": [], "negative": []})
            sample["positive" if y > 0 else "negative"].append(d)
        return list(grouped.values())

    def texts(value: Any) -> list[str]:
        return list(value) if isinstance(value, list) else [value]

    return [
        {"query": row[0], "positive": texts(row[1]), "negative": [t for v in row[2:] for t in texts(v)]} for row in rows
    ]


def build_evaluator(columns: dict[str, list[Any]], evaluator: str, kind: str) -> Any:
    """``columns``: what ``select_eval_columns`` chose, in its roles' order."""
    names = list(columns)
    texts = names[:-1] if evaluator == "embedding_similarity" else names
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
