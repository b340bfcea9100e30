"""Reading a corpus for the batch jobs: the id and text columns, the bad-row policy, and a
content fingerprint.

The driver reads the corpus itself (pyarrow, only the columns it needs) because two things
need the whole corpus before any work starts: duplicate ids can only be found globally, and
shard boundaries must be a pure function of the input so that a killed job, run again,
finds the same shards.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raytrieve.data.validate import infer_format, read_table
from raytrieve.errors import DataError
from raytrieve.inference.config import CorpusConfig

# Bad rows named in an error message or a report line; the full list goes to a file.
EXAMPLES = 5


@dataclass
class Corpus:
    ids: list[str]
    texts: list[str]
    bad: pa.Table  # row (0-based, in the input), id, reason - one line per row left out
    input_rows: int

    def __len__(self) -> int:
        return len(self.ids)


def _column(table: pa.Table, name: str, role: str, path: Path) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise DataError(
            f"{path}: no column {name!r} for the {role}; the file has {table.column_names}. "
            f"Set corpus.{role}_column to one of them."
        )
    return table.column(name)


def _as_text(column: pa.ChunkedArray, name: str, path: Path, role: str) -> pa.ChunkedArray:
    t = column.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return column
    if pa.types.is_null(t):
        return column.cast(pa.string())
    if role == "id" and (pa.types.is_integer(t)):
        return pc.cast(column, pa.string())  # integer ids are common; they are stored as strings
    raise DataError(f"{path}: column {name!r} ({role}) holds {t}, expected strings; convert it to text")


def read_corpus(cfg: CorpusConfig, bad_rows: str) -> Corpus:
    """The corpus rows to encode, in input order, after the bad-row policy.

    Bad rows: a null id, a null or blank text, an id seen before (the first row with an id
    is kept). ``bad_rows="fail"`` raises with examples; ``"skip"`` leaves them out and lists
    every one in ``Corpus.bad``.
    """
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DataError(f"corpus.path {path}: file not found; point it at a parquet, jsonl or csv file or a folder")
    table = read_table(path, cfg.format or infer_format(path))
    if table.num_rows == 0:
        raise DataError(f"{path}: the corpus has no rows")
    ids = _as_text(_column(table, cfg.id_column, "id", path), cfg.id_column, path, "id")
    texts = _as_text(_column(table, cfg.text_column, "text", path), cfg.text_column, path, "text")
    id_list = ids.to_pylist()
    text_list = texts.to_pylist()  # judged alone: a title never rescues a null or blank text
    n = len(id_list)

    reasons: dict[int, str] = {}
    for i, (id_, text) in enumerate(zip(id_list, text_list)):
        if id_ is None:
            reasons[i] = f"null {cfg.id_column}"
        elif text is None:
            reasons[i] = f"null {cfg.text_column}"
        elif not text.strip():
            reasons[i] = f"empty {cfg.text_column}"
    valid = np.array([i for i in range(n) if i not in reasons], dtype=np.int64)
    valid_ids = np.array([id_list[i] for i in valid], dtype=object)
    if len(valid):
        _, first = np.unique(valid_ids, return_index=True)
        dup = np.ones(len(valid), dtype=bool)
        dup[first] = False
        for i in valid[dup]:
            reasons[int(i)] = f"duplicate {cfg.id_column} (an earlier row has it)"
    bad_rows_sorted = sorted(reasons)
    if bad_rows_sorted and bad_rows == "fail":
        examples = "; ".join(f"row {i} ({reasons[i]})" for i in bad_rows_sorted[:EXAMPLES])
        raise DataError(
            f"{path}: {len(bad_rows_sorted)} bad row(s): {examples}. Fix the data, or set bad_rows: skip "
            "to leave them out (every one is listed in the job's bad_rows.parquet)"
        )
    keep = [i for i in range(n) if i not in reasons]
    if not keep:
        raise DataError(f"{path}: every row is bad (null/empty {cfg.text_column} or null/duplicate {cfg.id_column})")
    if cfg.title_column:
        titles = _as_text(_column(table, cfg.title_column, "title", path), cfg.title_column, path, "text")
        title_list = titles.to_pylist()
        sep = cfg.title_separator
        # No title: the text alone, without a leading separator.
        text_list = [f"{t}{sep}{x}" if t else x for t, x in zip(title_list, text_list)]
    bad = pa.table({
        "row": pa.array(bad_rows_sorted, pa.int64()),
        "id": pa.array([id_list[i] for i in bad_rows_sorted], pa.string()),
        "reason": pa.array([reasons[i] for i in bad_rows_sorted], pa.string()),
    })
    return Corpus([id_list[i] for i in keep], [text_list[i] for i in keep], bad, n)


def content_fingerprint(ids: list[str], texts: list[str]) -> str:
    h = hashlib.sha256()
    for start in range(0, len(ids), 4096):
        for id_, text in zip(ids[start : start + 4096], texts[start : start + 4096]):
            h.update(id_.encode())
            h.update(b"\x1f")
            h.update(text.encode())
            h.update(b"\x1e")
    return h.hexdigest()


def shard_bounds(n: int, rows_per_shard: int) -> list[tuple[int, int]]:
    return [(s, min(s + rows_per_shard, n)) for s in range(0, n, rows_per_shard)]
