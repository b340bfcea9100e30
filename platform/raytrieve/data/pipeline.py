"""Ray Data stages that feed training: each rank reads its own rows from the dataset files.

For every epoch, each rank gets one Ray Dataset:

    pieces of each dataset (train_source)         one task per piece, on any node:
      -> read the piece's needed columns          pyarrow, only the rows the rank's plan names
      -> keep the planned rows, tag each with     (micro-batch << 24 | position), from a numpy
         its stream key                           lookup shipped once through the object store
      -> tokenize (tokenizer only, no weights)    Arrow list<int32> columns, prompts + routes
    union of the datasets -> sort by stream key   Ray Data's distributed sort (object store)
      -> get_dataset_shard on the rank            micro-batches re-cut exactly by key, padded there

The driver plans on row indices only (train/plan.py); texts never pass through it. Tokens
travel as Arrow columns. Cross-encoder losses pair and tokenize texts themselves (in-batch
negatives are built inside the loss), so their rows stay text (list<string> per column).

Tokenizing happens in the read tasks rather than in an actor pool: an actor pool holds its
CPU share for the whole epoch, and on a small cluster the sort's whole-CPU tasks then never
schedule; a task frees its CPU when the piece is done. The driver loads each tokenizer once and
hands its portable form (raytrieve/fast_tokenizer.py) to the tasks, which then import neither
transformers nor torch (~3.5 CPU seconds per worker process); a slow tokenizer is loaded once
per worker process and kept (``_tokenizer``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from raytrieve.errors import RaytrieveError
from raytrieve.kinds import model_kind
from raytrieve.model_ref import local_folder
from raytrieve.train.config import DatasetConfig

if TYPE_CHECKING:
    from raytrieve.fast_tokenizer import PortableTokenizer

POSITION_BITS = 24  # = train.plan.POSITION_BITS (a stream key is micro-batch << 24 | position)
_IDS = pa.list_(pa.int32())
_TEXTS = pa.list_(pa.string())
_LABELS = pa.list_(pa.float64())


class StreamError(RaytrieveError):
    """A rank's data stream does not match its plan (rows lost, duplicated or out of order)."""


def column_prompts(d: DatasetConfig) -> dict[str, str | None]:
    """The prompt of each text column (one string for all, or per column)."""
    columns = d.columns or []
    if isinstance(d.prompts, str):
        return {c: d.prompts for c in columns}
    return {c: (d.prompts or {}).get(c) for c in columns}


def column_routes(d: DatasetConfig) -> dict[str, str | None]:
    """Router task per column: mapped explicitly, else the first column is the query and the
    others are documents (only used when the model has a Router)."""
    columns = d.columns or []
    return {c: d.router_mapping.get(c, "query" if i == 0 else "document") for i, c in enumerate(columns)}


@dataclass
class DatasetStream:
    """How one dataset's rows become stream rows (picklable; shipped to tasks and workers)."""

    columns: list[str]  # text columns, in the loss's order
    label: str | None
    prompts: list[str | None]
    routes: list[str | None] | None  # Router task per column; None: no Router
    label_kind: str | None = None  # int | float | bool | list | listwise
    list_columns: tuple[bool, ...] = ()  # columns holding a list of texts per row (listwise documents)


@dataclass
class StreamSpec:
    model_path: str
    kind: str  # dense | sparse | cross
    datasets: list[DatasetStream]
    max_seq_length: int | None = None
    # The input tokenizer per Router route (None: no Router), made portable on the driver
    # (``make_portable``) so that read tasks need neither transformers nor torch.
    tokenizers: dict[str | None, PortableTokenizer] = field(default_factory=dict)
    # The model folder as read tasks on any machine reach it (model_ref.ship, on the driver)
    shipped: Any = None

    @property
    def tokenized(self) -> bool:
        """Whether rows carry token ids per column (else texts: the kind's losses tokenize)."""
        return model_kind(self.kind).tokenized_rows

    def column_names(self, c: int) -> list[str]:
        """The stream columns of text column ``c``."""
        return [f"ids_{c}", f"types_{c}"] if self.tokenized else [f"text_{c}"]

    @property
    def width(self) -> int:
        return max(len(d.columns) for d in self.datasets)

    def routes(self) -> set[str | None]:
        return {d.routes[c] if d.routes else None for d in self.datasets for c in range(len(d.columns))}

    def make_portable(self) -> None:
        """Load each route's tokenizer here, once, and keep its portable form (driver side)."""
        if self.tokenized:
            for route in self.routes():
                portable = _tokenizer(self.model_path, route, self.max_seq_length).portable()
                if portable is not None:
                    self.tokenizers[route] = portable

    def schema(self) -> pa.Schema:
        fields = [("seq", pa.int64()), ("dataset", pa.int32()), ("label", _LABELS)]
        for c in range(self.width):
            fields += [(name, _IDS if self.tokenized else _TEXTS) for name in self.column_names(c)]
        return pa.schema(fields)


def label_kind(label_type: pa.DataType | None, listwise: bool) -> str | None:
    if label_type is None:
        return None
    if listwise:
        return "listwise"
    if pa.types.is_list(label_type) or pa.types.is_large_list(label_type):
        return "list"
    if pa.types.is_boolean(label_type):
        return "bool"
    return "int" if pa.types.is_integer(label_type) else "float"


@lru_cache(maxsize=8)
def _tokenizer(model_path: str, route: str | None, max_seq_length: int | None):
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from raytrieve.encoders.tokenizer_only import load_input_tokenizer

    return load_input_tokenizer(model_path, route, max_seq_length)


def _as_lists(column: pa.ChunkedArray | pa.Array, value_type: pa.DataType) -> pa.Array:
    """A scalar column as one-element lists, a list column cast: one schema for every dataset."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return column.cast(pa.list_(value_type))
    offsets = pa.array(np.arange(len(column) + 1, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, column.cast(value_type))


def stream_rows(table: pa.Table, keys: np.ndarray, dataset: int, spec: StreamSpec) -> pa.Table:
    """The planned rows of one piece (``table``, in stream key order ``keys``) as stream rows."""
    d = spec.datasets[dataset]
    n = table.num_rows
    out: dict[str, pa.Array] = {
        "seq": pa.array(keys, pa.int64()),
        "dataset": pa.array(np.full(n, dataset, dtype=np.int32)),
        "label": _as_lists(table.column(d.label), pa.float64()) if d.label else pa.nulls(n, _LABELS),
    }
    for c in range(spec.width):
        if c >= len(d.columns):
            out.update({name: pa.nulls(n, spec.schema().field(name).type) for name in spec.column_names(c)})
            continue
        column = table.column(d.columns[c])
        if not spec.tokenized:
            out[f"text_{c}"] = _as_lists(column, pa.string())
            continue
        route = d.routes[c] if d.routes else None
        tok = spec.tokenizers.get(route) or _tokenizer(
            local_folder(spec.shipped or spec.model_path), route, spec.max_seq_length
        )
        encoded = tok.tokenize_ids(column.to_pylist(), prompt=d.prompts[c])
        out[f"ids_{c}"] = pa.array(encoded["input_ids"], _IDS)
        types = encoded.get("token_type_ids")
        out[f"types_{c}"] = pa.array(types, _IDS) if types is not None else pa.nulls(n, _IDS)
    return pa.Table.from_pydict(out, schema=spec.schema())


def read_planned(items: pa.Table, pieces: list, lookup: Any, dataset: int, spec: StreamSpec) -> pa.Table:
    """``map_batches`` function: read each listed piece, keep the rows the lookup names, tokenize."""
    import ray

    from raytrieve.data.train_source import read_piece

    rows, keys = ray.get(lookup) if isinstance(lookup, ray.ObjectRef) else lookup
    d = spec.datasets[dataset]
    wanted = d.columns + ([d.label] if d.label and d.label not in d.columns else [])
    parts = []
    for i in items.column("piece").to_pylist():
        piece = pieces[i]
        lo, hi = np.searchsorted(rows, [piece.first_row, piece.first_row + piece.rows])
        if lo == hi:
            continue
        table = read_piece(piece, wanted)
        if table.num_rows != piece.rows:
            raise StreamError(
                f"{piece.path}: has {table.num_rows} rows where the plan counted {piece.rows}; "
                "the file changed after the job was planned"
            )
        order = np.argsort(keys[lo:hi], kind="stable")
        local = (rows[lo:hi] - piece.first_row)[order]
        parts.append(stream_rows(table.take(pa.array(local)), keys[lo:hi][order], dataset, spec))
    return pa.concat_tables(parts) if parts else spec.schema().empty_table()


def rank_epoch_dataset(
    pieces: Sequence[list],
    lookups: Sequence[tuple[np.ndarray, np.ndarray] | None],
    spec: StreamSpec,
    read_cpus: float = 0.5,
):
    """The Ray Dataset of one rank's epoch: every planned row once, sorted by stream key.

    ``pieces[d]``: dataset d's numbered pieces; ``lookups[d]``: (row indices sorted, their stream
    keys) of the rank's rows of dataset d in this epoch, or None when it has none.
    """
    import ray
    import ray.data

    parts = []
    for d, lookup in enumerate(lookups):
        if lookup is None or not len(lookup[0]):
            continue
        rows = lookup[0]
        needed = [
            i
            for i, p in enumerate(pieces[d])
            if np.searchsorted(rows, p.first_row + p.rows) > np.searchsorted(rows, p.first_row)
        ]
        ref = ray.put(lookup)
        ds = ray.data.from_items([{"piece": i} for i in needed], override_num_blocks=len(needed))
        parts.append(
            ds.map_batches(
                read_planned,  # pyright: ignore[reportArgumentType]  # Ray types fn as one-argument; fn_kwargs gives the rest
                batch_size=1,
                batch_format="pyarrow",
                num_cpus=read_cpus,
                fn_kwargs={"pieces": pieces[d], "lookup": ref, "dataset": d, "spec": spec},
            )
        )
    if not parts:
        return None
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return ds.sort("seq")


def micro_batches(tables: Iterable[pa.Table], expected: Iterable[tuple[int, int]]) -> Iterator[tuple[int, pa.Table]]:
    """Cut a rank's sorted stream into its planned micro-batches: ``expected`` is (micro-batch,
    rows) in order. Every micro-batch must come whole, in order, each position once."""
    plan = iter(expected)
    current = next(plan, None)
    pending: list[pa.Table] = []
    have = 0
    for table in tables:
        if not table.num_rows:
            continue
        pending.append(table)
        have += table.num_rows
        while current is not None and have >= current[1]:
            m, size = current
            joined = pa.concat_tables(pending) if len(pending) > 1 else pending[0]
            batch, rest = joined.slice(0, size), joined.slice(size)
            want = (np.int64(m) << POSITION_BITS) | np.arange(size, dtype=np.int64)
            if not np.array_equal(batch.column("seq").to_numpy(), want):
                raise StreamError(f"micro-batch {m}: the stream does not hold its {size} planned rows in order")
            yield m, batch
            pending, have = ([rest] if rest.num_rows else []), rest.num_rows
            current = next(plan, None)
    if current is not None or have:
        raise StreamError(f"the stream ended {f'early, at micro-batch {current[0]}' if current else 'with extra rows'}")


def decode_features(batch: pa.Table, d: DatasetStream, modules: Sequence[Any]) -> list[dict[str, Any]]:
    """The padded features dict of each text column (``modules[c]``: the column's input module,
    whose ``collate`` pads exactly as the encoder does; ``task`` set for Router models)."""
    features = []
    for c, module in enumerate(modules):
        encoded = {"input_ids": batch.column(f"ids_{c}").to_pylist()}
        types = batch.column(f"types_{c}")
        if types.null_count == 0:
            encoded["token_type_ids"] = types.to_pylist()
        f = module.collate(encoded)
        prompt = d.prompts[c]
        if prompt and hasattr(module, "prompt_length"):
            f["prompt_length"] = module.prompt_length(prompt)
        if d.routes is not None:
            f["task"] = d.routes[c]
        features.append(f)
    return features


def decode_texts(batch: pa.Table, d: DatasetStream) -> list[list[Any]]:
    """Cross-encoder columns: texts per column (a list of texts per row for list columns), each
    with its column's prompt in front (train/run.py gives one to the first column only: the
    query every pair begins with, where sentence-transformers' CrossEncoder puts it)."""
    out = []
    for c in range(len(d.columns)):
        values = batch.column(f"text_{c}").to_pylist()
        if prompt := d.prompts[c]:
            values = [[prompt + t for t in v] for v in values]
        is_list = d.list_columns[c] if c < len(d.list_columns) else False
        out.append(values if is_list else [v[0] for v in values])
    return out


def decode_labels(batch: pa.Table, kind: str | None) -> Any:
    """Labels as the losses take them: float32 (or int64 / bool) tensors; listwise: one score
    tensor per query, of that query's document count."""
    import torch

    if kind is None:
        return None
    values = batch.column("label").to_pylist()
    if kind == "listwise":
        return [torch.tensor(x, dtype=torch.float32) for x in values]
    if kind == "list":
        return torch.tensor(values)
    cast = {"int": int, "bool": bool, "float": float}[kind]
    return torch.tensor([cast(v[0]) for v in values])
