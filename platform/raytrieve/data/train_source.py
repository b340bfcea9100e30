"""A training dataset as numbered pieces: the one row numbering the driver plans on and the
workers read by.

A piece is a run of rows of one file (parquet: a few consecutive row groups; jsonl, csv and
a saved Hugging Face dataset's arrow files: the whole file). The driver lists the pieces
from metadata and streams them once (checks, per-row keys); each training worker later
reads only the pieces it needs, and only the needed columns, and finds its planned rows by
``first_row + position``. So the files must be readable at the same path from the driver
and every worker node (local or shared storage; URIs are not read here yet, unlike the
encoding job's data/sources.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa

from raytrieve.errors import DataError

BATCH_ROWS = 65_536  # rows per streamed record batch: bounds the reader's memory
PIECE_ROWS = 131_072  # parquet row groups are merged up to about this many rows per piece


@dataclass(frozen=True)
class Piece:
    path: str
    fmt: str  # parquet | jsonl | csv | arrow (a saved Hugging Face dataset's stream file)
    first_row: int  # global index of the piece's first row
    rows: int  # -1 until counted (jsonl, csv)
    row_groups: tuple[int, ...] = ()  # parquet only


def _files(path: Path, suffix: str) -> list[Path]:
    return sorted(p for p in path.rglob(f"*{suffix}") if p.is_file()) if path.is_dir() else [path]


def list_pieces(path: Path, fmt: str) -> tuple[pa.Schema, list[Piece]]:
    """The dataset's schema and pieces, from metadata (row counts of jsonl/csv pieces are -1)."""
    try:
        if fmt == "parquet":
            return _parquet_pieces(path)
        if fmt == "hf":
            return _hf_pieces(path)
        if fmt in ("jsonl", "csv"):
            pieces = [Piece(str(f), fmt, -1, -1) for f in _files(path, ".jsonl" if fmt == "jsonl" else ".csv")]
            schema = pa.schema([])
            for piece in pieces:
                if Path(piece.path).stat().st_size:
                    schema = _stream_reader(piece, None).schema
                    break
            return schema, pieces
    except (pa.ArrowInvalid, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read it as {fmt} ({e}); check the file or set format:") from None
    raise DataError(f"{path}: unknown format {fmt!r}; set format: parquet | jsonl | csv | hf")


def _parquet_pieces(path: Path) -> tuple[pa.Schema, list[Piece]]:
    import pyarrow.parquet as pq

    pieces, schema, first = [], None, 0
    for f in _files(path, ".parquet"):
        meta = pq.ParquetFile(f).metadata
        schema = schema or meta.schema.to_arrow_schema()
        groups: list[int] = []
        rows = 0
        for g in range(meta.num_row_groups):
            groups.append(g)
            rows += meta.row_group(g).num_rows
            if rows >= PIECE_ROWS or g == meta.num_row_groups - 1:
                pieces.append(Piece(str(f), "parquet", first, rows, tuple(groups)))
                first += rows
                groups, rows = [], 0
    return schema or pa.schema([]), pieces


def _hf_pieces(path: Path) -> tuple[pa.Schema, list[Piece]]:
    from raytrieve._io import read_json

    state = path / "state.json"
    if not state.exists():
        raise DataError(
            f"{path}: no state.json; save the dataset with datasets' save_to_disk (a DatasetDict: "
            "point at one split's folder)"
        )
    names = [f["filename"] for f in read_json(state).get("_data_files", [])]
    pieces, schema, first = [], None, 0
    for name in names:
        with pa.memory_map(str(path / name)) as source:
            reader = pa.ipc.open_stream(source)
            schema = schema or reader.schema
            rows = sum(b.num_rows for b in reader)
        pieces.append(Piece(str(path / name), "arrow", first, rows))
        first += rows
    return schema or pa.schema([]), pieces


def _stream_reader(piece: Piece, columns: Sequence[str] | None):
    if piece.fmt == "jsonl":
        import pyarrow.json as pj

        return pj.open_json(piece.path, read_options=pj.ReadOptions(block_size=8 << 20))
    import pyarrow.csv as pc

    return pc.open_csv(
        piece.path,
        read_options=pc.ReadOptions(block_size=8 << 20),
        convert_options=pc.ConvertOptions(include_columns=list(columns) if columns else None),
    )


def iter_piece(piece: Piece, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    """The piece's rows, only ``columns``, in record batches of at most BATCH_ROWS rows."""
    columns = list(columns)
    try:
        if piece.fmt == "parquet":
            import pyarrow.parquet as pq

            # Measured on 1M rows: pre-buffering and reader threads keep buffers that grow the
            # reader's resident memory with the file (~60 MB per million short rows); without
            # them it stays flat (see data/validate.py, which also returns freed pool memory).
            reader = pq.ParquetFile(piece.path, pre_buffer=False, buffer_size=1 << 20)
            yield from reader.iter_batches(
                BATCH_ROWS, row_groups=list(piece.row_groups), columns=columns, use_threads=False
            )
        elif piece.fmt == "arrow":
            with pa.memory_map(piece.path) as source:
                for batch in pa.ipc.open_stream(source):
                    yield batch.select(columns)
        elif Path(piece.path).stat().st_size:
            for batch in _stream_reader(piece, columns):
                yield batch.select(columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(
            f"{piece.path}: cannot read it as {piece.fmt} ({e}); check the file (a jsonl file "
            "whose values change type between lines: convert it to parquet)"
        ) from None


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
