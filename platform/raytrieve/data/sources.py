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
No Ray here: the planner and reader are plain functions the Ray stages call.
"""

from __future__ import annotations

import functools
import glob as globlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from raytrieve.errors import DataError

FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".arrow": "hf",
}
# Bytes read from the first jsonl/csv file to estimate the line length the byte ranges use.
PROBE_BYTES = 1 << 20


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


def is_uri(location: str) -> bool:
    return "://" in location


@functools.lru_cache(maxsize=16)
def _filesystem_for(scheme_and_host: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(scheme_and_host)[0]


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a URI or a local path."""
    if is_uri(location):
        try:
            fs, path = pafs.FileSystem.from_uri(location)
        except (pa.ArrowInvalid, OSError, ValueError) as e:
            raise DataError(
                f"{location}: pyarrow cannot open this URI ({e}); check the scheme and credentials"
            ) from None
        return fs, path
    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def infer_format(location: str, fs: pafs.FileSystem | None = None, path: str | None = None) -> str:
    """The format of a file or folder, from its name (or an HF dataset's state.json)."""
    if fs is None or path is None:
        fs, path = resolve(location)
    # resolve() gives a filesystem; pyarrow is untyped, so the assignment does not narrow.
    assert fs is not None
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        names = {Path(i.path).name for i in fs.get_file_info(pafs.FileSelector(path))}
        if "state.json" in names or "dataset_info.json" in names:
            return "hf"
        for suffix, fmt in FORMATS.items():
            if any(n.endswith(suffix) for n in names):
                return fmt
        raise DataError(f"{location}: a folder with no parquet, jsonl or csv files and no saved Hugging Face dataset")
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise DataError(f"{location}: cannot tell the format from the name; set format: parquet | jsonl | csv | hf")
    return fmt


def _list_files(location: str, fs: pafs.FileSystem, path: str, fmt: str) -> list[str]:
    if any(ch in path for ch in "*?["):
        if isinstance(fs, pafs.LocalFileSystem):
            return sorted(globlib.glob(path))
        base = path[: min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
        selector = pafs.FileSelector(base, recursive=True)
        import fnmatch

        return sorted(i.path for i in fs.get_file_info(selector) if fnmatch.fnmatch(i.path, path))
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{location}: file not found; point it at a parquet, jsonl or csv file, a folder or a glob")
    if info.type == pafs.FileType.File:
        return [path]
    if fmt == "hf":
        state = f"{path}/state.json"
        with fs.open_input_stream(state) as f:
            files = [entry["filename"] for entry in json.loads(f.read())["_data_files"]]
        return [f"{path}/{name}" for name in files]
    suffixes = [s for s, f in FORMATS.items() if f == fmt]
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(
        i.path
        for i in entries
        if i.type == pafs.FileType.File
        and any(i.path.endswith(s) for s in suffixes)
        and not Path(i.path).name.startswith((".", "_"))
    )


def _with_scheme(location: str, path: str) -> str:
    """A path inside ``location``'s filesystem, as something ``resolve`` opens again anywhere."""
    if not is_uri(location):
        return path
    scheme = location.split("://", 1)[0]
    return f"{scheme}://{path}" if scheme != "file" else f"file://{path}"


def open_source(location: str, fmt: str | None = None, field: str = "path") -> Source:
    """List the input's files with their sizes and (where metadata has them) row counts.
    ``field`` names the config key in errors."""
    fs, path = resolve(location)
    if not any(ch in path for ch in "*?[") and fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise DataError(
            f"{field} {location}: file not found; point it at a parquet, jsonl or csv file, a folder or a glob"
        )
    fmt = fmt or (
        infer_format(location, fs, path)
        if not any(ch in path for ch in "*?[")
        else FORMATS.get(Path(path).suffix.lower()) or "parquet"
    )
    files = []
    for p in _list_files(location, fs, path, fmt):
        info = fs.get_file_info(p)
        files.append(SourceFile(_with_scheme(location, p), int(info.size or 0), _row_count(fs, p, fmt)))
    if not files:
        raise DataError(f"{field} {location}: no {fmt} files there")
    return Source(location, fmt, tuple(files))


def _row_count(fs: pafs.FileSystem, path: str, fmt: str) -> int | None:
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            with fs.open_input_file(path) as f:
                return int(pq.ParquetFile(f).metadata.num_rows)
        if fmt == "hf":
            # Record batch headers only: with a memory map the bodies are never paged in.
            with _open_arrow(fs, path) as reader:
                return sum(batch.num_rows for batch in reader)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: cannot read it as {fmt} ({e}); check the file or set format:") from None
    return None


class _open_arrow:
    """The record batches of an HF ``datasets`` arrow file (IPC stream, or file format)."""

    def __init__(self, fs: pafs.FileSystem, path: str) -> None:
        self.source = pa.memory_map(path) if isinstance(fs, pafs.LocalFileSystem) else fs.open_input_file(path)

    def __enter__(self) -> Any:  # a RecordBatchStreamReader, or a generator of record batches
        try:
            return pa.ipc.open_stream(self.source)
        except pa.ArrowInvalid:
            self.source.seek(0)
            reader = pa.ipc.open_file(self.source)
            return (reader.get_batch(i) for i in range(reader.num_record_batches))

    def __exit__(self, *exc: object) -> None:
        self.source.close()


def schema_names(source: Source) -> list[str]:
    """Column names of the first file (metadata or the first lines): checked before any work."""
    first = source.files[0]
    fs, path = resolve(first.path)
    try:
        if source.format == "parquet":
            import pyarrow.parquet as pq

            with fs.open_input_file(path) as f:
                return list(pq.ParquetFile(f).schema_arrow.names)
        if source.format == "hf":
            with _open_arrow(fs, path) as reader:
                return list(reader.schema.names) if hasattr(reader, "schema") else list(next(iter(reader)).schema.names)
        head = _read_bytes(fs, path, 0, min(first.size, PROBE_BYTES))
        lines = head.split(b"\n")
        if source.format == "csv":
            return _parse_lines(lines[0] + b"\n", b"", "csv", path).column_names
        body = b"\n".join(x for x in lines[:-1] if x.strip()) if len(lines) > 1 else head
        return _parse_lines(body, b"", "jsonl", path).column_names if body.strip() else []
    except (pa.ArrowInvalid, OSError, StopIteration) as e:
        raise DataError(f"{path}: cannot read it as {source.format} ({e}); check the file or set format:") from None


def plan_shards(source: Source, rows_per_shard: int) -> list[ShardSpec]:
    specs: list[ShardSpec] = []
    if source.format in ("parquet", "hf"):
        for f in source.files:
            rows = f.rows or 0
            for a in range(0, rows, rows_per_shard):
                specs.append(ShardSpec(len(specs), f.path, source.format, a, min(a + rows_per_shard, rows)))
        return specs
    step = max(1, rows_per_shard * _bytes_per_line(source))
    for f in source.files:
        start = _header_bytes(f) if source.format == "csv" else 0
        for a in range(start, f.size, step):
            specs.append(ShardSpec(len(specs), f.path, source.format, a, min(a + step, f.size)))
    return specs


def _bytes_per_line(source: Source) -> int:
    first = source.files[0]
    fs, path = resolve(first.path)
    head = _read_bytes(fs, path, 0, min(first.size, PROBE_BYTES))
    return max(1, len(head) // max(1, head.count(b"\n")))


def _header_bytes(f: SourceFile) -> int:
    fs, path = resolve(f.path)
    head = _read_bytes(fs, path, 0, min(f.size, PROBE_BYTES))
    end = head.find(b"\n")
    return f.size if end < 0 else end + 1


def _read_bytes(fs: pafs.FileSystem, path: str, start: int, length: int) -> bytes:
    with fs.open_input_file(path) as f:
        return f.read_at(length, start) if length > 0 else b""


def _lines_in_range(fs: pafs.FileSystem, path: str, start: int, stop: int) -> bytes:
    """The lines that start in ``[start, stop)``, whole (the last may run past ``stop``)."""
    with fs.open_input_file(path) as f:
        size = f.size()
        begin = start
        if start > 0:  # a line starts at ``start`` only if the byte before it ends a line
            f.seek(start - 1)
            data = f.read(stop - start + 1)
            first_break = data.find(b"\n")
            if first_break < 0:
                return b""
            body = data[first_break + 1 :]
            begin = start + first_break
        else:
            f.seek(0)
            body = f.read(stop)
        if begin >= stop:
            return b""
        tail = []
        if body and not body.endswith(b"\n") and stop < size:
            while True:  # finish the line that crosses ``stop``
                chunk = f.read(1 << 16)
                if not chunk:
                    break
                cut = chunk.find(b"\n")
                if cut >= 0:
                    tail.append(chunk[: cut + 1])
                    break
                tail.append(chunk)
        return body + b"".join(tail)


def _parse_lines(body: bytes, header: bytes, fmt: str, path: str, columns: list[str] | None = None) -> pa.Table:
    if fmt == "csv":
        import pyarrow.csv as pcsv

        # Each byte range is parsed alone: types guessed per shard would differ between shards
        # and turn ids like "00123" into 123, so the columns asked for are read as text.
        types = {c: pa.string() for c in columns or []}
        return pcsv.read_csv(io.BytesIO(header + body), convert_options=pcsv.ConvertOptions(column_types=types))
    import pyarrow.json as pj

    if not body.strip():
        return pa.table({})
    return pj.read_json(io.BytesIO(body))


def read_shard(spec: ShardSpec, columns: list[str] | None = None) -> pa.Table:
    """The shard's rows (only ``columns``, when given), in input order."""
    fs, path = resolve(spec.path)
    try:
        if spec.format == "parquet":
            return _read_parquet_rows(fs, path, spec.start, spec.stop, columns)
        if spec.format == "hf":
            return _read_arrow_rows(fs, path, spec.start, spec.stop, columns)
        body = _lines_in_range(fs, path, spec.start, spec.stop)
        header = b""
        if spec.format == "csv":
            header = _read_bytes(fs, path, 0, min(spec.start, PROBE_BYTES)).split(b"\n", 1)[0] + b"\n"
            if not body.strip():
                return _parse_lines(b"", header, "csv", path).select(columns) if columns else pa.table({})
        table = _parse_lines(body, header, spec.format, path, columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{spec.path}: cannot read it as {spec.format} ({e}); check the file or set format:") from None
    if columns:
        table = table.select([c for c in columns if c in table.column_names])
    return table


def _read_parquet_rows(fs: pafs.FileSystem, path: str, start: int, stop: int, columns: list[str] | None) -> pa.Table:
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        groups, offset, first = [], 0, None
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset < stop and offset + n > start:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        if not groups:
            return pf.schema_arrow.empty_table().select(columns) if columns else pf.schema_arrow.empty_table()
        table = pf.read_row_groups(groups, columns=columns)
    return table.slice(start - (first or 0), stop - start)


def _read_arrow_rows(fs: pafs.FileSystem, path: str, start: int, stop: int, columns: list[str] | None) -> pa.Table:
    parts, offset = [], 0
    with _open_arrow(fs, path) as reader:
        for batch in reader:
            n = batch.num_rows
            if offset + n > start and offset < stop:
                a, b = max(start - offset, 0), min(stop - offset, n)
                part = batch.slice(a, b - a)
                parts.append(part.select(columns) if columns else part)
            offset += n
            if offset >= stop:
                break
    # The memory map closes on exit: copy the (small) shard out of it first.
    return pa.Table.from_batches(parts).combine_chunks() if parts else pa.table({})
