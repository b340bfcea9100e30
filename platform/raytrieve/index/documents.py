"""The texts of an index folder's documents, on disk beside its indices: what /search returns
and the reranker reads, without any process holding the corpus::

    documents/
      texts.arrow   Arrow IPC file, columns id and text, one row per index row (row order)
      id_hash.npy   int64: 64-bit hashes of the ids (hashing.text_hashes), ascending
      id_row.npy    int64: the row of each of those hashes

`raytrieve index build` writes it from the corpus, one encoding shard at a time, and checks
each text against the hash the encoding job stored: the texts are the ones the vectors were
encoded from, and a corpus changed since is refused there, not served. Opened, every file is
memory-mapped, so the texts add nothing to a Serve replica's resident memory (its indices
still hold their ids); replicas on one machine share the pages.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from raytrieve.errors import DataError
from raytrieve.hashing import text_hashes
from raytrieve.index import base

FOLDER = "documents"
TEXTS = "texts.arrow"
SCHEMA = pa.schema([("id", pa.large_string()), ("text", pa.large_string())])


class DocumentsWriter:
    """``documents/`` of ``folder`` (an index folder being built), block by block in row order."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder) / FOLDER
        self.folder.mkdir()
        self._sink = pa.OSFile(str(self.folder / TEXTS), "wb")
        try:
            self._writer = pa.ipc.new_file(self._sink, SCHEMA)
        except BaseException:
            self._sink.close()
            raise

    def add(self, ids: Sequence[str], texts: Sequence[str]) -> None:
        self._writer.write_batch(
            pa.record_batch([pa.array(ids, pa.large_string()), pa.array(texts, pa.large_string())], schema=SCHEMA)
        )

    def finish(self, hashes: np.ndarray, rows: np.ndarray) -> None:
        """``hashes``: every id's hash, ascending; ``rows``: their rows (base.IdsWriter.close)."""
        self.close()
        base.save_array(self.folder, "id_hash", hashes.astype(np.int64, copy=False))
        base.save_array(self.folder, "id_row", rows.astype(np.int64, copy=False))

    def close(self) -> None:
        """Close the texts file: by ``finish``, or after a failure (the folder is then being
        removed); idempotent."""
        if not self._sink.closed:
            self._writer.close()
            self._sink.close()


def write_documents(folder: Path, ids: Sequence[str], texts: Sequence[str]) -> None:
    """``documents/`` of a small index folder from lists (tests, in-process corpora)."""
    writer = DocumentsWriter(folder)
    writer.add(ids, texts)
    hashes = text_hashes(list(ids))
    order = np.argsort(hashes, kind="stable")
    writer.finish(hashes[order], order)


class DocumentStore:
    """An index folder's ``documents/``, memory-mapped: texts by row (an index's hits) or by id
    (after fusion across indices). ``count``: the rows the folder's indices hold."""

    def __init__(self, index_folder: str | Path, count: int) -> None:
        folder = Path(index_folder) / FOLDER
        path = folder / TEXTS
        if not path.is_file():
            raise DataError(
                f"{index_folder}: no {FOLDER}/{TEXTS}, the texts Serve returns and reranks (index folders built "
                "before raytrieve kept them have none); rebuild it with `raytrieve index build`"
            )
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
            self._batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: unreadable ({e}); {base.REBUILD_HINT}") from None
        if reader.schema != SCHEMA:
            raise DataError(f"{path}: columns {reader.schema.names}, expected id and text; {base.REBUILD_HINT}")
        sizes = [b.num_rows for b in self._batches]
        self._starts = np.concatenate(([0], np.cumsum(sizes, dtype=np.int64)))
        if self._starts[-1] != count:
            raise DataError(f"{path}: {int(self._starts[-1])} documents, the index {count}; {base.REBUILD_HINT}")
        self._hashes = base.load_array(folder, "id_hash", True, (count,))
        self._rows = base.load_array(folder, "id_row", True, (count,))

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _at(self, row: int, column: int) -> str:
        batch = int(np.searchsorted(self._starts, row, side="right")) - 1
        return self._batches[batch].column(column)[row - int(self._starts[batch])].as_py()

    def texts(self, rows: Sequence[int]) -> list[str]:
        """The texts of index rows."""
        return [self._at(int(r), 1) for r in rows]

    def lookup(self, ids: Sequence[str]) -> list[str | None]:
        """The text of each id; None for an id this folder does not hold."""
        out: list[str | None] = []
        for id_, h in zip(ids, text_hashes(list(ids)).tolist()):
            pos, text = int(np.searchsorted(self._hashes, h)), None
            while pos < len(self._hashes) and self._hashes[pos] == h:  # a collision: compare the ids
                row = int(self._rows[pos])
                if self._at(row, 0) == id_:
                    text = self._at(row, 1)
                    break
                pos += 1
            out.append(text)
        return out
