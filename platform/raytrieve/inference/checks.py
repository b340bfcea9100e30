"""The corpus checks that run on the cluster before anything is encoded: a scan of every
shard (row counts, null and blank rows) and the distributed duplicate-id check.

The duplicate check never brings ids to the driver. Workers emit (id, position) for every
valid row; Ray Data groups them by id across the cluster (a shuffle) and aggregates count,
first and last position per id, keeping the ids held by more than one row. That table stays in
the object store: a task on a worker counts it and picks the earliest few for an error message,
and the read stage's actors fetch its blocks themselves. The driver holds the counts, those few
and the blocks' references (and, Ray's rule, blocks under 100 KB: a small table's), however many
duplicates the corpus has. Its cost is one shuffle of the id column: measured in BENCHMARKS.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raytrieve.data.sources import ShardSpec
from raytrieve.errors import RaytrieveError
from raytrieve.inference.config import EncodeConfig
from raytrieve.inference.corpus import split_position

# Planned rows up to which the duplicate-id check shuffles with sorting tasks, not hash actors.
SORT_SHUFFLE_MAX_ROWS = 100_000


@dataclass
class ScanResult:
    input_rows: int
    bad: int  # null ids, null or blank texts
    offsets: list[int]  # per shard: the number of its first row in the whole input
    examples: list[tuple[int, str | None, str]]  # the first bad rows (row in the input, id, reason)


@dataclass
class Duplicates:
    """The corpus's repeated ids, held on the cluster."""

    ids: int = 0  # ids held by more than one row
    extra_rows: int = 0  # their rows after each one's first: the rows left out as duplicates
    # The ``EXAMPLES`` ids whose last row comes first: (id, position of that row, of its first).
    examples: list[tuple[str, int, int]] = field(default_factory=list)
    # ObjectRefs of tables (id, count, first, last): every repeated id, with ``first`` the
    # position (shard << 32 | row) of the row that keeps it.
    blocks: list[Any] = field(default_factory=list)


def _summarize(n: int, *tables: Any) -> tuple[int, int, list[tuple[str, int, int]]]:
    """Runs as a Ray task on a worker: counts of the duplicate table and its ``n`` ids whose
    last row is earliest (the order an error lists bad rows in)."""
    ids = extra = 0
    examples: list[tuple[str, int, int]] = []
    for t in tables:
        if t.num_rows == 0:  # Ray's all-to-all operators may emit empty blocks without columns
            continue
        ids += t.num_rows
        extra += sum(t.column("count").to_pylist()) - t.num_rows
        head = t.sort_by("last").slice(0, n)
        rows = zip(head.column("id").to_pylist(), head.column("last").to_pylist(), head.column("first").to_pylist())
        examples = sorted(examples + list(rows), key=lambda e: e[1])[:n]
    return ids, extra, examples


def first_positions(blocks: list[Any]) -> dict[str, int]:
    """Each repeated id's first position, from the duplicate table's blocks (on a worker)."""
    import ray

    firsts: dict[str, int] = {}
    for t in ray.get(blocks):
        if t.num_rows:
            firsts.update(zip(t.column("id").to_pylist(), t.column("first").to_pylist()))
    return firsts


def _spec_dataset(specs: list[ShardSpec]) -> Any:
    import ray.data

    return ray.data.from_items([s.as_row() for s in specs], override_num_blocks=len(specs))


def scan(cfg: EncodeConfig, specs: list[ShardSpec]) -> ScanResult:
    from raytrieve.inference.stages import scan_shards

    try:
        summaries = sorted(
            _spec_dataset(specs)
            .map_batches(
                scan_shards, fn_kwargs={"corpus": cfg.corpus}, batch_size=1, batch_format="pyarrow", num_cpus=0.5
            )
            .iter_rows(),
            key=lambda r: r["shard"],
        )
    except Exception as e:
        raise_worker_error(e)
        raise
    return combine_scans(summaries)


def combine_scans(summaries: list[dict[str, Any]]) -> ScanResult:
    """The whole input's scan from each shard's (``stages.scan_shards`` rows, in shard order):
    each shard's bad rows numbered by their row in the whole input."""
    offsets, total, bad, examples = [], 0, 0, []
    for s in summaries:
        offsets.append(total)
        examples += [(total + e["row"], e["id"], e["reason"]) for e in s["examples"]]
        total += int(s["input_rows"])
        bad += int(s["bad"])
    return ScanResult(total, bad, offsets, examples)


def duplicate_ids(cfg: EncodeConfig, specs: list[ShardSpec], examples: int) -> Duplicates:
    import pyarrow.compute as pc
    import ray
    from ray.data.aggregate import Count, Max, Min
    from ray.data.context import ShuffleStrategy

    from raytrieve.inference.stages import shard_ids

    ids = _spec_dataset(specs).map_batches(
        shard_ids, fn_kwargs={"corpus": cfg.corpus}, batch_size=1, batch_format="pyarrow", num_cpus=0.5
    )
    # The shuffle strategy by the planned rows (measured on 2 cores, benchmarks/driver_memory.py):
    # Ray Data's default hash shuffle starts aggregator actors, a fixed ~4.5 s per job (6.0 s
    # for 120 rows, 1.5 s with the task-based sort shuffle), but scales: at 1M rows it took
    # 9.6 s against the sort shuffle's 44 s. They meet at about 100k rows (6.2 s each).
    # Datasets derived from ``ids`` (the groupby) copy its context.
    if len(specs) * cfg.rows_per_shard <= SORT_SHUFFLE_MAX_ROWS:
        ids.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    grouped = ids.groupby("id").aggregate(
        Count(alias_name="count"),
        # Ray's typing: Min/Max's own default zero_factory fails their generic bound.
        Min("pos", alias_name="first"),  # pyright: ignore[reportArgumentType]
        Max("pos", alias_name="last"),  # pyright: ignore[reportArgumentType]
    )
    # pyarrow.compute makes its functions at import time: no stub names them.
    repeated = grouped.map_batches(
        lambda t: t.filter(pc.greater(t["count"], 1)),  # pyright: ignore[reportAttributeAccessIssue]
        batch_format="pyarrow",
    )
    try:
        blocks = repeated.to_arrow_refs()
        n_ids, extra, first_few = ray.get(ray.remote(_summarize).options(num_cpus=0.5).remote(examples, *blocks))
    except Exception as e:
        raise_worker_error(e)
        raise
    return Duplicates(n_ids, extra, first_few, blocks if n_ids else [])


def first_bad_rows(
    scanned: ScanResult, duplicates: Duplicates, cfg: EncodeConfig, n: int
) -> list[tuple[int, str | None, str]]:
    """The first ``n`` bad rows of the input, with their row numbers in the whole input. Each
    repeated id stands for its last row, naming the row that keeps it (n ids listed, not every
    repeated row)."""

    def number(position: int) -> int:
        shard, row = split_position(position)
        return scanned.offsets[shard] + row

    rows = list(scanned.examples)
    for id_, last, first in duplicates.examples:
        why = f"duplicate {cfg.corpus.id_column} (row {number(first)} has it first)"
        rows.append((number(last), id_, why))
    return sorted(rows, key=lambda r: r[0])[:n]


def raise_worker_error(e: BaseException) -> None:
    """Re-raise our own error (a bad file, a bad column) that a Ray worker raised, as itself:
    the user sees the message that names the file and the fix, not a Ray traceback."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        cause = getattr(err, "cause", None)  # a RayTaskError's original exception
        if isinstance(cause, RaytrieveError):
            raise type(cause)(str(cause)) from None
        if isinstance(err, RaytrieveError) and cause is None:
            raise type(err)(str(err)) from None
        stack += [err.__cause__, err.__context__, getattr(err, "cause", None)]
