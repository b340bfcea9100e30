"""A training dataset as numbered pieces: the one row numbering the driver plans on and the
workers read by.

A piece is a run of rows of one file (parquet: a few consecutive row groups; jsonl, csv and
a saved Hugging Face dataset's arrow files: the whole file). The driver lists the pieces
from metadata and streams them once (checks, per-row keys); each training worker later
reads only the pieces it needs, and only the needed columns, and finds its planned rows by
``first_row + position``. So the files must be readable at the same location from the driver
and every worker node: a local path on shared storage, or a URI of any filesystem pyarrow opens
(``s3://``, ``gs://``, ``abfs://``, ``file://``), as the encoding job's data/sources.py reads.

Both this module and sources.py read through the format table (formats.py), but their units
differ on purpose: the encoder cuts files into shards of a fixed row count, byte ranges
included, so many workers share one file; training streams whole pieces (files, or runs of
row groups) once for the checks and counts the rows of line formats there, which byte
ranges cannot give.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from raytrieve.data import formats
from raytrieve.data.files import is_uri, resolve, with_scheme
from raytrieve.data.formats import InputFormat
from raytrieve.errors import DataError

# For a dataset file that cannot be opened (a worker node's too: it reads by the same location).
REACH_FIX = (
    "check the file; the driver and every worker node read it at this location, so it must exist there and each "
    "node's credentials must reach it (for s3: AWS_* environment variables or the instance's role)"
)
PIECE_ROWS = 131_072  # parquet row groups are merged up to about this many rows per piece


@dataclass(frozen=True)
class Piece:
    path: str
    fmt: str  # a name in formats.FORMATS
    first_row: int  # global index of the piece's first row
    rows: int  # -1 until counted (jsonl, csv)
    row_groups: tuple[int, ...] = ()  # parquet only


def _files(location: str, fmt: InputFormat) -> list[str]:
    """The dataset's files, each a location that opens anywhere (a folder's: its format's files)."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return [location if is_uri(location) else str(Path(location))]  # as older run stamps keyed it
    return [with_scheme(location, path, f) for f in fmt.folder_files(fs, path)]


def list_pieces(location: str | Path, fmt: str) -> tuple[pa.Schema, list[Piece]]:
    """The dataset's schema and pieces, from metadata (row counts of jsonl/csv pieces are -1).
    ``location``: a local path or a URI (files.resolve)."""
    location = str(location)
    kind = formats.get(fmt, location)
    try:
        schema, found = kind.pieces(_files(location, kind), PIECE_ROWS)
    except DataError:
        raise
    except (pa.ArrowInvalid, ValueError) as e:
        raise formats.cannot_read(location, fmt, _bad_line(fmt, _files(location, kind)) or e) from None
    except OSError as e:
        raise formats.cannot_read(location, fmt, e, REACH_FIX) from None
    pieces, first = [], 0
    for file, rows, groups in found:
        pieces.append(Piece(file, fmt, first if rows >= 0 else -1, rows, groups))
        first += max(rows, 0)
    return schema, pieces


def _bad_line(fmt: str, files: Sequence[str]) -> str | None:
    """For jsonl, the first line that is not one JSON object (``formats.bad_line``; pyarrow
    numbers a failing row within its block) of the first file of ``files`` with content (the
    one a failed read parsed: a folder's reader stops at it), naming the file where there are
    several."""
    if fmt != "jsonl":
        return None
    for f in files:
        fs, path = resolve(f)
        if not fs.get_file_info(path).size:
            continue
        where = formats.bad_line(fs, path)
        return where if where is None or len(files) == 1 else f"{f}: {where}"
    return None


def iter_piece(piece: Piece, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    """The piece's rows, only ``columns``, in record batches of at most formats.BATCH_ROWS rows."""
    try:
        yield from formats.get(piece.fmt).iter_piece(piece.path, piece.row_groups, list(columns))
    except KeyError:  # a jsonl or csv file of a folder without a column the first file has
        fmt = formats.get(piece.fmt)
        if not isinstance(fmt, formats.LineFormat):
            raise
        found = fmt.stream(piece.path, None).schema.names
        if all(c in found for c in columns):  # another KeyError: not a missing column
            raise
        raise DataError(
            f"{piece.path}: has no column(s) {[c for c in columns if c not in found]} (its columns: {found}); "
            "every file of the folder needs the same columns (fix or move that file)"
        ) from None
    except pa.ArrowInvalid as e:
        # A text stream's types are its first block's: a column whose values change type later fails.
        fix = "check the file" + (
            f" (a {piece.fmt} file whose values change type between lines: convert it to parquet)"
            if piece.fmt in ("jsonl", "csv")
            else ""
        )
        raise formats.cannot_read(piece.path, piece.fmt, _bad_line(piece.fmt, [piece.path]) or e, fix) from None
    except OSError as e:  # not found, no access, no network; or a damaged file
        raise formats.cannot_read(piece.path, piece.fmt, e, REACH_FIX) from None


def read_piece(piece: Piece, columns: Sequence[str]) -> pa.Table:
    batches = list(iter_piece(piece, columns))
    if not batches:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.Table.from_batches(batches)


def with_counts(pieces: Sequence[Piece], counts: Sequence[int]) -> list[Piece]:
    """Pieces numbered from their counted rows (jsonl/csv after the driver's scan)."""
    out, first = [], 0
    for piece, rows in zip(pieces, counts):
        out.append(replace(piece, first_row=first, rows=rows))
        first += rows
    return out
