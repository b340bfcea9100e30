"""The encoding job's Ray Data stages, run on the workers. Each Ray Data row is one shard, its
data in Arrow columns (lists of ids, texts, token ids), never JSON or pickled blobs.

- ``scan_shards`` (tasks): a shard's input row count and null/blank rows, so a ``bad_rows:
  fail`` job stops before encoding, naming bad rows by their row in the whole input;
- ``shard_ids`` (tasks): (id, position) of the valid rows, the input of the distributed
  duplicate-id check;
- ``ReadAndTokenize`` (actors that load only tokenizers): read the shard from storage, apply
  the bad-row policy, checksum its content; a shard whose finished output has the same
  checksum and job fingerprint is passed on as reused, any other is tokenized;
- ``EncodeAndWrite`` (actors with the models, a GPU each when the cluster has GPUs): encode
  by token budget and write the shard and its sidecar straight to the output store.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from raytrieve.data.sources import ShardSpec, read_shard
from raytrieve.hashing import text_hashes
from raytrieve.inference import shards
from raytrieve.inference.checks import first_positions
from raytrieve.inference.config import CorpusConfig
from raytrieve.inference.corpus import EXAMPLES, content_checksum, needed_columns, shard_rows, valid_ids
from raytrieve.model_ref import ShippedModel, local_folder

if TYPE_CHECKING:
    from raytrieve.fast_tokenizer import PortableTokenizer

BAD_ROW = pa.struct([("row", pa.int64()), ("id", pa.string()), ("reason", pa.string())])


@dataclass
class OutputSpec:
    """One model's part of the job, resolved on the driver (plain data: it travels to actors)."""

    kind: str  # "dense" | "sparse"
    model_path: str
    task: str  # Router route / prompt side
    prompt: str | None
    max_seq_length: int | None
    trust_remote_code: bool
    dtype: str = "float32"  # the compute format asked for (auto: each actor resolves it)
    # dense
    precision: str = "float32"
    truncate_dim: int | None = None
    normalize: bool = False
    ranges: list[list[float]] | None = None
    # sparse
    max_active_dims: int | None = None
    # The input tokenizer, made portable on the driver (None: a slow tokenizer, loaded by the actor)
    tokenizer: PortableTokenizer | None = None
    # The model folder as an actor on any machine reaches it (model_ref.ship, on the driver)
    shipped: ShippedModel | None = None

    def local_model_path(self) -> str:
        """On an actor: a folder of this machine holding the model."""
        return local_folder(self.shipped or self.model_path)


def _specs(batch: pa.Table) -> list[ShardSpec]:
    return [ShardSpec.from_row(r) for r in batch.to_pylist()]


def _bad_rows(bad: list[tuple[int, str | None, str]]) -> list[dict[str, Any]]:
    """Bad rows by their row in the shard (the manifest's input_rows turn it into a row of the input)."""
    return [{"row": r, "id": i, "reason": why} for r, i, why in bad]


def scan_shards(batch: pa.Table, corpus: CorpusConfig) -> pa.Table:
    out: dict[str, list[Any]] = {"shard": [], "input_rows": [], "bad": [], "examples": []}
    for spec in _specs(batch):
        rows = shard_rows(read_shard(spec, needed_columns(corpus)), corpus, spec.path, None, spec.shard)
        out["shard"].append(spec.shard)
        out["input_rows"].append(rows.input_rows)
        out["bad"].append(len(rows.bad))
        out["examples"].append(_bad_rows(rows.bad[:EXAMPLES]))
    return pa.table(
        {
            "shard": pa.array(out["shard"], pa.int64()),
            "input_rows": pa.array(out["input_rows"], pa.int64()),
            "bad": pa.array(out["bad"], pa.int64()),
            "examples": pa.array(out["examples"], pa.list_(BAD_ROW)),
        }
    )


def shard_ids(batch: pa.Table, corpus: CorpusConfig) -> pa.Table:
    parts = [
        # The title too: a row with a title and a blank text is encoded (its title alone), so it
        # counts in the duplicate check as in the encoding.
        valid_ids(read_shard(spec, needed_columns(corpus)), corpus, spec.path, spec.shard)
        for spec in _specs(batch)
    ]
    return (
        pa.concat_tables(parts)
        if parts
        else pa.table({"id": pa.array([], pa.string()), "pos": pa.array([], pa.int64())})
    )


def _thread_env(threads: int) -> None:
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads)


def _load_tokenizer(spec: OutputSpec) -> Any:
    """A slow tokenizer, through transformers (a portable one needs no loading)."""
    from raytrieve.encoders.tokenizer_only import load_input_tokenizer

    return load_input_tokenizer(
        spec.local_model_path(),
        spec.task,
        spec.max_seq_length,
        kind=spec.kind,
        trust_remote_code=spec.trust_remote_code,
    )


class ReadAndTokenize:
    """Actor: shard spec -> the shard's ids and each model's token ids (or 'reused')."""

    def __init__(
        self,
        specs: list[OutputSpec],
        corpus: CorpusConfig,
        store: shards.OutputStore,
        fingerprint: str,
        duplicates: list[Any] | None = None,
    ) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.specs, self.corpus, self.store, self.fingerprint = specs, corpus, store, fingerprint
        self.tokenizers = [s.tokenizer or _load_tokenizer(s) for s in specs]
        # The duplicate table's blocks (ObjectRefs), fetched here from the object store: each
        # repeated id's first position, one copy per actor, none through the driver.
        self.duplicates = first_positions(duplicates) if duplicates else {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for spec in _specs(batch):
            data = shard_rows(
                read_shard(spec, needed_columns(self.corpus)), self.corpus, spec.path, self.duplicates, spec.shard
            )
            checksum = content_checksum(data.ids, data.texts)
            sidecar, state = shards.finished_shard(self.store, spec.shard)
            if state == "ok" and sidecar is not None:
                # The rows left out count too: the job's manifest and read_bad_rows read them from
                # the sidecar, so a shard whose kept rows are the same but whose bad rows are not
                # (a duplicate's id now null, a blank row added) is written again, not reused.
                same = (
                    sidecar.get("fingerprint") == self.fingerprint
                    and sidecar.get("checksum") == checksum
                    and sidecar.get("input_rows") == data.input_rows
                    and sidecar.get("bad_rows", []) == [list(b) for b in data.bad]
                )
                state = "same" if same else "changed"
            row: dict[str, Any] = {
                "shard": spec.shard,
                "previous": state,
                "checksum": checksum,
                "ids": data.ids,
                "text_hashes": text_hashes(data.texts).tolist() if not state == "same" else [],
                "input_rows": data.input_rows,
                "bad_rows": _bad_rows(data.bad),
            }
            reuse = state == "same"
            for m, (s, tok) in enumerate(zip(self.specs, self.tokenizers)):
                encoded = tok.tokenize_ids(data.texts, prompt=s.prompt) if not reuse else {"input_ids": []}
                row[f"m{m}_input_ids"] = encoded["input_ids"]
                row[f"m{m}_token_type_ids"] = encoded.get("token_type_ids")
            rows.append(row)
        return _table(rows, len(self.specs))


def _table(rows: list[dict[str, Any]], models: int) -> pa.Table:
    ids = pa.list_(pa.int32())
    schema = pa.schema(
        [
            ("shard", pa.int64()),
            ("previous", pa.string()),
            ("checksum", pa.string()),
            ("ids", pa.list_(pa.string())),
            ("text_hashes", pa.list_(pa.int64())),
            ("input_rows", pa.int64()),
            ("bad_rows", pa.list_(BAD_ROW)),
        ]
        + [(f"m{m}_{k}", pa.list_(ids)) for m in range(models) for k in ("input_ids", "token_type_ids")]
    )
    return pa.Table.from_pylist(rows, schema=schema)


class EncodeAndWrite:
    """Actor: token ids -> vectors (length-sorted, token-budget batches) -> shard + sidecar in
    the output store. Returns only the sidecar's facts."""

    def __init__(
        self,
        specs: list[OutputSpec],
        store: shards.OutputStore,
        fingerprint: str,
        device: str,
        threads: int,
        token_budget: int,
        max_batch_size: int,
    ) -> None:
        self.specs, self.store, self.fingerprint = specs, store, fingerprint
        self.device, self.threads = device, threads
        self.token_budget, self.max_batch_size = token_budget, max_batch_size
        self._models: list[Any] | None = None
        self.node = _node_name()

    @property
    def models(self) -> list[Any]:
        """The models, loaded when the first shard needs encoding: a rerun whose shards are all
        reused (a finished job, or the finished part of a killed one) never imports torch nor
        loads a model: it holds no GPU memory and costs little more than its reads."""
        if self._models is None:
            from raytrieve.encoders import load_encoder

            _thread_env(self.threads)
            self._models = [
                load_encoder(
                    s.kind,
                    s.local_model_path(),
                    device=self.device,
                    max_seq_length=s.max_seq_length,
                    trust_remote_code=s.trust_remote_code,
                    dtype=s.dtype,
                )
                for s in self.specs
            ]
        return self._models

    def __call__(self, batch: pa.Table) -> pa.Table:
        out: dict[str, list[Any]] = {
            k: []
            for k in (
                "shard",
                "previous",
                "file",
                "rows",
                "sha256",
                "checksum",
                "input_rows",
                "bad",
                "node",
                "encode_s",
                "dtypes",
            )
        }
        for r in range(batch.num_rows):
            row = batch.slice(r, 1)
            shard, previous = int(row["shard"][0].as_py()), row["previous"][0].as_py()
            t0 = time.perf_counter()
            if previous == "same":
                sidecar = self.store.read_json(f"{shards.shard_name(shard)}.json")
            else:
                sidecar = self.encode_and_write(row, shard)
            for key in ("shard", "file", "rows", "sha256", "checksum", "input_rows", "node"):
                out[key].append(sidecar[key])
            out["previous"].append(previous)
            out["bad"].append(len(sidecar["bad_rows"]))
            out["encode_s"].append(time.perf_counter() - t0 if previous != "same" else 0.0)
            # The format each model computed this shard in (sidecars of older jobs do not say).
            out["dtypes"].append(json.dumps(sidecar.get("dtypes", {}), sort_keys=True))
        return pa.table(out)

    def encode_and_write(self, row: pa.Table, shard: int) -> dict[str, Any]:
        from raytrieve.encoders.base import Pretokenized

        ids = row["ids"][0].as_py()
        dense = sparse = None
        for m, (spec, model) in enumerate(zip(self.specs, self.models)):
            encoded = {"input_ids": row[f"m{m}_input_ids"][0].as_py()}
            types = row[f"m{m}_token_type_ids"][0].as_py()
            if types is not None:
                encoded["token_type_ids"] = types
            common = dict(
                prompt=spec.prompt,
                task=spec.task,
                batch_size=self.max_batch_size,
                token_budget=self.token_budget,
                show_progress_bar=False,
            )
            if spec.kind == "dense":
                dense = dense_output(
                    model.encode(
                        Pretokenized(encoded),
                        truncate_dim=spec.truncate_dim,
                        normalize_embeddings=spec.normalize,
                        **common,
                    ),
                    spec,
                )
            else:
                sparse = sparse_csr(model.encode(Pretokenized(encoded), max_active_dims=spec.max_active_dims, **common))
        table = shards.shard_table(ids, dense, sparse, row["text_hashes"][0].values.to_numpy())
        return shards.write_shard(
            self.store,
            shard,
            table,
            {
                "fingerprint": self.fingerprint,
                "checksum": row["checksum"][0].as_py(),
                "input_rows": int(row["input_rows"][0].as_py()),
                "node": self.node,
                "dtypes": {spec.kind: model.dtype for spec, model in zip(self.specs, self.models)},
                "bad_rows": [[b["row"], b["id"], b["reason"]] for b in row["bad_rows"][0].as_py()],
            },
        )


def _node_name() -> str:
    """The Ray node this actor runs on (its id), for the sidecar: which node wrote a shard."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray (a direct call in a test)
        return socket.gethostname()


def dense_output(emb: np.ndarray, spec: OutputSpec) -> np.ndarray:
    from raytrieve.quantization import quantize_embeddings

    if spec.precision == "float16":
        return emb.astype(np.float16)
    if spec.precision == "int8":
        return quantize_embeddings(emb, "int8", ranges=np.asarray(spec.ranges, dtype=np.float32))
    if spec.precision == "binary":
        return quantize_embeddings(emb, "ubinary")
    return emb.astype(np.float32)


def sparse_csr(emb: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A sparse COO batch -> (offsets, indices, values), each row by weight descending."""
    from raytrieve.encoders.sparse import sparse_rows

    rows = sparse_rows(emb)
    lengths = np.fromiter((len(r["indices"]) for r in rows), np.int64, len(rows))
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    if not rows:
        return offsets, np.zeros(0, np.int64), np.zeros(0, np.float32)
    return (
        offsets,
        np.concatenate([r["indices"] for r in rows]),
        np.concatenate([r["values"] for r in rows]).astype(np.float32),
    )
