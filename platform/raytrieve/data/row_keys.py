"""Small per-row keys the training planner works with instead of texts.

- ``text_keys``: a 64-bit hash per text value (SipHash via pandas, vectorised in C). Two rows
  clash in a no-duplicates batch when a value's hash is equal; with 64 bits a false clash in
  10^7 values has a probability around 10^-6, and it only moves a row to a later batch.
- ``label_keys``: the label itself for scalar labels, a hash for list labels.

A list value (e.g. the documents of a listwise row) hashes as a whole, and never equals the
hash of a plain string with the same characters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import pyarrow as pa

_LIST_MARK = "\x00list\x1f"
_SEP = "\x1f"


def _hash_objects(values: np.ndarray) -> np.ndarray:
    from pandas.util import hash_array

    # pandas.util resolves hash_array in a module __getattr__ typed "-> object".
    return hash_array(values, categorize=False).astype(np.uint64, copy=False)  # pyright: ignore[reportCallIssue]


def text_keys(values: pa.Array | pa.ChunkedArray | Sequence[Any]) -> np.ndarray:
    """uint64 hash per value (strings, or lists of strings)."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        arrow = cast(Any, values)  # pyarrow ships no type stubs: isinstance cannot narrow to its classes
        if pa.types.is_list(arrow.type) or pa.types.is_large_list(arrow.type):
            values = arrow.to_pylist()
        else:
            return _hash_objects(np.asarray(arrow.to_numpy(zero_copy_only=False), dtype=object))
    objects = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        objects[i] = _LIST_MARK + _SEP.join(v) if isinstance(v, (list, tuple)) else v
    return _hash_objects(objects)


def label_keys(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """One hashable key per label: numeric labels as they are, list labels hashed."""
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        return text_keys([repr([float(x) for x in v]) for v in values.to_pylist()])
    return np.asarray(values.to_numpy(zero_copy_only=False))
