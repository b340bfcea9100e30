"""Training pairs from a BEIR folder's judged split: each query with each of its relevant
documents (grade > 0), as a (query, document) parquet that `raytrieve train` reads with
``columns: [query, document]``. The demo's BEIR path (demo/sample.py) draws its train pairs the
same way (the same pairs at one cap and seed when the folder has its own dev split; without
one the demo first holds out train queries as dev).

Whole queries, never some of a query's positives: a query kept with only part of them would let
hard-negative mining (`raytrieve mine`) pick its other relevant document as a negative.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raytrieve.errors import DataError


def whole_query_pairs(
    qrels: Mapping[str, Mapping[str, float]], limit: int | None, rng: np.random.Generator | None
) -> list[tuple[str, str]]:
    """(query id, document id) for every relevant judgement, query by query in ``rng``'s order
    (None: by id); with ``limit``, a query whose pairs would pass it is skipped, and a later one
    with fewer may still fit."""
    ids = sorted(qrels)
    order = rng.permutation(len(ids)) if rng is not None else range(len(ids))
    pairs: list[tuple[str, str]] = []
    for i in order:
        own = [(ids[i], d) for d, grade in sorted(qrels[ids[i]].items()) if grade > 0]
        if limit is not None and len(pairs) + len(own) > limit:
            continue
        pairs += own
        if limit is not None and len(pairs) == limit:
            break
    return pairs


@dataclass
class PairsResult:
    out: str
    pairs: int
    queries: int
    split: str
    judged_without_relevant: int  # queries of the split whose every grade is <= 0: no pair


BEIR_PAIRS = "raytrieve data beir-pairs"


def write_pairs(pairs: list[tuple[str, str]], queries: dict[str, str], corpus: dict[str, str], out: Path) -> None:
    """The pairs' texts as parquet columns query, document, written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raytrieve._io import atomic_file, mark_written_by

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        table = {"query": [queries[q] for q, _ in pairs], "document": [corpus[d] for _, d in pairs]}
        pq.write_table(mark_written_by(pa.table(table), BEIR_PAIRS), tmp)


def beir_pairs(
    folder: str | Path, split: str, out: str | Path, max_pairs: int | None = None, seed: int = 42
) -> PairsResult:
    """``split``'s training pairs of the BEIR folder ``folder`` into the parquet ``out``: all of
    them, or whole queries drawn with ``seed`` up to ``max_pairs``. Corpus texts carry their title
    in front, as `raytrieve evaluate` and the encoding job read them."""
    from raytrieve.evaluate import data

    if max_pairs is not None and max_pairs < 1:
        raise DataError(f"--max-pairs must be at least 1, got {max_pairs}")
    target = Path(out)
    if target.suffix != ".parquet":
        raise DataError(f"--out {out}: name a .parquet file (raytrieve train reads it as datasets.0.path)")
    from raytrieve._io import check_output_file

    check_output_file(target, BEIR_PAIRS, "--out")
    loaded = data.load_files(*data.beir_files(Path(folder).expanduser(), split, option="--beir"), split=split)
    rng = np.random.default_rng(seed) if max_pairs is not None else None
    pairs = whole_query_pairs(loaded.qrels, max_pairs, rng)
    if not pairs:  # only with a cap: load_files refuses a split without a relevant judgement
        raise DataError(
            f"{folder}: no query of {split} fits in --max-pairs {max_pairs} with all its relevant documents; raise it"
        )
    write_pairs(pairs, loaded.queries, loaded.corpus, target)
    summary: dict[str, Any] = loaded.summary
    return PairsResult(
        str(target),
        len(pairs),
        len({q for q, _ in pairs}),
        split,
        int(summary.get("judged_without_relevant", 0)),
    )
