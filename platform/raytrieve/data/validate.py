"""Check training datasets before any worker starts: the file exists and is readable, it
has rows, the configured columns exist with the types the loss needs, text columns have
no nulls, labels are present and numeric where the loss needs them. Types come from the
schema (metadata); rows and nulls from one streaming pass, which also computes the
planner's per-row keys: the driver never holds a dataset's texts.

Every error names the dataset, the file, the column and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from raytrieve.data import formats
from raytrieve.errors import DataError
from raytrieve.train.config import DatasetConfig, TrainConfig


@dataclass
class DatasetReport:
    name: str
    path: str
    rows: int
    text_columns: list[str]
    label_column: str | None
    format: str = ""
    pieces: list = field(default_factory=list, repr=False)  # train_source.Piece, numbered
    types: dict[str, pa.DataType] = field(default_factory=dict, repr=False)  # of the columns read
    text_keys: np.ndarray | None = field(default=None, repr=False)  # (rows, columns) uint64, "texts"
    label_keys: np.ndarray | None = field(default=None, repr=False)  # per row, "labels"
    digest: str = ""  # of the values read (digest.ContentDigest): a resumed run's data key


def infer_format(location: str | Path, fix: str | None = None) -> str:
    return formats.infer_format(str(location), fix=fix)


def read_table(location: str | Path, fmt: str, fix: str | None = None) -> pa.Table:
    """The whole dataset at a local path or URI as an Arrow table (small files only: eval sets,
    mining's pairs). ``fix``: the advice for a file that does not parse (default: check it, or
    set the config's format: key)."""
    try:
        return formats.get(fmt, str(location)).read_all(str(location))
    except DataError:
        raise
    except (pa.ArrowInvalid, OSError, ValueError) as e:
        raise formats.cannot_read(location, fmt, e, *([fix] if fix else [])) from None


def exists(location: str) -> bool:
    """Whether a file or folder is at a local path or URI (``files.resolve``'s)."""
    import pyarrow.fs as pafs

    from raytrieve.data.files import resolve

    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


# What a label_column refused for a loss that reads none suggests instead, by model kind.
_LABEL_LOSSES = {
    "dense": "CoSENTLoss or ContrastiveLoss",
    "sparse": "SparseCoSENTLoss",
    "cross": "BinaryCrossEntropyLoss",
}


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def is_numeric(t: pa.DataType) -> bool:
    """A number per row, or a list of numbers."""
    return _is_number(t) or ((pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_number(t.value_type))


class Listing(NamedTuple):
    """What ``check_dataset_columns`` found of one dataset: listing a folder of many files on an
    object store costs a request per file, so it is made once per command and handed on."""

    format: str
    schema: pa.Schema
    pieces: list[Any]  # train_source.Piece
    columns: list[str]  # the text columns, in the order the loss reads them


def check_dataset_columns(d: DatasetConfig, where: str) -> Listing:
    """The checks of a dataset that need neither its rows nor its loss (nor torch, which the
    loss checks import: ``raytrieve train`` runs these first, so a wrong path or column name is
    reported in about a second): it exists and can be reached, has rows, and has the label and
    text columns the config names."""
    from raytrieve.data.train_source import REACH_FIX, list_pieces

    path = d.path  # a local path or a URI (files.resolve)
    try:
        found = exists(path)
    except (OSError, DataError) as e:  # a URI pyarrow cannot open, a store that refuses or cannot be reached
        raise DataError(f"{where} ({d.name}): datasets[].path {path}: cannot reach it ({e}); {REACH_FIX}") from None
    if not found:
        raise DataError(f"{where} ({d.name}): {path} does not exist; fix datasets[].path")
    fmt = d.format or infer_format(path)
    schema, pieces = list_pieces(path, fmt)
    if all(p.rows == 0 for p in pieces) or not pieces or not len(schema):
        raise DataError(f"{where} ({d.name}): {path} has no rows")
    available = schema.names
    label = d.label_column
    if label is not None and label not in available:
        raise DataError(f"{where} ({d.name}): label_column {label!r} is not in {path}; columns are {available}")
    columns = list(d.columns) if d.columns is not None else [c for c in available if c != label]
    missing = [c for c in columns if c not in available]
    if missing:
        raise DataError(
            f"{where} ({d.name}): column(s) {missing} not in {path}; columns are {available}. Set the dataset's "
            "columns: to the file's columns to train on, in the order its loss reads them"
        )
    return Listing(fmt, schema, pieces, columns)


def list_datasets(cfg: TrainConfig, where: str) -> list[Listing]:
    """``check_dataset_columns`` of every dataset of ``cfg``, in order."""
    return [check_dataset_columns(d, f"{where}.datasets[{i}]") for i, d in enumerate(cfg.datasets)]


def validate_dataset(
    d: DatasetConfig, kind: str, where: str, keys: str | None = None, scan: bool = True, listed: Listing | None = None
) -> DatasetReport:
    """Check one dataset by streaming it once (record batches of the needed columns only, so
    the driver's memory does not grow with the file). ``keys``: "texts" also computes a 64-bit
    hash per text value, "labels" the label key per row, for the batch planner. The report's
    ``digest`` covers the values of the columns read, in order. ``scan=False``:
    the schema checks only (no rows read; ``rows`` is -1). ``listed``: ``check_dataset_columns``'s
    result for ``d`` where the caller has it (else it is made here)."""
    from raytrieve.data.digest import ContentDigest
    from raytrieve.data.row_keys import label_keys, text_keys
    from raytrieve.data.train_source import iter_piece, with_counts
    from raytrieve.losses.base import column_count_fits, describe_column_count
    from raytrieve.losses.registry import base_class

    path, label = d.path, d.label_column
    fmt, schema, pieces, columns = listed or check_dataset_columns(d, where)
    loss_name = d.loss.base_at(f"{where}.loss").name
    contract = base_class(d.loss, kind, f"{where}.loss")  # what the loss that meets the data asks of it
    wanted = contract.columns
    if not column_count_fits(len(columns), wanted):
        # sentence-transformers takes a column named label or score as the labels by itself; here
        # label_column says so (a guess would change what trains).
        numeric = [c for c in columns if is_numeric(schema.field(c).type)] if d.columns is None else []
        # Only the names sentence-transformers reads as labels, for a loss that reads labels, where
        # the rest then fits (an integer id column is no label).
        named = [c for c in numeric if c.lower() in ("label", "labels", "score", "scores")]
        fits = column_count_fits(len(columns) - 1, wanted)
        hint = (
            f"; {named[0]!r} holds the labels by sentence-transformers' naming: set label_column: {named[0]}"
            if len(named) == 1 and label is None and fits and (contract.needs_labels or contract.reads_labels)
            else "; set datasets[].columns (and label_column) to pick them"
        )
        raise DataError(
            f"{where} ({d.name}): {loss_name} takes {describe_column_count(wanted)} text column(s), "
            f"the dataset gives {len(columns)} columns {columns}{hint}"
        )
    listwise = contract.listwise
    for i, c in enumerate(columns):
        col_type = schema.field(c).type
        if listwise and i == 1:
            ok = pa.types.is_list(col_type) and formats.is_text(col_type.value_type)
            what = "a list of strings per row"
        else:
            ok, what = formats.is_text(col_type), "strings"
        if not ok:
            raise DataError(f"{where} ({d.name}): column {c!r} must hold {what}, found {col_type}")
    labelled = contract.needs_labels or (contract.reads_labels and label is not None)  # the loss reads them
    if label is not None and not (labelled or keys == "labels"):
        raise DataError(
            f"{where} ({d.name}): label_column {label!r} is set, but {loss_name} reads no labels: every row would "
            "train as a positive pair, those labelled 0 too; leave label_column out (name the text columns in "
            f"columns:, and keep only positive rows), or choose a loss that reads labels ({_LABEL_LOSSES[kind]})"
        )
    if labelled:
        if label is None:
            raise DataError(f"{where} ({d.name}): {loss_name} needs labels; set datasets[].label_column")
        label_type = schema.field(label).type
        ok = (
            (pa.types.is_list(label_type) and _is_number(label_type.value_type))
            if listwise
            else (_is_number(label_type) or (pa.types.is_list(label_type) and _is_number(label_type.value_type)))
        )
        if not ok:
            raise DataError(
                f"{where} ({d.name}): label column {label!r} must be numeric"
                f"{' lists (one score per document)' if listwise else ''}, found {label_type}"
            )
    for c in d.router_mapping:
        if c not in columns:
            raise DataError(f"{where} ({d.name}): router_mapping names column {c!r}, not one of {columns}")
    if isinstance(d.prompts, dict):
        for c in d.prompts:
            if c not in columns:
                raise DataError(f"{where} ({d.name}): prompts names column {c!r}, not one of {columns}")

    if not scan:
        return DatasetReport(d.name, path, -1, columns, label, fmt, pieces, {})
    # One streaming pass: row counts, nulls, and the planner's keys.
    read = columns + ([label] if label is not None and label not in columns else [])
    nulls = dict.fromkeys(read, 0)
    bad: dict[str, int] = {}  # problems inside values, by what _bad_values names them
    first_bad: dict[str, str] = {}  # where each problem is first seen: a row the error can point at
    counts, key_parts, label_parts = [], [], []
    pool = pa.default_memory_pool()
    known = sum(p.rows for p in pieces) if all(p.rows >= 0 for p in pieces) else None
    # Keys go straight into one array when the metadata gives the row count (parquet, hf):
    # collecting parts and concatenating would hold them twice at the peak.
    filled = 0
    if keys == "texts" and known is not None:
        key_parts.append(np.empty((known, len(columns)), dtype=np.uint64))
    floats: set[str] = set()  # columns some file holds as floats (the schema: the first file's)
    digest = ContentDigest(read)
    file_rows: dict[str, int] = {}  # the rows read so far of each file (a large one is split into pieces)
    for piece in pieces:
        rows, start = 0, file_rows.get(piece.path, 0)
        for batch in iter_piece(piece, read):
            before = start + rows  # the row number, in its file, of this batch's first row (what the error names)
            rows += batch.num_rows
            floats |= _check_batch_types(batch, schema, read, piece.path)
            digest.update(batch)
            for c in read:
                nulls[c] += batch.column(c).null_count
            for problem, (n, at) in _bad_values(batch, columns, label, listwise).items():
                bad[problem] = bad.get(problem, 0) + n
                if n and problem not in first_bad:
                    first_bad[problem] = f"; the first is row {before + at} (from 0) in {piece.path}: " + _row_text(
                        batch, at, read
                    )
            if keys == "texts" and not any(nulls[c] for c in columns):
                if known is not None and filled + batch.num_rows <= known:
                    for j, c in enumerate(columns):
                        key_parts[0][filled : filled + batch.num_rows, j] = text_keys(batch.column(c))
                    filled += batch.num_rows
                else:
                    key_parts.append(np.stack([text_keys(batch.column(c)) for c in columns], axis=1))
            if keys == "labels" and label is not None and not nulls[label]:
                label_parts.append(label_keys(batch.column(label)))
            del batch
            pool.release_unused()  # hand decoded pages back: the driver's memory stays flat
        counts.append(rows)
        file_rows[piece.path] = start + rows
    pieces = with_counts(pieces, counts)
    total = sum(counts)
    if total == 0:
        raise DataError(f"{where} ({d.name}): {path} has no rows")
    for c in columns:
        if nulls[c]:
            raise DataError(
                f"{where} ({d.name}): column {c!r} has {nulls[c]} null value(s) in {path}; drop or fill those rows"
            )
    # The loss needs every label, and so does group_by_label (it batches rows by their label).
    if (labelled or keys == "labels") and label is not None and nulls[label]:
        raise DataError(f"{where} ({d.name}): label column {label!r} has null values; drop or fill them")
    for problem, n in bad.items():  # each would fail a worker hours in, or train NaN weights
        if n and (problem != "non-finite" or labelled or keys == "labels"):
            raise DataError(
                f"{where} ({d.name}): {n} row(s) of {path} {_BAD[problem].format(label=label)}{first_bad[problem]}"
            )
    types = {c: schema.field(c).type for c in read}
    if label is not None and label in floats:  # int labels in one file, floats in another: all floats
        types[label] = pa.list_(pa.float64()) if pa.types.is_list(types[label]) else pa.float64()
    report = DatasetReport(d.name, path, total, columns, label, fmt, pieces, types, digest=digest.hexdigest())
    if keys == "texts":
        if known is not None and known == total:
            report.text_keys = key_parts[0]
        else:
            parts = ([key_parts[0][:filled], *key_parts[1:]]) if known is not None else key_parts
            report.text_keys = np.concatenate(parts) if parts else np.zeros((0, len(columns)), np.uint64)
    if keys == "labels":
        if label is None:
            raise DataError(
                f"{where} ({d.name}): batch_sampler group_by_label needs labels; set datasets[].label_column"
            )
        report.label_keys = np.concatenate(label_parts)
    return report


# What ``_bad_values`` counts, as the error says it (rows of the file ...).
_BAD = {
    "non-finite": "have a NaN or infinite label in {label!r} (the loss, then every weight, would be NaN); "
    "drop or fix those rows",
    "null items": "have a null inside a list (documents or labels); drop or fill those items",
    "lengths": "have another number of labels than documents (one label per document); fix those rows",
}


def _check_batch_types(batch: pa.RecordBatch, schema: pa.Schema, read: list[str], path: str) -> set[str]:
    """A folder's schema is its first file's (a jsonl or csv file says its types only when read):
    a batch whose column holds another kind of value (text for numbers) is refused, naming its
    file. Returns the columns this batch holds as floats (their numbers or lists of them), which
    an integer label of the first file must then be read as (0.7 would have been read as 0)."""
    floats = set()
    for c in read:
        want, got = schema.field(c).type, batch.schema.field(c).type
        if pa.types.is_null(got):  # a jsonl batch whose values are all null: the null count says so
            continue
        formats.check_column_type(c, want, got, path, "the folder's first file")
        if pa.types.is_floating(got.value_type if pa.types.is_list(got) else got):
            floats.add(c)
    return floats


def _bad_values(
    batch: pa.RecordBatch, columns: list[str], label: str | None, listwise: bool
) -> dict[str, tuple[int, int]]:
    """Rows of ``batch`` whose values no null count shows: a NaN or infinite float label, a null
    inside a list column, a listwise row with more or fewer labels than documents. Each problem
    found: how many rows have it, and the batch's first row that does."""
    import pyarrow.compute

    pc: Any = pyarrow.compute  # it makes its functions at import time: no stub names them
    rows: dict[str, np.ndarray] = {}  # the rows with each problem, sorted

    def add(problem: str, found: Any) -> None:
        found = np.asarray(found, dtype=np.int64)
        if len(found):
            rows[problem] = np.union1d(rows[problem], found) if problem in rows else np.unique(found)

    lists = [c for c in columns + ([label] if label else []) if pa.types.is_list(batch.schema.field(c).type)]
    for c in dict.fromkeys(lists):
        column = batch.column(c)
        items = pc.list_flatten(column)
        if items.null_count:
            add("null items", pc.filter(pc.list_parent_indices(column), pc.is_null(items)))
    if label is not None:
        values = batch.column(label)
        flat = pc.list_flatten(values) if pa.types.is_list(values.type) else values
        if pa.types.is_floating(flat.type):
            bad = pc.invert(pc.fill_null(pc.is_finite(flat), True))
            if pa.types.is_list(values.type):
                add("non-finite", pc.filter(pc.list_parent_indices(values), bad))
            else:
                add("non-finite", np.flatnonzero(bad.to_numpy(zero_copy_only=False)))
        if listwise and len(columns) > 1 and pa.types.is_list(values.type):
            differ = pc.not_equal(pc.list_value_length(batch.column(columns[1])), pc.list_value_length(values))
            add("lengths", np.flatnonzero(pc.fill_null(differ, False).to_numpy(zero_copy_only=False)))
    return {problem: (len(found), int(found[0])) for problem, found in rows.items()}


def _row_text(batch: pa.RecordBatch, at: int, columns: list[str], limit: int = 300) -> str:
    """One row's values as the error shows them, cut to ``limit`` characters."""
    text = ", ".join(f"{c}={batch.column(c)[at].as_py()!r}" for c in columns)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sampler_keys(cfg: TrainConfig) -> str | None:
    """The per-row keys the configured batch sampler plans with (and so must be complete)."""
    return {"no_duplicates": "texts", "group_by_label": "labels"}.get(cfg.training.batch_sampler)


def validate_datasets(cfg: TrainConfig, where: str = "config") -> list[DatasetReport]:
    keys = sampler_keys(cfg)
    return [
        validate_dataset(d, cfg.model.kind, f"{where}.datasets[{i}]", keys=keys) for i, d in enumerate(cfg.datasets)
    ]
