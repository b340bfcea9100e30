"""The evaluation set: a corpus, queries and graded qrels, read and checked before any model loads.

Two layouts:

- BEIR's folder: ``corpus.jsonl`` ({"_id", "title", "text"} a line), ``queries.jsonl``
  ({"_id", "text"}) and ``qrels/<split>.tsv`` (a header ``query-id corpus-id score``, then one
  judgement a line; the score is a relevance grade, 0 = not relevant).
- Three files with named columns (``Columns``): corpus and queries as .jsonl or .parquet, qrels
  as .tsv, .csv, .jsonl or .parquet.

Every error names the file, the line (or row) and the fix. Qrels that name an unknown query or
document are errors (the count and a few examples); queries without a relevant document are
dropped and counted (a log line), as every IR metric leaves them out.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from raytrieve.config import ConfigModel
from raytrieve.errors import DataError
from raytrieve.inference.corpus import join_title

log = logging.getLogger("raytrieve.evaluate")

EXAMPLES = 5  # ids quoted in a message
TABLE_SUFFIXES = (".jsonl", ".parquet")
QRELS_SUFFIXES = (".tsv", ".csv", ".jsonl", ".parquet")


class Columns(ConfigModel):
    """Column (or JSON key) names of the three inputs; the defaults are BEIR's."""

    corpus_id: str = "_id"
    corpus_text: str = "text"
    corpus_title: str | None = Field(
        default="title", description="prepended to the text with a space; a corpus without it has no titles"
    )
    query_id: str = "_id"
    query_text: str = "text"
    qrels_query: str = "query-id"
    qrels_doc: str = "corpus-id"
    qrels_score: str = "score"


@dataclass
class EvalSet:
    corpus: dict[str, str]  # document id -> text (title in front), in file order
    queries: dict[str, str]  # query id -> text: the queries with a relevant document, by id
    qrels: dict[str, dict[str, float]]  # query id -> document id -> grade (> 0 relevant)
    corpus_path: Path
    columns: Columns
    title_column: str | None  # the corpus's title column, if it has one (the encoding job joins it too)
    summary: dict[str, Any] = field(default_factory=dict)


def _need_file(path: Path, what: str, fix: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: no such file ({what}); {fix}")
    return path


def _rows(path: Path, keys: Mapping[str, str], optional: tuple[str, ...] = ()) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) per record of a .jsonl or .parquet file; ``where`` is "file:line" or "file row N".
    ``keys``: each column a parquet file must have -> the ``--column`` key that names it."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise DataError(f"{path}: cannot read it as parquet ({e}); check the file") from None
        missing = [k for k in keys if k not in table.column_names]
        if missing:
            raise DataError(
                f"{path}: no column(s) {missing}; the file has {table.column_names}. Name the right ones with "
                + ", ".join(f"--column {keys[k]}=<column>" for k in missing)
            )
        wanted = [k for k in table.column_names if k in keys or k in optional]
        for i, row in enumerate(table.select(wanted).to_pylist()):
            yield f"{path} row {i}", row
        return
    # utf-8-sig: a byte-order mark (Windows editors, PowerShell) is dropped, not a JSON error.
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                    'JSON object, e.g. {"_id": "d1", "text": "..."}'
                ) from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: a JSON {type(row).__name__}, expected an object per line")
            yield f"{path}:{number}", row


def _text(where: str, row: dict[str, Any], key: str, role: str, flag: str, required: bool = True) -> str | None:
    if key not in row:
        if not required:
            return None
        raise DataError(
            f"{where}: no {key!r} key ({role}); the row has {sorted(row)}. Set --column {flag}=<key> "
            "if the file names it differently"
        )
    value = row[key]
    if role.endswith("id") and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # integer ids are common; they compare as strings
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} ({role}) is {type(value).__name__} {value!r}, expected a string")
    return value


def _id_text_table(
    path: Path,
    id_key: str,
    text_key: str,
    title_key: str | None,
    what: str,
    id_flag: str,
    text_flag: str,
    blanks: dict[str, str] | None = None,
) -> tuple[dict[str, str], bool]:
    """id -> text (title in front), and whether any row has the title key. ``blanks``: a row
    with a blank text goes there (id -> its place in the file) instead of being refused."""
    out: dict[str, str] = {}
    first_seen: dict[str, str] = {}
    titled = False
    for where, row in _rows(path, {id_key: id_flag, text_key: text_flag}, (title_key,) if title_key else ()):
        doc_id = _text(where, row, id_key, f"{what} id", id_flag)
        text = _text(where, row, text_key, f"{what} text", text_flag)
        assert doc_id is not None and text is not None, "required keys are never None"
        if not doc_id.strip():
            raise DataError(f"{where}: empty {what} id; every {what} needs an id")
        if doc_id in out:
            raise DataError(f"{where}: {what} id {doc_id!r} again (first at {first_seen[doc_id]}); ids must be unique")
        title = _text(where, row, title_key, f"{what} title", "corpus_title", required=False) if title_key else None
        titled = titled or (title_key is not None and title_key in row)
        # The encoding job's rule (inference/corpus.py), so both paths encode one text.
        joined = join_title(title, text)
        if not joined and blanks is not None:
            blanks[doc_id] = where
            continue
        if not joined:
            fix = "give it text (judgements may name it)" if title_key else "give it text or remove the row"
            raise DataError(
                f"{where}: {what} {doc_id!r} has a blank text" + (" and no title" if title_key else "") + f"; {fix}"
            )
        out[doc_id] = joined
        first_seen[doc_id] = where
    if not out:
        raise DataError(f"{path}: no {what} rows; the file is empty")
    return out, titled


def _grade(where: str, raw: Any) -> float:
    try:
        value = float(raw) if not isinstance(raw, bool) else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise DataError(
            f"{where}: score {raw!r} is not a finite number; a score is a relevance grade "
            "(0 = not relevant, 1, 2, ... = more relevant)"
        )
    return value


def _qrel_rows(path: Path, columns: Columns) -> Iterator[tuple[str, Any, Any, Any]]:
    keys = [columns.qrels_query, columns.qrels_doc, columns.qrels_score]
    if path.suffix in (".tsv", ".csv"):
        delimiter = "\t" if path.suffix == ".tsv" else ","
        with open(path, encoding="utf-8-sig", newline="") as f:  # a BOM is not part of the header
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                raise DataError(
                    f"{path}: empty file; qrels need a header line {' '.join(keys)} and one row per judgement"
                )
            header = [h.strip() for h in header]
            missing = [k for k in keys if k not in header]
            if missing:
                raise DataError(
                    f"{path}:1: the header {header} lacks {missing}; the first line must name the columns "
                    f"({delimiter!r}-separated: {', '.join(keys)}), "
                    "or set --column qrels_query=/qrels_doc=/qrels_score="
                )
            at = [header.index(k) for k in keys]
            for fields in reader:
                number = reader.line_num  # the line a row ends on (a quoted field may span lines)
                if not fields or not any(x.strip() for x in fields):
                    continue
                if len(fields) != len(header):
                    # TREC's qrels (query, iteration "0"/"Q0", document, grade) under BEIR's header.
                    trec = len(fields) == 4 and len(header) == 3 and fields[1].strip() in ("0", "Q0")
                    fix = (
                        "this looks like TREC qrels (query, iteration, document, grade): drop the second column"
                        if trec
                        else f"separate the columns with {'tabs' if delimiter == chr(9) else 'commas'}, one per "
                        "header name"
                    )
                    raise DataError(f"{path}:{number}: {len(fields)} field(s), the header has {len(header)}; {fix}")
                query_id, doc_id, score = (fields[i].strip() for i in at)
                yield f"{path}:{number}", query_id, doc_id, score
        return
    flags = dict(zip(keys, ("qrels_query", "qrels_doc", "qrels_score")))
    for where, row in _rows(path, flags):
        for key, flag in flags.items():
            if key not in row:
                raise DataError(f"{where}: no {key!r} key; the row has {sorted(row)}. Set --column {flag}=<key>")
        query_id, doc_id = (str(row[k]) if isinstance(row[k], int) else row[k] for k in keys[:2])
        yield where, query_id, doc_id, row[keys[2]]


def read_qrels(path: Path, columns: Columns) -> dict[str, dict[str, float]]:
    """query id -> document id -> grade, every judgement of the file (grades <= 0 included)."""
    qrels: dict[str, dict[str, float]] = {}
    lines: dict[tuple[str, str], str] = {}
    for where, query_id, doc_id, score in _qrel_rows(path, columns):
        for value, role in ((query_id, "query id"), (doc_id, "document id")):
            if not isinstance(value, str) or not value:
                raise DataError(f"{where}: {role} {value!r} is empty or not text; every judgement names both ids")
        if (query_id, doc_id) in lines:
            raise DataError(
                f"{where}: ({query_id!r}, {doc_id!r}) is judged again (first at {lines[query_id, doc_id]}); "
                "keep one row"
            )
        lines[query_id, doc_id] = where
        qrels.setdefault(query_id, {})[doc_id] = _grade(where, score)
    if not qrels:
        raise DataError(f"{path}: no judgements; the split is empty. Point at a qrels file with rows")
    return qrels


def _examples(ids: list[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:EXAMPLES])
    return shown + (", ..." if len(ids) > EXAMPLES else "")


def check(
    corpus: dict[str, str],
    queries: dict[str, str],
    qrels: dict[str, dict[str, float]],
    files: dict[str, Path],
) -> tuple[dict[str, str], dict[str, dict[str, float]], dict[str, Any]]:
    """The queries and qrels to score: unknown ids are errors, queries without a relevant
    document are dropped (counted and logged)."""
    unknown_queries = sorted(q for q in qrels if q not in queries)
    if unknown_queries:
        raise DataError(
            f"{files['qrels']}: {len(unknown_queries)} query id(s) are not in {files['queries']}, e.g. "
            f"{_examples(unknown_queries)}; add those queries or remove their judgements"
        )
    unknown_docs = sorted({d for judged in qrels.values() for d in judged if d not in corpus})
    if unknown_docs:
        raise DataError(
            f"{files['qrels']}: {len(unknown_docs)} document id(s) are not in {files['corpus']}, e.g. "
            f"{_examples(unknown_docs)}; add those documents to the corpus or remove their judgements"
        )
    scored = sorted(q for q, judged in qrels.items() if any(g > 0 for g in judged.values()))
    if not scored:
        raise DataError(
            f"{files['qrels']}: no query has a relevant document (every score <= 0); the split is empty. "
            "Relevant judgements need a score > 0"
        )
    # Two reasons a query is not scored, told apart: a BEIR queries file holds every split's
    # queries, so most are simply not judged in this one; a judged query whose every grade is
    # <= 0 is a real gap in the judgements.
    unjudged = [q for q in queries if q not in qrels]
    no_relevant = sorted(q for q in qrels if q not in scored)
    if unjudged:
        log.info(
            "%d of %d queries are not judged in %s (e.g. other splits' queries)",
            len(unjudged),
            len(queries),
            files["qrels"],
        )
    if no_relevant:
        log.warning(
            "%d queries judged in %s have no relevant document (every score <= 0) and are left out, e.g. %s",
            len(no_relevant),
            files["qrels"],
            _examples(no_relevant),
        )
    summary = {
        "queries": len(scored),
        "documents": len(corpus),
        "judgements": sum(len(j) for j in qrels.values()),
        "relevant": sum(1 for q in scored for g in qrels[q].values() if g > 0),
        "graded": any(g not in (0.0, 1.0) for j in qrels.values() for g in j.values()),
        "dropped_queries": len(unjudged) + len(no_relevant),
        "judged_without_relevant": len(no_relevant),
    }
    return {q: queries[q] for q in scored}, {q: qrels[q] for q in scored}, summary


def beir_files(
    folder: str | Path, split: str = "test", choose: str | None = None, option: str = "--data"
) -> tuple[Path, Path, Path]:
    """A BEIR folder's corpus.jsonl, queries.jsonl and qrels/<split>.tsv, each checked to exist.
    ``choose``: the fix when the split is missing but others are there (default: evaluate's --split);
    ``option``: the argument that named the folder (evaluate's --data by default)."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; {option} takes a BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    qrels_path = root / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        found = sorted(p.stem for p in (root / "qrels").glob("*.tsv")) if (root / "qrels").is_dir() else []
        raise DataError(
            f"{qrels_path}: no such file; the splits there are {found or 'none (no qrels/*.tsv)'}. "
            + (
                (choose or f"Pass --split {found[0]}")
                if found
                else "Write qrels/<split>.tsv with a header query-id corpus-id score"
            )
        )
    fix = "a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/<split>.tsv"
    return (
        _need_file(root / "corpus.jsonl", "the corpus", fix),
        _need_file(root / "queries.jsonl", "the queries", fix),
        qrels_path,
    )


def load_beir(folder: str | Path, split: str = "test", columns: Columns | None = None) -> EvalSet:
    """A BEIR folder: corpus.jsonl, queries.jsonl and qrels/<split>.tsv."""
    return load_files(*beir_files(folder, split), columns, split=split)


def _checked_files(corpus: str | Path, queries: str | Path, qrels: str | Path) -> dict[str, Path]:
    files = {"corpus": Path(corpus), "queries": Path(queries), "qrels": Path(qrels)}
    for role, path in files.items():
        suffixes = QRELS_SUFFIXES if role == "qrels" else TABLE_SUFFIXES
        _need_file(path, f"the {role}", f"pass the {role} file (--{role})")
        if path.suffix not in suffixes:
            raise DataError(f"{path}: {role} must be one of {', '.join(suffixes)} (by its name); convert it")
    return files


def load_files(
    corpus: str | Path, queries: str | Path, qrels: str | Path, columns: Columns | None = None, split: str | None = None
) -> EvalSet:
    """Corpus, queries (.jsonl / .parquet) and qrels (.tsv / .csv / .jsonl / .parquet) with named columns."""
    columns = columns or Columns()
    files = _checked_files(corpus, queries, qrels)
    title = columns.corpus_title
    docs, titled = _id_text_table(
        files["corpus"], columns.corpus_id, columns.corpus_text, title, "document", "corpus_id", "corpus_text"
    )
    # BEIR's default "title" may be absent (a corpus without titles); a title column named by the user may not.
    if title and not titled and "corpus_title" in columns.model_fields_set:
        raise DataError(f"{files['corpus']}: no row has {title!r} for --column corpus_title; fix the name or drop it")
    return _judged(docs, files, columns, title if titled else None, split)


def load_split(base: EvalSet, queries: str | Path, qrels: str | Path, split: str | None = None) -> EvalSet:
    """Another split over ``base``'s corpus (``evaluate --tune-on``): its queries and qrels are
    read and checked as ``load_files`` does; the corpus, the same file, is not read again."""
    files = _checked_files(base.corpus_path, queries, qrels)
    return _judged(base.corpus, files, base.columns, base.title_column, split)


def _judged(
    docs: dict[str, str], files: dict[str, Path], columns: Columns, title: str | None, split: str | None
) -> EvalSet:
    """The EvalSet of ``docs`` with the queries and qrels of ``files``, checked against them."""
    # A BEIR queries file holds every split's queries: a blank one matters only if judged here.
    blank: dict[str, str] = {}
    asked, _ = _id_text_table(
        files["queries"], columns.query_id, columns.query_text, None, "query", "query_id", "query_text", blank
    )
    qrels = read_qrels(files["qrels"], columns)
    judged_blank = [q for q in blank if q in qrels]
    if judged_blank:
        raise DataError(
            f"{blank[judged_blank[0]]}: query {judged_blank[0]!r} has a blank text and {files['qrels']} judges it"
            f"{f' ({len(judged_blank)} such queries)' if len(judged_blank) > 1 else ''}; give it its text, or "
            "remove its judgements"
        )
    kept, judged, summary = check(docs, asked, qrels, files)
    summary = {"files": {k: str(v) for k, v in files.items()}, "split": split, **summary}
    return EvalSet(docs, kept, judged, files["corpus"], columns, title, summary)


def fingerprints(evalset: EvalSet) -> dict[str, Any]:
    """What ``--compare`` checks two runs share (stored in evaluation.json as
    ``data_fingerprints``): each scored query's text and judgements, by id, and the corpus (ids
    and texts, titles in front). Query ids alone are no proof: two datasets' "q1" are unrelated."""

    def digest(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, ensure_ascii=False).encode()).hexdigest()[:16]

    corpus = hashlib.sha256()
    for d in sorted(evalset.corpus):
        corpus.update(json.dumps([d, evalset.corpus[d]], ensure_ascii=False).encode())
        corpus.update(b"\n")
    queries = {q: digest([evalset.queries[q], sorted(evalset.qrels[q].items())]) for q in sorted(evalset.queries)}
    return {"corpus": corpus.hexdigest()[:16], "queries": queries}
