"""Where a job's rows come from: a file, a folder or glob of files, or a saved Hugging Face
``datasets`` folder, on local disk or any filesystem pyarrow resolves (``s3://``, ``gs://``,
``abfs://``, ``file://``), cut into shards that workers read on their own.

    source = open_source("s3://bucket/corpus/*.parquet")
    specs = plan_shards(source, rows_per_shard=10_000)      # metadata only
    table = read_shard(specs[3], ["id", "text"])             # on a worker

The plan is a pure function of the input, so a killed job run again finds the same shards:

- parquet and HF arrow files: row ranges from each file's metadata (footer row counts,
  record batch headers), ``rows_per_shard`` rows each;
- jsonl and csv: byte ranges of about ``rows_per_shard`` lines (the line length is measured
  on the first MiB of the first file). A shard owns the lines that *start* inside its range,
  so no line is read twice or lost; csv shards repeat the header. As with pyarrow's own csv
  reader, a csv value must not hold a newline.

The driver lists files and reads their metadata; only ``read_shard`` touches row data.
No Ray here: the planner and reader are plain functions the Ray stages call. What is
particular to each format (suffixes, ranges, parsing) lives in formats.py; this module only
looks the format up there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from raytrieve.data import formats
from raytrieve.data.files import glob_files, is_glob, is_uri, resolve, with_scheme
from raytrieve.data.formats import infer_format
from raytrieve.errors import DataError

__all__ = [
    "ShardSpec",
    "Source",
    "SourceFile",
    "head_schema",
    "infer_format",
    "is_uri",
    "open_source",
    "plan_shards",
    "read_shard",
    "resolve",
]


@dataclass(frozen=True)
class SourceFile:
    path: str  # a URI or a local path, as given to the filesystem
    size: int
    rows: int | None  # known from metadata (parquet, hf); None for line formats


@dataclass(frozen=True)
class Source:
    location: str  # what the user gave
    format: str
    files: tuple[SourceFile, ...]


@dataclass(frozen=True)
class ShardSpec:
    """One shard: ``[start, stop)`` rows (parquet, hf) or bytes (jsonl, csv) of one file."""

    shard: int
    path: str
    format: str
    start: int
    stop: int

    def as_row(self) -> dict[str, object]:
        return {"shard": self.shard, "path": self.path, "format": self.format, "start": self.start, "stop": self.stop}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ShardSpec:
        return cls(int(row["shard"]), str(row["path"]), str(row["format"]), int(row["start"]), int(row["stop"]))


def _list_files(location: str, fs: pafs.FileSystem, path: str, fmt: formats.InputFormat) -> list[str]:
    if is_glob(path):
        return glob_files(fs, path)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{location}: file not found; point it at a parquet, jsonl or csv file, a folder or a glob")
    if info.type == pafs.FileType.File:
        return [path]
    return fmt.folder_files(fs, path)


def open_source(location: str, fmt: str | None = None, field: str = "path") -> Source:
    """List the input's files with their sizes and (where metadata has them) row counts.
    ``field`` names the config key in errors."""
    fs, path = resolve(location)
    if not is_glob(path) and fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise DataError(
            f"{field} {location}: file not found; point it at a parquet, jsonl or csv file, a folder or a glob"
        )
    if not fmt:
        by_name = formats.by_suffix(path) if is_glob(path) else None
        fmt = infer_format(location, fs, path) if not is_glob(path) else (by_name.name if by_name else "parquet")
    kind = formats.get(fmt, f"{field} {location}")
    files = []
    for p in _list_files(location, fs, path, kind):
        info = fs.get_file_info(p)
        try:
            rows = kind.row_count(fs, p)
        except (pa.ArrowInvalid, OSError) as e:
            raise formats.cannot_read(p, fmt, e) from None
        files.append(SourceFile(with_scheme(location, path, p), int(info.size or 0), rows))
    if not files:
        raise DataError(f"{field} {location}: no {fmt} files there")
    return Source(location, fmt, tuple(files))


def _head(source: Source) -> SourceFile:
    """The first file with content: a folder's empty files (a Spark job's empty part) say nothing."""
    return next((f for f in source.files if f.size), source.files[0])


def head_file(source: Source) -> str:
    """The file ``head_schema`` reads."""
    return _head(source).path


def head_schema(source: Source) -> pa.Schema:
    """Columns and types of ``head_file`` (metadata or the first lines): checked before any work."""
    first = _head(source)
    fs, path = resolve(first.path)
    try:
        return formats.get(source.format).head_schema(fs, path, first.size)
    except (pa.ArrowInvalid, OSError, StopIteration) as e:
        # pyarrow numbers the failing row from 0 within what it parsed: name the file's line.
        line = formats.bad_line(fs, path) if source.format == "jsonl" and isinstance(e, pa.ArrowInvalid) else None
        raise formats.cannot_read(path, source.format, line or e) from None


def plan_shards(source: Source, rows_per_shard: int) -> list[ShardSpec]:
    kind = formats.get(source.format)
    first = source.files[0]
    step = kind.shard_step(first.path, first.size, rows_per_shard)
    specs: list[ShardSpec] = []
    for f in source.files:
        for a, b in kind.ranges(f.path, f.size, f.rows, step):
            specs.append(ShardSpec(len(specs), f.path, source.format, a, b))
    return specs


def read_shard(spec: ShardSpec, columns: list[str] | None = None) -> pa.Table:
    """The shard's rows (only ``columns``, when given), in input order."""
    fs, path = resolve(spec.path)
    try:
        table = formats.get(spec.format).read_range(fs, path, spec.start, spec.stop, columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise formats.cannot_read(spec.path, spec.format, e) from None
    if columns:
        missing = [c for c in columns if c not in table.column_names]
        if missing and spec.format != "jsonl":
            # A file's own schema lacks them (a jsonl row may leave a key out: a null there). The
            # driver checked the first file's; this one's rows were read as nulls, every one a
            # "bad row" that the default bad_rows: skip dropped without a word.
            raise DataError(
                f"{spec.path}: has no column(s) {missing}; every file of "
                "the input needs the configured columns (fix or move that file, or set the column names)"
            )
        table = table.select([c for c in columns if c in table.column_names])
    return table
