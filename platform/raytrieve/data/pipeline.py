"""Ray Data stages that feed training.

The driver plans every micro-batch of the run (train/plan.py) and turns each rank's
sequence into a Ray Dataset of one row per micro-batch: its texts and labels. An actor
pool of CPU tokenizers (each loads the model's tokenizer once) applies the column's prompt
and Router route, tokenizes and pads the micro-batch; the rank's train worker streams the
ready batches from ``get_dataset_shard``. Cross-encoder losses pair and tokenize texts
themselves (in-batch negatives are built inside the loss), so their batches stay text.

Texts travel through the object store rather than being read again by workers, so the
data files only need to exist where the job is launched.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from raytrieve._io import pack_arrays, unpack_arrays
from raytrieve.train.config import DatasetConfig


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


def micro_batch_rows(plan_rows: Sequence[Any], columns: Sequence[dict[str, list[Any]]],
                     text_columns: Sequence[Sequence[str]], label_columns: Sequence[str | None]) -> list[dict[str, Any]]:
    """One Ray Data row per planned micro-batch: ``step``, ``dataset`` and a JSON payload
    ``{"texts": [column][row], "labels": [row] | null}``."""
    out = []
    for step, mb in enumerate(plan_rows):
        data = columns[mb.dataset]
        label = label_columns[mb.dataset]
        payload = {
            "texts": [[data[c][i] for i in mb.rows] for c in text_columns[mb.dataset]],
            "labels": [data[label][i] for i in mb.rows] if label else None,
        }
        out.append({"step": step, "epoch": mb.epoch, "dataset": mb.dataset, "payload": json.dumps(payload)})
    return out


class TokenizeBatches:
    """Callable class for ``map_batches``: each row's texts -> padded token arrays (npz bytes).

    ``prompts[d]`` / ``routes[d]`` give dataset d's prompt and Router route per column position.
    """

    def __init__(self, model_path: str, kind: str, prompts: list[list[str | None]], routes: list[list[str | None]],
                 max_seq_length: int | None = None) -> None:
        import os

        import torch

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        torch.set_num_threads(1)  # Ray sets OMP threads from the actor's CPU share; be explicit
        from raytrieve.encoders import load_encoder

        self.model = load_encoder(kind, model_path, max_seq_length=max_seq_length)
        self.prompts, self.routes = prompts, routes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        blobs = [self.tokenize(int(d), json.loads(p)["texts"]) for d, p in zip(batch["dataset"], batch["payload"])]
        return {**batch, "features": np.array(blobs, dtype=object)}

    def tokenize(self, dataset: int, texts: list[list[str]]) -> bytes:
        from raytrieve.modules import Router

        has_router = isinstance(self.model.stack[0], Router)
        arrays: dict[str, np.ndarray] = {}
        for c, column in enumerate(texts):
            prompt = self.prompts[dataset][c]
            module = self.model.input_module(self.routes[dataset][c] if has_router else None)
            features = module.collate(module.tokenize_ids(column, prompt=prompt))
            for key, value in features.items():
                arrays[f"{c}.{key}"] = np.asarray(value)
            if prompt and hasattr(module, "prompt_length"):
                arrays[f"{c}.prompt_length"] = np.asarray(module.prompt_length(prompt))
        return pack_arrays(arrays)


def decode_features(blob: bytes, n_columns: int, routes: list[str | None] | None) -> list[dict[str, Any]]:
    """The padded features dict of each column, as torch tensors (``task`` set for Router models)."""
    import torch

    columns: list[dict[str, Any]] = [{} for _ in range(n_columns)]
    for name, value in unpack_arrays(blob).items():
        c, key = name.split(".", 1)
        columns[int(c)][key] = int(value) if key == "prompt_length" else torch.from_numpy(value)
    if routes is not None:
        for c, route in enumerate(routes):
            columns[c]["task"] = route
    return columns


def decode_labels(labels: list[Any] | None, listwise: bool) -> Any:
    import torch

    if labels is None:
        return None
    if listwise:  # one score tensor per query, of that query's document count
        return [torch.tensor(x, dtype=torch.float32) for x in labels]
    return torch.tensor(labels)


def rank_dataset(rows: list[dict[str, Any]], model_path: str, kind: str, prompts: list[list[str | None]],
                 routes: list[list[str | None]], actors: int = 1, rows_per_call: int = 4,
                 max_seq_length: int | None = None):
    """The Ray Dataset one rank streams: rows in step order, tokenized by an actor pool.

    Actors take half a CPU each: on a 2-CPU machine whole-CPU actors starve the other stages.
    """
    import ray.data
    from ray.data import ActorPoolStrategy

    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // rows_per_call, 64)))
    if kind == "cross":
        return ds
    return ds.map_batches(
        TokenizeBatches,
        fn_constructor_kwargs={"model_path": model_path, "kind": kind, "prompts": prompts, "routes": routes,
                               "max_seq_length": max_seq_length},
        compute=ActorPoolStrategy(size=actors),
        num_cpus=0.5,
        batch_size=rows_per_call,
        batch_format="numpy",
    )
