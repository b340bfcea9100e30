"""Ray Data stages that feed training: read a dataset, resolve prompts and routes per
column, and tokenize in a CPU actor pool (each actor loads the model's tokenizer once).

Rows leave tokenization as unpadded id lists per column (``<column>.input_ids`` and, for
BERT-like models, ``<column>.token_type_ids``); the train loop pads each batch it takes from
its shard with ``collate``. Validate the config (data/validate.py) before calling these.
"""

from __future__ import annotations

from typing import Any

import numpy as np

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


def read_dataset(d: DatasetConfig, fmt: str):
    import ray.data

    if fmt == "parquet":
        return ray.data.read_parquet(d.path)
    if fmt == "jsonl":
        return ray.data.read_json(d.path, lines=True)
    if fmt == "csv":
        return ray.data.read_csv(d.path)
    import datasets

    return ray.data.from_huggingface(datasets.load_from_disk(d.path))


class TokenizeColumns:
    """Callable class for ``map_batches``: text columns -> id lists, label passed through."""

    def __init__(self, model_path: str, kind: str, prompts: dict[str, str | None], routes: dict[str, str | None],
                 label_column: str | None) -> None:
        import os

        import torch

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        torch.set_num_threads(1)  # Ray sets OMP threads from the actor's CPU share; be explicit
        from raytrieve.encoders import CrossEncoder, DenseEncoder, SparseEncoder

        cls = {"dense": DenseEncoder, "sparse": SparseEncoder, "cross": CrossEncoder}[kind]
        self.model = cls(model_path, device="cpu")
        self.prompts, self.routes, self.label_column = prompts, routes, label_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from raytrieve.modules import Router

        has_router = isinstance(self.model.stack[0], Router)
        out: dict[str, np.ndarray] = {}
        for column, prompt in self.prompts.items():
            module = self.model.input_module(self.routes[column] if has_router else None)
            encoded = module.tokenize_ids(list(batch[column]), prompt=prompt)
            for key, rows in encoded.items():
                out[f"{column}.{key}"] = _ragged(rows)
            if prompt and hasattr(module, "prompt_length"):
                out[f"{column}.prompt_length"] = np.full(len(batch[column]), module.prompt_length(prompt), dtype=np.int32)
        if self.label_column is not None:
            out["label"] = np.asarray(batch[self.label_column])
        return out


def _ragged(rows: list[list[int]]) -> np.ndarray:
    arr = np.empty(len(rows), dtype=object)
    for i, r in enumerate(rows):
        arr[i] = np.asarray(r, dtype=np.int32)
    return arr


def tokenized_dataset(d: DatasetConfig, fmt: str, model_path: str, kind: str, actors: int = 1, batch_size: int = 256):
    """The dataset with its text columns tokenized by an actor pool of ``actors`` tokenizers.

    Actors take half a CPU each: on a 2-CPU machine a whole-CPU actor pool starves the read
    tasks and the pipeline stalls.
    """
    from ray.data import ActorPoolStrategy

    keep = list(d.columns or []) + ([d.label_column] if d.label_column else [])
    ds = read_dataset(d, fmt).select_columns(keep)
    return ds.map_batches(
        TokenizeColumns,
        fn_constructor_kwargs={
            "model_path": model_path, "kind": kind, "prompts": column_prompts(d), "routes": column_routes(d),
            "label_column": d.label_column,
        },
        compute=ActorPoolStrategy(size=actors),
        num_cpus=0.5,
        batch_size=batch_size,
        batch_format="numpy",
    )


def collate(rows: dict[str, Any], columns: list[str], pad_id: int = 0) -> list[dict[str, Any]]:
    """One padded features dict per text column from a batch of tokenized rows."""
    import torch

    from raytrieve.modules.transformer import pad_ids

    features = []
    for column in columns:
        encoded = {k.split(".", 1)[1]: [list(r) for r in v] for k, v in rows.items()
                   if k.startswith(column + ".") and not k.endswith("prompt_length")}
        f = pad_ids(encoded, pad_id)
        if f"{column}.prompt_length" in rows:
            f["prompt_length"] = int(np.asarray(rows[f"{column}.prompt_length"])[0])
        features.append(f)
    return features
