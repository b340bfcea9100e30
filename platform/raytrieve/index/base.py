"""What every index shares: the result type, the on-disk format, and exact top-k selection.

On disk an index is one directory, written atomically::

    manifest.json   {"format": "raytrieve-index", "version": 1, "kind": ..., "count": n, ...}
    ids.parquet     one string column ``id``, in corpus row order
    <name>.npy      the arrays, memory-mapped on load

Ordering rule of every exact path: score descending, ties broken by the lower corpus row.
"""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raytrieve import _io
from raytrieve.data.formats import is_text
from raytrieve.errors import DataError, InputError, ModelLoadError
from raytrieve.hashing import text_hashes
from raytrieve.kinds import MODEL_KINDS

FORMAT = "raytrieve-index"
VERSION = 1
MANIFEST_FILE = "manifest.json"
IDS_FILE = "ids.parquet"
REBUILD_HINT = "rebuild the index with `raytrieve index build`"
# Index kind (a model kind's vectors) -> "module:Class", from the kind table (raytrieve/kinds.py);
# imported lazily so base never imports its subclasses' modules.
KINDS = {k.vectors: k.index for k in MODEL_KINDS.values() if k.vectors and k.index}


@dataclass
class SearchResult:
    """Per query: ``ids`` (as many as there were hits, at most k), ``scores`` float32 [n_queries, k]
    padded with -inf, ``rows`` int64 corpus rows [n_queries, k] padded with -1."""

    ids: list[list[str]]
    scores: np.ndarray
    rows: np.ndarray


# ---------------------------------------------------------------- validation and ids


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def choice(name: str, value: Any, allowed: Sequence[Any]) -> Any:
    if value not in allowed:
        raise InputError(f"{name}={value!r} is not supported; choose from {list(allowed)}")
    return value


def check_not_empty(count: int) -> None:
    if count == 0:
        raise InputError("the index is empty (0 documents); build it from at least one document")


def _id_text(row: int, id_: Any) -> str:
    """An id as the text a client sends back: bytes decoded (str(b"x") is "b'x'"); a float is
    refused (2.0 would be "2.0", never the "2" of the corpus's integer id)."""
    if isinstance(id_, (bytes, bytearray)):
        try:
            return bytes(id_).decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(
                f"ids: row {row} is bytes that are not UTF-8 ({bytes(id_)[:20]!r}); pass text ids"
            ) from None
    if isinstance(id_, (float, np.floating)):
        raise InputError(f"ids: row {row} is the float {id_!r}; pass ids as text or integers")
    return str(id_)


def normalize_ids(ids: Any, count: int | None = None, what: str = "vectors") -> list[str]:
    """Ids as strings; a count mismatch is an InputError, duplicates or nulls a DataError."""
    if isinstance(ids, (pa.Array, pa.ChunkedArray)):
        ids = ids.to_pylist()
    ids = list(ids)
    if count is not None and len(ids) != count:
        raise InputError(f"ids: got {len(ids)} ids for {count} {what}; pass one id per {what[:-1]}")
    if len(ids) == 0:
        raise InputError("ids: empty; an index needs at least one document")
    if any(i is None for i in ids):
        raise DataError(
            f"ids: null id at row {next(r for r, i in enumerate(ids) if i is None)}; every document needs an id"
        )
    as_str = ids if all(type(i) is str for i in ids) else [_id_text(r, i) for r, i in enumerate(ids)]
    if len(set(as_str)) != len(as_str):
        dups = sorted(i for i, c in Counter(as_str).items() if c > 1)
        raise DataError(f"ids: {len(dups)} duplicate id(s), e.g. {dups[:5]}; ids must be unique in the corpus")
    return as_str


def to_result(scores: np.ndarray, rows: np.ndarray, ids: Ids) -> SearchResult:
    return SearchResult(
        ids=[ids.take(r[r >= 0]) for r in rows],
        scores=scores.astype(np.float32, copy=False),
        rows=rows.astype(np.int64, copy=False),
    )


class Ids(Sequence[str]):
    """An index's document ids in row order, held as one Arrow array: the ids' bytes and 8 bytes
    of offset a row, where a Python list costs 60-100 bytes a row (a loaded index of 100M
    documents holds ~1.5 GB of ids, not ~8 GB, in every Serve replica and mining job). Only the
    hits become Python strings (``take``). Equal to a list of the same strings."""

    def __init__(self, ids: pa.Array | pa.ChunkedArray | Sequence[str]) -> None:
        if isinstance(ids, Ids):
            array: pa.Array | pa.ChunkedArray = ids.array
        elif isinstance(ids, (pa.Array, pa.ChunkedArray)):
            array = ids
        else:
            array = pa.array(list(ids), pa.large_string())
        array = array.cast(pa.large_string())  # 64-bit offsets: more than 2 GB of ids in one array
        self.array: pa.Array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: Any) -> Any:
        return self.array[i].to_pylist() if isinstance(i, slice) else self.array[i].as_py()

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self.array), 1 << 16):
            yield from self.array.slice(start, 1 << 16).to_pylist()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Ids):
            return self.array.equals(other.array)
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and self.to_pylist() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  (mutable-equal like a list)

    def take(self, rows: np.ndarray) -> list[str]:
        """The ids of ``rows`` (int64 row numbers) as Python strings."""
        return self.array.take(pa.array(np.asarray(rows, dtype=np.int64))).to_pylist()

    def to_pylist(self) -> list[str]:
        return self.array.to_pylist()


# ---------------------------------------------------------------- exact top-k


def chunk_top_k(scores: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-k set of each query row of ``scores`` [nq, m], in no particular order.

    ``rows`` [m] must be ascending. argpartition alone may keep a higher row and drop a lower one
    with the same score at the k boundary; instead take everything above the k-th score t, then
    the lowest rows scoring exactly t until k are taken — exactly the top-k under (-score, row).
    """
    nq, m = scores.shape
    if m <= k:
        return scores, np.broadcast_to(rows, (nq, m))
    t = np.partition(scores, m - k, axis=1)[:, m - k : m - k + 1]
    above = scores > t
    tied = scores == t
    need = k - above.sum(axis=1, keepdims=True)
    keep = above | (tied & (np.cumsum(tied, axis=1, dtype=np.int32) <= need))
    cols = np.nonzero(keep)[1].reshape(nq, k)  # exactly k per query by construction
    return np.take_along_axis(scores, cols, axis=1), rows[cols]


def sort_top_k(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort each query's candidates by (-score, row), keep k, pad to k with (-inf, -1).

    Padding entries (-inf, -1) may be among the candidates; real scores are finite, so they sort last.
    """
    nq = scores.shape[0]
    order = np.lexsort((rows, -scores), axis=-1)[:, :k]
    scores = np.take_along_axis(scores, order, axis=1)
    rows = np.take_along_axis(rows, order, axis=1)
    if scores.shape[1] < k:
        pad = k - scores.shape[1]
        scores = np.hstack([scores, np.full((nq, pad), -np.inf, dtype=np.float32)])
        rows = np.hstack([rows, np.full((nq, pad), -1, dtype=np.int64)])
    return scores.astype(np.float32, copy=False), rows.astype(np.int64, copy=False)


def scan_top_k(
    n: int, nq: int, k: int, chunk_size: int, score_chunk: Callable[[int, int], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over n corpus rows scored ``chunk_size`` rows at a time.

    ``score_chunk(start, stop)`` returns float32 scores [nq, stop - start]. The global top-k under
    a total order is contained in the union of each chunk's top-k, so merging is exact.
    """
    best_s = np.empty((nq, 0), dtype=np.float32)
    best_r = np.empty((nq, 0), dtype=np.int64)
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        s, r = chunk_top_k(score_chunk(start, stop), k, np.arange(start, stop, dtype=np.int64))
        best_s, best_r = sort_top_k(np.hstack([best_s, s]), np.hstack([best_r, r]), min(k, stop))
    return sort_top_k(best_s, best_r, k)


def query_batch_size(chunk_size: int, width: int = 1, budget: int = 1 << 23) -> int:
    """Queries per pass so a [queries, chunk, width] temporary stays near ``budget`` elements."""
    return max(1, budget // max(1, chunk_size * width))


# ---------------------------------------------------------------- on-disk format


def write_manifest(directory: Path, kind: str, count: int, **fields: Any) -> None:
    manifest = {"format": FORMAT, "version": VERSION, "kind": kind, "count": count, **fields}
    _io.write_json(directory / MANIFEST_FILE, manifest)


def read_manifest(directory: Path, kind: str | None = None) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise DataError(f"{directory}: no such index directory; build one with `raytrieve index build`")
    try:
        manifest = _io.read_json(path)
    except ModelLoadError as e:
        raise DataError(f"{path}: cannot read the index manifest ({e}); {REBUILD_HINT}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a raytrieve index manifest (format must be {FORMAT!r}); {REBUILD_HINT}")
    if manifest.get("version") != VERSION:
        raise DataError(
            f"{path}: index format version {manifest.get('version')!r}, this raytrieve reads {VERSION}; {REBUILD_HINT}"
        )
    if manifest.get("kind") not in KINDS:
        raise DataError(
            f"{path}: unknown index kind {manifest.get('kind')!r}, expected one of {sorted(KINDS)}; {REBUILD_HINT}"
        )
    if kind is not None and manifest["kind"] != kind:
        raise DataError(
            f"{directory}: is a {manifest['kind']} index, not {kind}; open it with raytrieve.index.load_index"
        )
    count = manifest.get("count")
    if not isinstance(count, int) or count < 0:
        raise DataError(f"{path}: 'count' must be a non-negative integer, got {count!r}; {REBUILD_HINT}")
    return manifest


def save_array(directory: Path, name: str, array: np.ndarray) -> None:
    np.save(directory / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)


def new_array(folder: Path | None, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An array to fill block by block: in memory, or (``folder``) the memory-mapped file
    ``<name>.npy`` there, so that an index larger than memory is built through the page cache."""
    if folder is None:
        return np.empty(shape, dtype=dtype)
    return np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)


def block_rows(width: int, budget: int = 1 << 22) -> int:
    """Rows of ``width`` values per building step: a step's float32 temporaries stay near
    ``budget`` values (16 MB), whatever the corpus."""
    return max(1, budget // max(1, width))


def finish_array(array: np.ndarray) -> None:
    """Write a memory-mapped array's pages to its file (nothing for one in memory)."""
    if isinstance(array, np.memmap):
        array.flush()


def load_array(directory: Path, name: str, mmap: bool, shape: Sequence[int | None] | None = None) -> np.ndarray:
    """Load ``<name>.npy``; ``shape`` entries that are not None must match."""
    path = Path(directory) / f"{name}.npy"
    if not path.is_file():
        raise DataError(f"{path}: missing array file; the index directory is incomplete, {REBUILD_HINT}")
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: unreadable array ({e}); {REBUILD_HINT}") from None
    if shape is not None and (
        array.ndim != len(shape) or any(want is not None and got != want for got, want in zip(array.shape, shape))
    ):
        raise DataError(
            f"{path}: shape {array.shape} does not match the manifest (expected {tuple(shape)}); {REBUILD_HINT}"
        )
    return array


def write_ids(directory: Path, ids: Sequence[str]) -> None:
    pq.write_table(pa.table({"id": Ids(ids).array}), directory / IDS_FILE)


class IdsWriter:
    """``ids.parquet`` written block by block into each of ``folders`` (a dense and a sparse
    index share their ids), with the checks ``normalize_ids`` makes on a list: no null, no
    duplicate. Duplicates are found from 64-bit hashes, 8 bytes a row, never a set of strings;
    only ids whose hashes collide are read back and compared as text."""

    def __init__(self, folders: Sequence[Path], where: str) -> None:
        schema = pa.schema([("id", pa.large_string())])  # as Ids holds them: read without a cast
        self.folders, self.where, self.count = list(folders), where, 0
        self._writers = [pq.ParquetWriter(folder / IDS_FILE, schema) for folder in self.folders]
        self._hashes: list[np.ndarray] = []

    def add(self, ids: list[str], where: str) -> None:
        """The next block's ids (``where`` names it in an error)."""
        if any(i is None for i in ids):
            raise DataError(f"{where}: a null id; every document needs an id. {self.where}")
        self._hashes.append(text_hashes(ids))
        table = pa.table({"id": pa.array(ids, type=pa.large_string())})
        for writer in self._writers:
            writer.write_table(table)
        self.count += len(ids)

    def abort(self) -> None:
        """Close the files after a failure (their folder is being removed)."""
        for writer in self._writers:
            writer.close()
        self._writers, self._hashes = [], []

    def close(self, rows: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Finish the files; a duplicate id is a DataError naming a few. Returns every id's hash,
        ascending, and (``rows``) the row of each: an index folder's documents/ finds texts by
        them (16 bytes a row at once, not the sort's 8)."""
        for writer in self._writers:
            writer.close()
        self._writers = []
        hashes = np.concatenate(self._hashes) if self._hashes else np.empty(0, np.int64)
        self._hashes = []
        order = None
        if rows:
            order = np.argsort(hashes, kind="stable")
            hashes = hashes[order]
        else:
            hashes.sort()
        colliding = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
        if colliding.size == 0 or not self.folders:
            return hashes, order
        wanted, seen = set(colliding.tolist()), Counter[str]()
        for batch in pq.ParquetFile(self.folders[0] / IDS_FILE).iter_batches(columns=["id"]):
            ids = batch.column(0).to_pylist()
            seen.update(i for i, h in zip(ids, text_hashes(ids).tolist()) if h in wanted)
        dups = sorted(i for i, c in seen.items() if c > 1)
        if dups:
            raise DataError(
                f"ids: {len(dups)} duplicate id(s), e.g. {dups[:5]}; ids must be unique in the corpus. {self.where}"
            )
        return hashes, order


def read_ids(directory: Path, count: int) -> Ids:
    path = Path(directory) / IDS_FILE
    if not path.is_file():
        raise DataError(f"{path}: missing ids file; the index directory is incomplete, {REBUILD_HINT}")
    try:
        column = pq.read_table(path, columns=["id"]).column("id")
        if not is_text(column.type):
            raise KeyError(f"the column 'id' holds {column.type}")
        ids = Ids(column)
    except (pa.ArrowException, KeyError, OSError) as e:
        raise DataError(f"{path}: unreadable ids (need one string column 'id': {e}); {REBUILD_HINT}") from None
    if len(ids) != count:
        raise DataError(f"{path}: {len(ids)} ids but the manifest says count={count}; {REBUILD_HINT}")
    return ids


def load_index(path: str | Path, mmap: bool = True) -> Any:
    """Open any saved index (DenseIndex or SparseIndex), chosen by its manifest's ``kind``."""
    manifest = read_manifest(Path(path))
    module, cls = KINDS[manifest["kind"]].split(":")
    return getattr(importlib.import_module(module), cls).load(path, mmap=mmap)
