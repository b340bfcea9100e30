"""A digest of a dataset's values, for a training run's resume key.

A run resumes its checkpoints only on the data they were trained on. Keying the input files by
size and modification time refused a resume when the same data was copied or synced again (a
new cluster, a restored bucket), and could not see a file rewritten in place with the same size
and time. ``ContentDigest`` hashes what training reads instead: the values of the columns, in
row order. It is fed record batches during the validation pass that reads every row anyway, and
the same values give the same digest however they are cut into batches, row groups or files,
compressed or stored (parquet, jsonl, csv): each part of each column has its own running hash
(value lengths, value bytes, null positions), so where a batch ends does not enter any of them.
Numbers are hashed as float64 (a label file may hold 1 in one file and 1.0 in another; training
reads both as 1.0), -0.0 as 0.0. A null adds only its position, whatever its batch's type (a
JSON block of nulls reads as type null), and an empty batch or list adds nothing (a reader may
type the items of empty lists as null).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pyarrow as pa


class ContentDigest:
    """sha256 over ``columns`` of the batches given to ``update``, in their order."""

    def __init__(self, columns: list[str]) -> None:
        self.columns = list(columns)
        self.rows = 0
        self._parts: dict[str, Any] = {}  # "<column>/<part>": a running sha256
        self._seen: dict[str, int] = {}  # values fed per array path, for null positions

    def update(self, batch: pa.RecordBatch) -> None:
        for c in self.columns:
            self._feed(c, batch.column(c))
        self.rows += batch.num_rows

    def hexdigest(self) -> str:
        parts = {k: h.hexdigest() for k, h in self._parts.items()}
        body = json.dumps({"columns": self.columns, "rows": self.rows, "parts": parts}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()

    def _hash(self, key: str) -> Any:
        if key not in self._parts:
            self._parts[key] = hashlib.sha256()
        return self._parts[key]

    def _feed(self, key: str, array: Any) -> None:
        import pyarrow.compute

        pc: Any = pyarrow.compute  # it makes its functions at import time: no stub names them
        if pa.types.is_dictionary(array.type):
            array = array.dictionary_decode()
        base = self._seen.get(key, 0)  # the place of this slice's first value in the column
        self._seen[key] = base + len(array)
        if array.null_count:  # where the nulls are (a null and "" or 0 differ); the rest, the values
            at = np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False)) + base
            self._hash(f"{key}/nulls").update(at.astype("<i8").tobytes())
            valid = pc.invert(array.is_null())
            places, array = np.flatnonzero(valid.to_numpy(zero_copy_only=False)) + base, array.filter(valid)
        else:
            places = None
        if len(array) == 0:  # no values: nothing to add, whatever type a reader gave them
            return
        kind = array.type
        if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
            lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
            self._hash(f"{key}/lengths").update(lengths.astype("<i8").tobytes())
            self._feed(f"{key}/items", array.flatten())
        elif any(
            f(kind)
            for f in (
                pa.types.is_string,
                pa.types.is_large_string,
                pa.types.is_string_view,
                pa.types.is_binary,
                pa.types.is_large_binary,
                pa.types.is_binary_view,
            )
        ):
            wide = array.cast(pa.large_binary())
            _, offsets, data = wide.buffers()
            at = np.frombuffer(offsets, dtype="<i8")[wide.offset : wide.offset + len(wide) + 1]
            self._hash(f"{key}/lengths").update(np.diff(at).astype("<i8").tobytes())
            if data is not None and at[-1] > at[0]:
                self._hash(f"{key}/bytes").update(memoryview(data)[int(at[0]) : int(at[-1])])
        elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
            # As float64; integers past 2**53 (ids used as labels) also exactly, with their
            # places, so two such ids never hash alike.
            values = array.cast(pa.float64(), safe=False).to_numpy(zero_copy_only=False)
            self._hash(f"{key}/values").update((values.astype("<f8") + 0.0).tobytes())  # -0.0 as 0.0
            if pa.types.is_integer(kind):
                exact = array.to_numpy(zero_copy_only=False)
                wide = np.flatnonzero(np.abs(exact.astype(np.float64)) >= 2.0**53)
                if len(wide):
                    at = wide + base if places is None else places[wide]
                    self._hash(f"{key}/wide").update(at.astype("<i8").tobytes())
                    self._hash(f"{key}/wide").update(np.ascontiguousarray(exact[wide]).tobytes())
        else:  # dates, structs, ...: each value's repr, as text
            texts = [repr(v) for v in array.to_pylist()]
            self._feed(f"{key}/repr", pa.array(texts, pa.large_string()))
