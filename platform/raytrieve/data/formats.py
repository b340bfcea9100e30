"""The corpus and training input formats, and the one table of them.

Each format is one ``InputFormat`` subclass (the contract: input_format.py) that says
everything format-specific: its file name suffixes, which files of a folder belong to it, how
to cut a file into shards from metadata alone (``shard_step`` and ``ranges``: rows where
metadata counts them, bytes where it does not), how to read one shard with chosen columns, its
column names, and how a training job lists pieces and streams them. ``FORMATS`` maps each name
to its instance; sources.py (encoding), train_source.py (training) and validate.py (checks)
look formats up there and never compare names. A new format is one subclass plus
``register(Subclass())`` here: the configs' ``format`` values are the table's names when the
config classes are defined (tests/test_formats.py checks), so a format registered later is
refused by configs.

No Ray and no torch here: Ray Data tasks unpickle these classes. The four built-in formats
share this one file so that adding a format stays a change to one file.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from raytrieve.data.files import lines_in_range, next_line_start, open_arrow, read_bytes, resolve
from raytrieve.data.input_format import InputFormat
from raytrieve.data.input_format import cannot_read as cannot_read  # the readers raise formats.cannot_read
from raytrieve.errors import DataError

# Bytes read from the first line-format file to estimate the line length the byte ranges use.
PROBE_BYTES = 1 << 20
BATCH_ROWS = 65_536  # rows per streamed parquet record batch (training): bounds the reader's memory
STREAM_BLOCK = 8 << 20  # bytes per block of the streaming jsonl/csv readers (training)


class ParquetFormat(InputFormat):
    name = "parquet"
    suffixes = (".parquet", ".pq")

    def row_count(self, fs: pafs.FileSystem, path: str) -> int | None:
        import pyarrow.parquet as pq

        with fs.open_input_file(path) as f:
            return int(pq.ParquetFile(f).metadata.num_rows)

    def read_range(self, fs: pafs.FileSystem, path: str, start: int, stop: int, columns: list[str] | None) -> pa.Table:
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

    def head_schema(self, fs: pafs.FileSystem, path: str, size: int) -> pa.Schema:
        import pyarrow.parquet as pq

        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).schema_arrow

    def pieces(self, files: Sequence[str], piece_rows: int) -> tuple[pa.Schema, list[tuple[str, int, tuple[int, ...]]]]:
        import pyarrow.parquet as pq

        pieces, schema = [], None
        for f in files:
            fs, path = resolve(f)
            try:
                with fs.open_input_file(path) as source:
                    meta = pq.ParquetFile(source).metadata
            except pa.ArrowInvalid as e:  # named here: the caller knows the folder, not which of its files
                raise cannot_read(f, self.name, e) from None
            if schema is None:
                schema = meta.schema.to_arrow_schema()
            else:  # the first file's schema stands for all: the others must agree with it
                _check_same_columns(schema, meta.schema.to_arrow_schema(), files[0], f)
            groups: list[int] = []
            rows = 0
            for g in range(meta.num_row_groups):
                groups.append(g)
                rows += meta.row_group(g).num_rows
                if rows >= piece_rows or g == meta.num_row_groups - 1:
                    pieces.append((f, rows, tuple(groups)))
                    groups, rows = [], 0
        return schema or pa.schema([]), pieces

    def iter_piece(self, path: str, row_groups: tuple[int, ...], columns: list[str]) -> Iterator[pa.RecordBatch]:
        import pyarrow.parquet as pq

        # Measured on 1M rows: pre-buffering and reader threads keep buffers that grow the
        # reader's resident memory with the file (~60 MB per million short rows); without
        # them it stays flat (see data/validate.py, which also returns freed pool memory).
        fs, inner = resolve(path)
        with fs.open_input_file(inner) as source:
            reader = pq.ParquetFile(source, pre_buffer=False, buffer_size=1 << 20)
            yield from reader.iter_batches(BATCH_ROWS, row_groups=list(row_groups), columns=columns, use_threads=False)

    def read_all(self, location: str) -> pa.Table:
        import pyarrow.parquet as pq

        fs, path = resolve(location)
        return pq.read_table(path, filesystem=fs)


class HfFormat(InputFormat):
    """A folder saved by ``datasets``' ``save_to_disk`` (or one of its arrow files)."""

    name = "hf"
    suffixes = (".arrow",)
    # dataset_dict.json: a DatasetDict, which folder_files refuses, naming its splits
    folder_markers = ("state.json", "dataset_info.json", "dataset_dict.json")

    def folder_files(self, fs: pafs.FileSystem, path: str) -> list[str]:
        state, splits = f"{path}/state.json", f"{path}/dataset_dict.json"
        if fs.get_file_info(state).type == pafs.FileType.NotFound:
            if fs.get_file_info(splits).type == pafs.FileType.File:
                with fs.open_input_stream(splits) as f:
                    names = json.loads(f.read()).get("splits", [])
                raise DataError(f"{path}: a DatasetDict (splits {names}); point at one split's folder ({path}/SPLIT)")
            raise DataError(
                f"{path}: no state.json; save the dataset with datasets' save_to_disk (a DatasetDict: "
                "point at one split's folder)"
            )
        with fs.open_input_stream(state) as f:
            saved = json.loads(f.read())
        if saved.get("_indices_data_files"):  # rows selected or shuffled by an indices file, not in the data's order
            raise DataError(
                f"{path}: saved with an indices mapping (a select or shuffle kept as an index); save it again with "
                "save_to_disk from datasets >= 2.6, or call flatten_indices() before saving"
            )
        return [f"{path}/{entry['filename']}" for entry in saved.get("_data_files", [])]

    def row_count(self, fs: pafs.FileSystem, path: str) -> int | None:
        # Record batch headers only: with a memory map the bodies are never paged in.
        with open_arrow(fs, path) as reader:
            return sum(batch.num_rows for batch in reader)

    def read_range(self, fs: pafs.FileSystem, path: str, start: int, stop: int, columns: list[str] | None) -> pa.Table:
        parts, offset = [], 0
        with open_arrow(fs, path) as reader:
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

    def head_schema(self, fs: pafs.FileSystem, path: str, size: int) -> pa.Schema:
        return self._schema(fs, path)

    @staticmethod
    def _schema(fs: pafs.FileSystem, path: str) -> pa.Schema:
        with open_arrow(fs, path) as reader:
            return reader.schema if hasattr(reader, "schema") else next(iter(reader)).schema

    def pieces(self, files: Sequence[str], piece_rows: int) -> tuple[pa.Schema, list[tuple[str, int, tuple[int, ...]]]]:
        pieces, schema = [], None
        for f in files:
            fs, path = resolve(f)
            schema = schema or self._schema(fs, path)
            # Counting a stream's rows reads all of it but where it is memory-mapped: a remote
            # file is counted by the driver's scan instead, which reads it anyway.
            local = isinstance(fs, pafs.LocalFileSystem)
            pieces.append((f, (self.row_count(fs, path) or 0) if local else -1, ()))
        return schema or pa.schema([]), pieces

    def iter_piece(self, path: str, row_groups: tuple[int, ...], columns: list[str]) -> Iterator[pa.RecordBatch]:
        with open_arrow(*resolve(path)) as reader:
            for batch in reader:
                yield batch.select(columns)

    def read_all(self, location: str) -> pa.Table:
        # Read by our own reader rather than datasets.load_from_disk, which opens only the
        # filesystems fsspec has a package for: this one opens whatever files.resolve does.
        fs, path = resolve(location)
        folder = fs.get_file_info(path).type == pafs.FileType.Directory
        tables = []
        for f in self.folder_files(fs, path) if folder else [path]:
            with open_arrow(fs, f) as reader:
                batches = list(reader)
                # A file without batches has its schema still (a stream reader holds it; the
                # file format's generator does not: read it again then, rare).
                schema = getattr(reader, "schema", None) or (batches[0].schema if batches else self._schema(fs, f))
                tables.append(pa.Table.from_batches(batches, schema=schema))
        return pa.concat_tables(tables) if tables else pa.table({})


class LineFormat(InputFormat):
    """One record per line. Shards are byte ranges of about ``rows_per_shard`` lines (the line
    length measured on the first MiB of the first file); a shard owns the lines that *start*
    inside its range, so no line is read twice or lost."""

    def shard_step(self, first_uri: str, first_size: int, rows_per_shard: int) -> int:
        fs, path = resolve(first_uri)
        head = read_bytes(fs, path, 0, min(first_size, PROBE_BYTES))
        return max(1, rows_per_shard * max(1, len(head) // max(1, head.count(b"\n"))))

    def data_start(self, uri: str, size: int) -> int:
        """The first byte of the rows (after any header)."""
        return 0

    def ranges(self, uri: str, size: int, rows: int | None, step: int) -> Iterator[tuple[int, int]]:
        for a in range(self.data_start(uri, size), size, step):
            yield a, min(a + step, size)

    def parse(self, body: bytes, header: bytes, columns: list[str] | None = None) -> pa.Table:
        raise NotImplementedError

    def open_stream(self, source: pa.NativeFile, columns: list[str] | None, textual: Sequence[pa.Field] = ()) -> Any:
        """A streaming reader (``.schema``, iterates record batches) over a whole open file, the
        ``textual`` columns read with their types (text where values look like dates)."""
        raise NotImplementedError

    def stream(self, location: str, columns: list[str] | None) -> Any:
        """``open_stream`` over the file at ``location`` (a local path or URI), or None when it is
        empty. The reader owns the file: its read-ahead may still be reading when a caller
        stops early, so the file closes with the reader, never under it. A stream is typed by
        its first block: a column of date-shaped strings there (ids like "2020-01-01") would be
        dates, and a later value that is no date would fail the read; such columns are opened
        again as text."""
        fs, path = resolve(location)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{location}: not found")
        if not info.size:
            return None
        reader = self.open_stream(fs.open_input_stream(path), columns)  # decompressed by suffix
        dated = _dated(reader.schema)
        if not dated:
            return reader
        reader.close()
        return self.open_stream(fs.open_input_stream(path), columns, dated)

    def read_range(self, fs: pafs.FileSystem, path: str, start: int, stop: int, columns: list[str] | None) -> pa.Table:
        return self.parse(lines_in_range(fs, path, start, stop), b"", columns)

    def head_schema(self, fs: pafs.FileSystem, path: str, size: int) -> pa.Schema:
        head = read_bytes(fs, path, 0, min(size, PROBE_BYTES))
        lines = head.split(b"\n")
        body = b"\n".join(x for x in lines[:-1] if x.strip()) if len(lines) > 1 else head
        return self.parse(body, b"").schema if body.strip() else pa.schema([])

    def pieces(self, files: Sequence[str], piece_rows: int) -> tuple[pa.Schema, list[tuple[str, int, tuple[int, ...]]]]:
        # Whole files, counted by the driver's scan: lines cannot be counted from metadata.
        schema = pa.schema([])
        for f in files:
            reader = self.stream(f, None)
            if reader is not None:
                schema = reader.schema
                reader.close()
                break
        return schema, [(f, -1, ()) for f in files]

    def iter_piece(self, path: str, row_groups: tuple[int, ...], columns: list[str]) -> Iterator[pa.RecordBatch]:
        for batch in self.stream(path, columns) or ():
            yield batch.select(columns)


def _as_text(t: pa.DataType) -> pa.DataType:
    """``t`` with every date, time or timestamp in it (a list's items, a struct's fields) text."""
    if pa.types.is_temporal(t):
        return pa.string()
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        item = _as_text(t.value_type)
        return pa.list_(item) if pa.types.is_list(t) else pa.large_list(item)
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(_as_text(t.field(i).type)) for i in range(t.num_fields)])
    return t


def _dated(schema: pa.Schema) -> list[pa.Field]:
    """The columns a reader typed with dates, times or timestamps (at the top, or in a list's
    items or a struct's fields), typed as text: in JSON and csv such values are strings that
    look like dates, and ids, titles or a list of documents can."""
    return [f.with_type(_as_text(f.type)) for f in schema if _as_text(f.type) != f.type]


def _dates_as_text(read: Callable[[Sequence[pa.Field]], pa.Table]) -> pa.Table:
    """``read(textual)``'s table: a whole read (one read unifies its blocks' types), read again
    with the ``textual`` columns' types where it typed some with dates (a file of date-shaped
    ids alone)."""
    table = read(())
    dated = _dated(table.schema)
    return read(dated) if dated else table


def _json_options(textual: Sequence[pa.Field]) -> Any:
    """pyarrow.json's parse options reading the ``textual`` columns with their types (JSON has
    no date type: pyarrow infers timestamps from strings shaped like dates)."""
    import pyarrow.json as pj

    return pj.ParseOptions(explicit_schema=pa.schema(list(textual)), unexpected_field_behavior="infer")


class JsonlFormat(LineFormat):
    name = "jsonl"
    suffixes = (".jsonl", ".json", ".ndjson")

    def parse(self, body: bytes, header: bytes, columns: list[str] | None = None) -> pa.Table:

        import pyarrow.json as pj

        if not body.strip():
            return pa.table({})
        return _dates_as_text(lambda textual: pj.read_json(io.BytesIO(body), parse_options=_json_options(textual)))

    def open_stream(self, source: pa.NativeFile, columns: list[str] | None, textual: Sequence[pa.Field] = ()) -> Any:
        import pyarrow.json as pj

        return pj.open_json(
            source, read_options=pj.ReadOptions(block_size=STREAM_BLOCK), parse_options=_json_options(textual)
        )

    def read_range(self, fs: pafs.FileSystem, path: str, start: int, stop: int, columns: list[str] | None) -> pa.Table:
        body = lines_in_range(fs, path, start, stop)
        try:
            return self.parse(body, b"", columns)
        except pa.ArrowInvalid as e:
            # pyarrow numbers the failing row from 0 within this range: name the file's line.
            where = bad_line(fs, path, start, body)
            raise pa.ArrowInvalid(where or str(e)) from None

    def read_all(self, location: str) -> pa.Table:
        import pyarrow.json as pj

        fs, path = whole_file(location)
        if not fs.get_file_info(path).size:
            return pa.table({})

        def read(textual: Sequence[pa.Field]) -> pa.Table:
            with fs.open_input_stream(path) as f:  # decompressed by the name's suffix, as pyarrow's own reader does
                return pj.read_json(f, parse_options=_json_options(textual))

        return _dates_as_text(read)


# How far into a file an error's line is numbered (the bytes before it are read to count lines);
# past it, the error gives the line's byte offset instead. And how much of a whole file is
# searched for the bad line where no range is given (a training file streamed whole).
COUNT_LINES_UP_TO = 1 << 28
SEARCH_BYTES = 1 << 26


def bad_line(fs: pafs.FileSystem, path: str, start: int = 0, body: bytes | None = None) -> str | None:
    """Where the first line of a jsonl file that is not one JSON object is, and why, as "line N
    (counted from 1) is ...": among the lines ``body`` holds (those starting at or after byte
    ``start``), else among the file's first ``SEARCH_BYTES``. None when every line parses
    (pyarrow's own reason stands then: e.g. a value changing type between lines)."""
    with fs.open_input_file(path) as f:
        offset = next_line_start(f, start)
        assert offset is not None  # without a stop: the file's end at the latest
        if body is None:
            f.seek(offset)
            head = f.read(SEARCH_BYTES)
            lines = head.split(b"\n")
            if len(head) == SEARCH_BYTES and not head.endswith(b"\n"):
                lines.pop()  # cut off by the read, not a line of the file
        else:
            lines = body.split(b"\n")
        found = next(((i, why) for i, line in enumerate(lines) if (why := _not_an_object(line)) is not None), None)
        if found is None:
            return None
        index, why = found
        at = offset + sum(len(line) + 1 for line in lines[:index])
        if at > COUNT_LINES_UP_TO:
            return f"the line at byte {at} is {why}"
        f.seek(0)
        before = sum(f.read(min(1 << 23, at - done)).count(b"\n") for done in range(0, at, 1 << 23))
    return f"line {before + 1} is {why}"


def _not_an_object(line: bytes) -> str | None:
    if not line.strip():
        return None
    try:
        value = json.loads(line)
    except ValueError as e:
        return f"not JSON ({e})"
    return None if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object"


class CsvFormat(LineFormat):
    """Comma-separated values with a header line, which every shard repeats. As with pyarrow's
    own csv reader, a value must not hold a newline."""

    name = "csv"
    suffixes = (".csv",)
    delimiter = ","

    def data_start(self, uri: str, size: int) -> int:
        fs, path = resolve(uri)
        end = read_bytes(fs, path, 0, min(size, PROBE_BYTES)).find(b"\n")
        return size if end < 0 else end + 1

    def parse(self, body: bytes, header: bytes, columns: list[str] | None = None) -> pa.Table:
        import pyarrow.csv as pcsv

        # Each byte range is parsed alone: types guessed per shard would differ between shards
        # and turn ids like "00123" into 123, so the columns asked for are read as text.
        types = {c: pa.string() for c in columns or []}
        return pcsv.read_csv(
            io.BytesIO(header + body),
            parse_options=pcsv.ParseOptions(delimiter=self.delimiter),
            convert_options=pcsv.ConvertOptions(column_types=types),
        )

    def read_range(self, fs: pafs.FileSystem, path: str, start: int, stop: int, columns: list[str] | None) -> pa.Table:
        body = lines_in_range(fs, path, start, stop)
        header = read_bytes(fs, path, 0, min(start, PROBE_BYTES)).split(b"\n", 1)[0] + b"\n"
        if not body.strip():
            return self.parse(b"", header).select(columns) if columns else pa.table({})
        return self.parse(body, header, columns)

    def head_schema(self, fs: pafs.FileSystem, path: str, size: int) -> pa.Schema:
        head = read_bytes(fs, path, 0, min(size, PROBE_BYTES))
        return self.parse(head.split(b"\n")[0] + b"\n", b"").schema

    def open_stream(self, source: pa.NativeFile, columns: list[str] | None, textual: Sequence[pa.Field] = ()) -> Any:
        import pyarrow.csv as pc

        return pc.open_csv(
            source,
            read_options=pc.ReadOptions(block_size=STREAM_BLOCK),
            parse_options=pc.ParseOptions(delimiter=self.delimiter),
            convert_options=pc.ConvertOptions(
                include_columns=list(columns) if columns else None, column_types={c.name: c.type for c in textual}
            ),
        )

    def read_all(self, location: str) -> pa.Table:
        import pyarrow.csv as pc

        fs, path = whole_file(location)
        if not fs.get_file_info(path).size:
            return pa.table({})

        def read(textual: Sequence[pa.Field]) -> pa.Table:
            with fs.open_input_stream(path) as f:
                return pc.read_csv(
                    f,
                    parse_options=pc.ParseOptions(delimiter=self.delimiter),
                    convert_options=pc.ConvertOptions(column_types={c.name: c.type for c in textual}),
                )

        return _dates_as_text(read)


# The table: format name -> format, in the order folders are matched by suffix.
FORMATS: dict[str, InputFormat] = {}


def register(fmt: InputFormat) -> InputFormat:
    if not fmt.name or not fmt.suffixes:
        raise ValueError(f"{type(fmt).__name__}: set name and suffixes before registering it")
    FORMATS[fmt.name] = fmt
    return fmt


def unregister(name: str) -> None:
    FORMATS.pop(name, None)


for _fmt in (ParquetFormat(), JsonlFormat(), CsvFormat(), HfFormat()):
    register(_fmt)


def choices() -> str:
    """The format names as the ``format:`` key's fix spells them."""
    return " | ".join(FORMATS)


def get(name: str, where: str = "") -> InputFormat:
    fmt = FORMATS.get(name)
    if fmt is None:
        raise DataError(f"{where or name}: unknown format {name!r}; set format: {choices()}")
    return fmt


def whole_file(location: str) -> tuple[pafs.FileSystem, str]:
    """``resolve(location)`` for a format read whole from one file (eval sets, mining's pairs): a
    folder is refused, naming the fix (its size would read as an empty file's)."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        raise DataError(f"{location}: a folder; name one file of it (this file is read whole)")
    return fs, path


def by_suffix(path: str) -> InputFormat | None:
    name = Path(path).name.lower()
    return next((f for f in FORMATS.values() if name.endswith(f.suffixes)), None)


def infer_format(
    location: str, fs: pafs.FileSystem | None = None, path: str | None = None, fix: str | None = None
) -> str:
    """The format of a file or folder, from its name (or a folder's marker files, such as an
    HF dataset's state.json). ``fix``: the advice for a name that tells none (default: the
    ``format:`` key, for a config that has one)."""
    if fs is None or path is None:
        fs, path = resolve(location)
    # resolve() gives a filesystem; pyarrow is untyped, so the assignment does not narrow.
    assert fs is not None
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        names = {Path(i.path).name for i in fs.get_file_info(pafs.FileSelector(path))}
        for fmt in FORMATS.values():
            if names & set(fmt.folder_markers):
                return fmt.name
        for fmt in FORMATS.values():
            if any(n.endswith(fmt.suffixes) for n in names):
                return fmt.name
        raise DataError(f"{location}: a folder with no {choices()} files and no saved Hugging Face dataset")
    fmt = by_suffix(path)
    if fmt is None:
        raise DataError(f"{location}: cannot tell the format from the name; {fix or f'set format: {choices()}'}")
    return fmt.name


def is_text(t: pa.DataType) -> bool:
    """A string column (either of Arrow's two string types)."""
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def type_class(t: pa.DataType) -> str:
    """A column type, coarsely: what the data checks and the tokenizer care about."""
    if is_text(t):
        return "text"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list of {type_class(t.value_type)}"
    return str(t)


def _check_same_columns(first: pa.Schema, other: pa.Schema, first_file: str, other_file: str) -> None:
    """A parquet folder's files share the first file's columns and their kinds of type; one that
    lacks a column, or holds numbers where the first holds text, failed in the read tasks."""
    missing = [n for n in first.names if n not in other.names]
    if missing:
        raise DataError(
            f"{other_file}: has no column(s) {missing} that {first_file} has; every file of the folder needs the same "
            "columns (fix or move that file)"
        )
    for name in first.names:
        check_column_type(name, first.field(name).type, other.field(name).type, other_file, first_file)


def check_column_type(column: str, want: pa.DataType, got: pa.DataType, file: str, first_file: str) -> None:
    """A folder's files hold one kind of value per column: ``file``'s ``got`` against the type
    the first file set, or a DataError naming the file, the column and both kinds."""
    a, b = type_class(want), type_class(got)
    if a != b:
        raise DataError(
            f"{file}: column {column!r} holds {b}, {first_file} holds {a}; every file of the folder needs the "
            "same column types (fix or move that file)"
        )
