"""64-bit hashes of texts, one function for every place that compares texts or ids without
holding them: the encoding job stores each row's text hash with its vectors; index build checks
ids for duplicates by them and writes documents/'s lookup by id; mining leaves a query's
positives out of its candidates by them. numpy and hashlib only: the index library and the
encoding job both import it."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def text_hashes(texts: Sequence[str]) -> np.ndarray:
    """int64 blake2b hashes of ``texts`` (UTF-8), in order: stable across processes and runs."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little", signed=True) for t in texts],
        dtype=np.int64,
    )
