"""The encoding job's output: parquet shards, one JSON sidecar per finished shard, and a
manifest written last, on local disk or any filesystem pyarrow resolves (``s3://``,
``gs://``, ``abfs://``, ``file://``). No Ray here: index building and tests read shards with
pyarrow alone.

    out/
      job.json                 fingerprint + settings, written when the job first starts
      part-00000.parquet       id (string), dense (fixed-size list), sparse_indices / sparse_values (lists)
      part-00000.json          sidecar: rows, sha256 of the parquet file, content checksum, bad rows
      manifest.json            written last, by the driver: model(s), config, counts, shard list

The worker that encodes a shard writes it: the parquet file, then its sidecar, each under a
temporary name renamed into place (local and mounted storage) or as one object put (object
stores, where a put is atomic). A shard counts as finished only when its sidecar exists and
the parquet file's checksum matches it, so a job killed at any instant leaves nothing that a
rerun would trust wrongly.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError

from raytrieve.config import Dtype, validation_messages
from raytrieve.data.files import TMP_MARK, OutputStore  # noqa: F401  (re-exported: the job names them here)
from raytrieve.data.formats import FORMATS
from raytrieve.errors import DataError, RaytrieveError
from raytrieve.index.base import FORMAT as INDEX_FORMAT
from raytrieve.inference.config import CorpusConfig

MANIFEST = "manifest.json"
JOB = "job.json"
FORMAT = "raytrieve-vectors"
SHARD_FORMAT = 2  # 2: text_hash column; part of every job's fingerprint, so old folders are not mixed in

# numpy dtype of the dense column per precision ("binary": packed sign bits, as uint8).
DENSE_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "binary": np.uint8}


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


def shard_index(name: str) -> int | None:
    stem = name.split(".", 1)[0]
    if stem.startswith("part-") and stem[5:].isdigit():
        return int(stem[5:])
    return None


def shard_table(
    ids: list[str],
    dense: np.ndarray | None,
    sparse: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    hashes: np.ndarray | None = None,
) -> pa.Table:
    """``sparse`` is (offsets [n+1], indices, values): row i owns offsets[i]:offsets[i+1].
    ``hashes``: each row's text hash (hashing.text_hashes)."""
    columns: dict[str, pa.Array] = {"id": pa.array(ids, pa.string())}
    if hashes is not None:
        columns["text_hash"] = pa.array(hashes, pa.int64())
    if dense is not None:
        flat = pa.array(np.ascontiguousarray(dense).reshape(-1))
        columns["dense"] = pa.FixedSizeListArray.from_arrays(flat, dense.shape[1])
    if sparse is not None:
        offsets, indices, values = sparse
        offsets = pa.array(offsets.astype(np.int32))
        columns["sparse_indices"] = pa.ListArray.from_arrays(offsets, pa.array(indices.astype(np.int32)))
        columns["sparse_values"] = pa.ListArray.from_arrays(offsets, pa.array(values.astype(np.float32)))
    return pa.table(columns)


def write_shard(store: OutputStore, index: int, table: pa.Table, sidecar: dict[str, Any]) -> dict[str, Any]:
    """Write one finished shard (parquet, then its sidecar); returns the sidecar."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    name = shard_name(index)
    store.write_bytes(f"{name}.parquet", data)
    sidecar = {
        "shard": index,
        "file": f"{name}.parquet",
        "rows": table.num_rows,
        "sha256": hashlib.sha256(data).hexdigest(),
        **sidecar,
    }
    store.write_json(f"{name}.json", sidecar)
    return sidecar


def finished_shard(store: OutputStore, index: int) -> tuple[dict[str, Any] | None, str]:
    """(sidecar, "ok") if shard ``index`` is complete and intact, else (None, why not)."""
    name = shard_name(index)
    try:
        sidecar = json.loads(store.read_bytes(f"{name}.json"))
    except FileNotFoundError:
        return None, "missing"
    except (ValueError, OSError):  # ValueError: not JSON, or bytes that are no text at all
        return None, "corrupt"
    if not isinstance(sidecar, dict):
        return None, "corrupt"
    try:
        data = store.read_bytes(f"{name}.parquet")
    except FileNotFoundError:
        return None, "corrupt"
    if hashlib.sha256(data).hexdigest() != sidecar.get("sha256"):
        return None, "corrupt"
    return sidecar, "ok"


def file_sha256(store: OutputStore, name: str) -> str:
    return hashlib.sha256(store.read_bytes(name)).hexdigest()


class _Record(BaseModel):
    """A part of manifest.json. Keys this version does not know are kept, not refused: a
    manifest from a newer raytrieve still reads, and ``index build`` copies it whole into
    source.json. Strict, so a hand-edited ``"rows": "12"`` is refused, not guessed."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)


class ShardEntry(_Record):
    file: str
    rows: int
    input_rows: int | None = None  # version 1 manifests have neither input_rows nor checksum
    sha256: str
    checksum: str | None = None


class ManifestCorpus(_Record):
    """Where the vectors come from, and the corpus settings they were made with."""

    path: str
    # Version 1 did not record format, files, duplicate_ids or the title settings.
    format: Literal[tuple(FORMATS)] | None = None  # pyright: ignore[reportInvalidTypeForm]  (data/formats.py's names)
    files: int | None = None
    input_rows: int
    bad_rows: int
    duplicate_ids: int | None = None
    id_column: str
    text_column: str
    title_column: str | None = CorpusConfig.model_fields["title_column"].default
    title_separator: str = CorpusConfig.model_fields["title_separator"].default

    def config(self) -> CorpusConfig:
        """The corpus as the job read it, to read its texts again (index build's documents/,
        mining's lookups)."""
        return CorpusConfig.model_validate({k: getattr(self, k) for k in CorpusConfig.model_fields})


class ModelInfo(_Record):
    """One model's part: what queries must be encoded with to search these vectors."""

    model: str
    model_path: str
    prompt: str | None
    max_seq_length: int | None
    similarity: str | None
    dtype: Dtype = "float32"  # as asked for; absent before the dtype setting, when jobs computed in float32
    # The key of the model's files (model_ref.files_key: their content, or a converted variant's
    # source); absent before 2026-12-06.
    weights: str | None = None

    def made_by(self, reference: str, folder: Path) -> bool:
        """Whether the model ``reference``, whose copy on this machine is ``folder``, made these
        vectors: its files' content is the job's (any path, any machine), or its weight files
        equal those of the job's own folder, found here unchanged (a registered copy of the
        model, whose other files differ). The same reference with other files is not: a model
        trained again into its folder encodes into another space. A shipped variant passes by its
        name (one converted on first use records the library versions that converted it, so its
        files differ between environments); a copy of one given by its path passes by equal weight
        files, against the job's folder here or this machine's conversion of it. A manifest from
        before the content was recorded goes by the reference (keys aside), the folder, or equal
        weights. Reads every byte of ``folder`` (about 1.4 GB/s on 2 cores) unless the name
        decides."""
        from raytrieve._io import redact
        from raytrieve.assets import content_fingerprint, converted_variant_key, same_model_files
        from raytrieve.model_ref import converted_variant, shipped_variant

        built = Path(self.model_path)
        if reference == self.model and shipped_variant(reference) is not None:
            return True
        if self.weights is None:
            return redact(reference) == redact(self.model) or same_model_files(folder, built)
        if content_fingerprint(folder) == self.weights:
            return True
        variant = converted_variant(self.model)
        try:
            # The job's folder here, keyed by its content, or for a converted variant by its source
            # (a manifest from before that keyed the converted files' content).
            source_key = converted_variant_key(variant) if variant is not None else None
            if built.is_dir() and self.weights in (content_fingerprint(built), source_key):
                return same_model_files(folder, built)
            # A converted variant's job made on another machine: this machine's conversion of it.
            if source_key == self.weights:
                from raytrieve.model_ref import resolve_model

                return same_model_files(folder, resolve_model(self.model))
        except (RaytrieveError, OSError):  # the variant's package is not here, or it cannot convert here
            return False
        return False

    def not_made_by(self, reference: str) -> str:
        """Why ``made_by`` said no, for a refusal: what more than the other model it knows."""
        from raytrieve._io import redact

        if self.weights is not None and redact(reference) == redact(self.model):
            return " (with other files under that name: saved again there since)"
        if self.weights is None and not Path(self.model_path).is_dir():
            return f" ({redact(self.model_path)} is not on this machine, so its weights cannot be compared)"
        return ""


# dtypes_used (what the actors chose) is each kind's last field: field order is key order on disk.
class DenseInfo(ModelInfo):
    dim: int | None
    precision: str  # a key of DENSE_DTYPES
    truncate_dim: int | None
    normalize: bool
    ranges: list[list[float]] | None  # int8: [mins, maxs], one of each per dimension, from calibration
    dtypes_used: list[str] = []  # absent before the dtype setting too


class SparseInfo(ModelInfo):
    vocab_size: int
    max_active_dims: int | None
    dtypes_used: list[str] = []


class VectorsManifest(_Record):
    """manifest.json, written last by the encoding job (version 1 before shards were planned from
    file metadata, 2 since); ``read_manifest`` reads it."""

    format: str  # FORMAT, checked before the rest is parsed
    version: int
    fingerprint: str
    corpus: ManifestCorpus
    rows: int
    side: str
    dense: DenseInfo | None = None
    sparse: SparseInfo | None = None
    shards: list[ShardEntry]
    created: str | None = None  # left out when a rerun compares its manifest with the one there

    def output(self, kind: str) -> DenseInfo | SparseInfo | None:
        """The part of the model of ``kind`` ("dense" or "sparse"); None if the job had none."""
        return {"dense": self.dense, "sparse": self.sparse}.get(kind)

    def to_json(self) -> dict[str, Any]:
        """The JSON object: the keys read or given, none filled in by a default (an old
        manifest copied into source.json stays as it was)."""
        return self.model_dump(mode="json", exclude_unset=True)


def parse_manifest(raw: Any, where: str, fix: str) -> VectorsManifest:
    """``raw`` (a manifest.json, or the copy an index folder keeps) checked and typed; a
    DataError names ``where``, each wrong key, and ``fix``."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DataError(f"{where}: not a raytrieve encoding job manifest (format must be {FORMAT!r}); {fix}")
    try:
        return VectorsManifest.model_validate(raw)
    except ValidationError as e:
        raise DataError(f"{'; '.join(validation_messages(VectorsManifest, e, where))}; {fix}") from None


def read_manifest(out: str | os.PathLike) -> VectorsManifest:
    store = OutputStore(str(out))
    if not store.exists(MANIFEST):
        if not store.exists():
            raise DataError(f"{out}: no such folder; give the output folder of an encoding job (`raytrieve encode`)")
        if not store.exists(JOB):
            raise DataError(
                f"{out}: not an encoding job's output (no {MANIFEST} or {JOB}); give the folder an encoding "
                "job (`raytrieve encode`) wrote"
            )
        raise DataError(f"{out}: no {MANIFEST}; the encoding job has not finished there (run it again to resume)")
    raw = store.read_json(MANIFEST)
    if isinstance(raw, dict) and raw.get("format") == INDEX_FORMAT:
        raise DataError(
            f"{out}: an index folder (`raytrieve index build`, DenseIndex/SparseIndex.save), not an encoding "
            "job's output; give the output_dir of `raytrieve encode` (an index is built from that)"
        )
    return parse_manifest(raw, store.describe(MANIFEST), "run the encoding job again: it writes the manifest anew")


def iter_shards(out: str | os.PathLike, verify: bool = True) -> Iterator[pa.Table]:
    """Each finished shard's table in corpus order; with ``verify`` its checksum is checked first."""
    store = OutputStore(str(out))
    for shard in read_manifest(out).shards:
        try:
            data = store.read_bytes(shard.file)
        except FileNotFoundError:
            raise DataError(
                f"{store.describe(shard.file)}: shard listed in the manifest is missing; run the encoding job again"
            ) from None
        if verify and hashlib.sha256(data).hexdigest() != shard.sha256:
            raise DataError(
                f"{store.describe(shard.file)}: checksum differs from the manifest (the file "
                "changed); run the job again"
            )
        yield pq.read_table(pa.BufferReader(data))


def read_bad_rows(out: str | os.PathLike) -> pa.Table:
    """Every input row the job left out (row in the input, id, reason), from the shard sidecars."""
    store = OutputStore(str(out))
    rows: list[list[Any]] = []
    first = 0  # the shard's first row in the whole input
    for shard in read_manifest(out).shards:
        sidecar = store.read_json(shard.file.replace(".parquet", ".json"))
        rows += [[first + r, i, why] for r, i, why in sidecar.get("bad_rows", [])]
        first += int(sidecar["input_rows"])
    return pa.table(
        {
            "row": pa.array([r[0] for r in rows], pa.int64()),
            "id": pa.array([r[1] for r in rows], pa.string()),
            "reason": pa.array([r[2] for r in rows], pa.string()),
        }
    )


def read_text_hashes(out: str | os.PathLike) -> np.ndarray | None:
    """Each row's text hash (int64, corpus order), one shard in memory at a time; None for a
    job that wrote none (an older raytrieve)."""
    parts = []
    for table in iter_shards(out):
        if "text_hash" not in table.column_names:
            return None
        parts.append(table.column("text_hash").to_numpy())
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def dense_block(table: pa.Table) -> np.ndarray:
    """A shard's dense vectors [rows, dim], in the dtype they were written in."""
    col = table.column("dense").combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)


def sparse_block(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A shard's sparse vectors as CSR: (indptr from 0, int64 [rows + 1]; indices; values)."""
    idx = table.column("sparse_indices").combine_chunks()
    val = table.column("sparse_values").combine_chunks()
    offs = idx.offsets.to_numpy().astype(np.int64)
    lo, hi = int(offs[0]), int(offs[-1])
    return offs - lo, idx.values.to_numpy()[lo:hi], val.values.to_numpy()[lo:hi]


@dataclass
class Vectors:
    """Everything an encoding job wrote, in corpus order (shard by shard)."""

    manifest: VectorsManifest
    ids: list[str]
    dense: np.ndarray | None
    sparse: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # (offsets, indices, values), CSR rows
    text_hashes: np.ndarray | None = None  # int64 per row (hashing.text_hashes)


def read_vectors(out: str | os.PathLike, verify: bool = True) -> Vectors:
    """Load a finished job's shards into memory, all at once (tests, benchmarks; `index build`
    and mining read them shard by shard: raytrieve.index.build)."""
    manifest = read_manifest(out)
    ids: list[str] = []
    dense_parts, offsets_parts, index_parts, value_parts, hash_parts = [], [], [], [], []
    base = 0
    for table in iter_shards(out, verify):
        ids.extend(table.column("id").to_pylist())
        if "text_hash" in table.column_names:
            hash_parts.append(table.column("text_hash").to_numpy())
        if "dense" in table.column_names:
            dense_parts.append(dense_block(table))
        if "sparse_indices" in table.column_names:
            offs, indices, values = sparse_block(table)
            offsets_parts.append((offs[1:] if offsets_parts else offs) + base)
            index_parts.append(indices)
            value_parts.append(values)
            base += int(offs[-1])
    dense = np.concatenate(dense_parts) if dense_parts else None
    sparse = None
    if offsets_parts:
        sparse = (
            np.concatenate(offsets_parts),
            np.concatenate(index_parts).astype(np.int64),
            np.concatenate(value_parts).astype(np.float32),
        )
    if len(ids) != manifest.rows:
        raise DataError(f"{out}: the shards hold {len(ids)} rows, the manifest says {manifest.rows}")
    for kind, held in (("dense", dense), ("sparse", sparse)):
        if held is not None and manifest.output(kind) is None:  # readers take the vectors' model from it
            raise DataError(
                f"{out}: the shards hold {kind} vectors, {MANIFEST} has no {kind!r} part; run the encoding job again"
            )
    hashes = np.concatenate(hash_parts) if len(hash_parts) == len(manifest.shards) and hash_parts else None
    return Vectors(manifest, ids, dense, sparse, hashes)
