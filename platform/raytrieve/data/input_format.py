"""The contract every input format implements (data/formats.py has the built-in ones and the
table of them), and the one error for a file a format cannot parse. No Ray, no torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from raytrieve.data.files import resolve
from raytrieve.errors import DataError


def cannot_read(
    path: object,
    fmt: str,
    e: Exception | str,
    fix: str = "check the file, or set the format: key if it is of another format",
) -> DataError:
    """The one error for a file that ``fmt`` cannot parse: the file, the format, the reader's reason, the fix."""
    return DataError(f"{path}: cannot read it as {fmt} ({e}); {fix}")


class InputFormat:
    """One input format. Paths are inside ``fs`` (see files.resolve); ``uri``s resolve anywhere."""

    name: str = ""
    suffixes: tuple[str, ...] = ()
    folder_markers: tuple[str, ...] = ()  # file names that make a folder this format as a whole

    def folder_files(self, fs: pafs.FileSystem, path: str) -> list[str]:
        """The format's files under a folder, in a stable order (hidden and ``_`` files skipped)."""
        entries = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return sorted(
            i.path
            for i in entries
            if i.type == pafs.FileType.File
            and i.path.endswith(self.suffixes)
            and not Path(i.path).name.startswith((".", "_"))
        )

    def row_count(self, fs: pafs.FileSystem, path: str) -> int | None:
        """Rows from metadata, or None where only reading the data would tell."""
        return None

    def shard_step(self, first_uri: str, first_size: int, rows_per_shard: int) -> int:
        """Shard length in this format's unit (rows unless ``ranges`` counts otherwise)."""
        return rows_per_shard

    def ranges(self, uri: str, size: int, rows: int | None, step: int) -> Iterator[tuple[int, int]]:
        """``[start, stop)`` of each shard of one file; metadata only."""
        total = rows or 0
        for a in range(0, total, step):
            yield a, min(a + step, total)

    def read_range(self, fs: pafs.FileSystem, path: str, start: int, stop: int, columns: list[str] | None) -> pa.Table:
        raise NotImplementedError

    def head_schema(self, fs: pafs.FileSystem, path: str, size: int) -> pa.Schema:
        """The file's columns and their types: from its metadata, or as its first lines parse
        (a csv's header alone: no types)."""
        raise NotImplementedError

    def pieces(self, files: Sequence[str], piece_rows: int) -> tuple[pa.Schema, list[tuple[str, int, tuple[int, ...]]]]:
        """Training: the schema and (path, rows or -1, row groups) per piece, from metadata."""
        raise NotImplementedError

    def iter_piece(self, path: str, row_groups: tuple[int, ...], columns: list[str]) -> Iterator[pa.RecordBatch]:
        """Training: one piece's rows, only ``columns``, in bounded record batches."""
        raise NotImplementedError

    def read_all(self, location: str) -> pa.Table:
        """The whole (small) dataset at a local path or URI: eval sets, mining's pairs. By default
        one shard spanning the file."""
        fs, local = resolve(location)
        size, rows = int(fs.get_file_info(local).size or 0), self.row_count(fs, local)
        spans = list(self.ranges(location, size, rows, max(size, rows or 0, 1)))
        return self.read_range(fs, local, *spans[0], None) if spans else pa.table({})
