"""The corpus rows of one shard: id and text columns, the bad-row policy, a content checksum.

Workers call these on the shards they read (data/sources.py), so the driver never holds the
texts. Bad rows are a null id, a null or blank text, or an id that an earlier row already has
(the first row with an id is kept). Duplicates across shards are found by a distributed
check before encoding starts (inference/checks.py); each shard reader is told which of its
rows lose to an earlier one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raytrieve._io import redact
from raytrieve.data.formats import is_text
from raytrieve.errors import DataError
from raytrieve.inference.config import CorpusConfig

# Bad rows named in an error message or a report line; every one is in the shard sidecars.
EXAMPLES = 5


def needed_columns(cfg: CorpusConfig) -> list[str]:
    return [cfg.id_column, cfg.text_column] + ([cfg.title_column] if cfg.title_column else [])


def check_columns(schema: pa.Schema, cfg: CorpusConfig, location: str) -> None:
    """Every configured column exists and holds what it is read as (from the first file's
    schema, before any work: a shard's reader checks its own rows the same way)."""
    names = schema.names
    for role, name in (("id", cfg.id_column), ("text", cfg.text_column), ("title", cfg.title_column)):
        if name is None:
            continue
        if name not in names:
            if not names:
                raise DataError(f"{location}: has no rows (empty); fix corpus.path")
            raise DataError(
                f"{location}: no column {name!r} for the {role}; the file has {names}. "
                f"Set corpus.{role}_column to one of them."
            )
        _check_text_type(schema.field(name).type, name, role, location)


def _check_text_type(t: pa.DataType, name: str, role: str, location: str) -> None:
    if not (is_text(t) or pa.types.is_null(t)):
        if not (role == "id" and pa.types.is_integer(t)):  # integer ids are common; stored as strings
            raise DataError(f"{location}: column {name!r} ({role}) holds {t}, expected strings; convert it to text")


def _as_text(table: pa.Table, name: str, role: str, location: str) -> list[str | None]:
    if name not in table.column_names:  # a jsonl shard where no row has the key
        return [None] * table.num_rows
    column = table.column(name)
    _check_text_type(column.type, name, role, location)
    if not is_text(column.type):
        column = pc.cast(column, pa.string())  # an integer id, or a column of nulls
    try:
        return column.to_pylist()
    except UnicodeDecodeError as e:  # pyarrow's jsonl and csv readers keep such bytes as they are
        raise DataError(
            f"{location}: column {name!r} ({role}) holds bytes that are not UTF-8 ({e.reason} at byte {e.start} of "
            f"a value: {e.object[max(0, e.start - 20) : e.start + 20]!r}); save the file as UTF-8"
        ) from None


@dataclass
class ShardRows:
    """One shard after the bad-row policy: the rows to encode and the rows left out."""

    ids: list[str]
    texts: list[str]  # title joined in front, when configured
    input_rows: int
    bad: list[tuple[int, str | None, str]]  # (row in the shard, id, reason)


def shard_rows(
    table: pa.Table, cfg: CorpusConfig, location: str, duplicates: dict[str, int] | None = None, shard: int = 0
) -> ShardRows:
    """Apply the bad-row policy to one shard's table.

    ``duplicates`` maps each id that occurs more than once in the corpus to the position
    (``shard << 32 | row``) of its first occurrence; the other occurrences are bad rows.
    """
    ids = _as_text(table, cfg.id_column, "id", location)
    texts = _as_text(table, cfg.text_column, "text", location)
    titles = _as_text(table, cfg.title_column, "title", location) if cfg.title_column else None
    duplicates = duplicates or {}
    keep_ids, keep_texts, bad = [], [], []
    sep = cfg.title_separator
    for row, (id_, text) in enumerate(zip(ids, texts)):
        if id_ is None:
            bad.append((row, None, f"null {cfg.id_column}"))
        elif text is None:
            bad.append((row, id_, f"null {cfg.text_column}"))
        elif not (joined := join_title(titles[row] if titles is not None else None, text, sep)):
            bad.append((row, id_, f"empty {cfg.text_column}" + (f" and {cfg.title_column}" if titles else "")))
        elif id_ in duplicates and duplicates[id_] != position(shard, row):
            bad.append((row, id_, f"duplicate {cfg.id_column} (an earlier row has it)"))
        else:
            keep_ids.append(id_)
            keep_texts.append(joined)
    return ShardRows(keep_ids, keep_texts, len(ids), bad)


def join_title(title: str | None, text: str, sep: str = " ") -> str:
    """A document's one text: title, separator, text; a blank title adds nothing, and a title
    stands alone when the text is blank (BEIR's title-only documents: a paper with no abstract).
    "" when both are blank: a bad row. The encoding job and ``evaluate`` share this rule, so
    their two paths encode one text."""
    title = title if title and title.strip() else None
    if not text.strip():
        return title or ""
    return f"{title}{sep}{text}" if title else text


def position(shard: int, row: int) -> int:
    """A row's place in the corpus as one sortable integer (input order = position order)."""
    return (shard << 32) | row


def split_position(pos: int) -> tuple[int, int]:
    return pos >> 32, pos & 0xFFFFFFFF


def valid_ids(table: pa.Table, cfg: CorpusConfig, location: str, shard: int) -> pa.Table:
    """(id, pos) of the rows that pass the null/blank checks: the input of the duplicate check."""
    rows = shard_rows(table, cfg, location, None, shard)
    bad = {b[0] for b in rows.bad}
    kept = np.array([r for r in range(rows.input_rows) if r not in bad], dtype=np.int64)
    return pa.table(
        {
            "id": pa.array(rows.ids, pa.string()),
            "pos": pa.array((np.int64(shard) << 32) | kept if len(kept) else kept, pa.int64()),
        }
    )


def content_checksum(ids: list[str], texts: list[str]) -> str:
    """sha256 over the rows a shard encodes: a rerun re-encodes a shard only if this changed."""
    h = hashlib.sha256()
    for id_, text in zip(ids, texts):
        h.update(id_.encode())
        h.update(b"\x1f")
        h.update(text.encode())
        h.update(b"\x1e")
    return h.hexdigest()


def raise_bad_rows(location: str, count: int, examples: list[tuple[int, str | None, str]]) -> None:
    listed = "; ".join(f"row {row} ({reason})" for row, _, reason in examples)
    raise DataError(
        f"{redact(location)}: {count} bad row(s): {listed}. Fix the data, or set bad_rows: skip "
        "to leave them out (every one is listed in the shard sidecars; read them with read_bad_rows)"
    )
