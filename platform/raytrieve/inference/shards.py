"""The encoding job's output on disk: parquet shards, one JSON sidecar per finished shard, and
a manifest written last. No Ray here: index building and tests read shards with pyarrow alone.

    out/
      job.json                 fingerprint + settings, written when the job first starts
      part-00000.parquet       id (string), dense (fixed-size list), sparse_indices / sparse_values (lists)
      part-00000.json          rows, sha256 of the parquet file: the shard is finished
      bad_rows.parquet         every input row left out, with the reason
      manifest.json            written last: model(s), config, counts, shard list with checksums

A shard is written under a temporary name and renamed; its sidecar follows the same way. A
shard counts as finished only when its sidecar exists and the parquet file's checksum
matches it, so a job killed at any instant leaves nothing that a rerun would trust wrongly.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raytrieve._io import atomic_file, write_json
from raytrieve.errors import DataError

MANIFEST = "manifest.json"
JOB = "job.json"
BAD_ROWS = "bad_rows.parquet"
FORMAT = "raytrieve-vectors"

# numpy dtype of the dense column per precision ("binary": packed sign bits, as uint8).
DENSE_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "binary": np.uint8}


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}); delete it and run the job again") from None


def shard_table(ids: list[str], dense: np.ndarray | None,
                sparse: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> pa.Table:
    """``sparse`` is (offsets [n+1], indices, values): row i owns offsets[i]:offsets[i+1]."""
    columns: dict[str, pa.Array] = {"id": pa.array(ids, pa.string())}
    if dense is not None:
        flat = pa.array(np.ascontiguousarray(dense).reshape(-1))
        columns["dense"] = pa.FixedSizeListArray.from_arrays(flat, dense.shape[1])
    if sparse is not None:
        offsets, indices, values = sparse
        offsets = pa.array(offsets.astype(np.int32))
        columns["sparse_indices"] = pa.ListArray.from_arrays(offsets, pa.array(indices.astype(np.int32)))
        columns["sparse_values"] = pa.ListArray.from_arrays(offsets, pa.array(values.astype(np.float32)))
    return pa.table(columns)


def write_shard(out: Path, index: int, table: pa.Table, fingerprint: str) -> dict[str, Any]:
    """Write one finished shard (parquet, then its sidecar); returns the sidecar."""
    name = shard_name(index)
    target = out / f"{name}.parquet"
    with atomic_file(target) as tmp:
        pq.write_table(table, tmp)
    sidecar = {"shard": index, "file": target.name, "rows": table.num_rows, "sha256": file_sha256(target),
               "fingerprint": fingerprint}
    write_json(out / f"{name}.json", sidecar)
    return sidecar


def finished_shard(out: Path, index: int, rows: int, fingerprint: str) -> dict[str, Any] | None:
    """The sidecar of shard ``index`` if it is complete and intact, else None."""
    name = shard_name(index)
    sidecar_path, parquet = out / f"{name}.json", out / f"{name}.parquet"
    if not sidecar_path.exists() or not parquet.exists():
        return None
    try:
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError):
        return None
    if sidecar.get("fingerprint") != fingerprint or sidecar.get("rows") != rows:
        return None
    if file_sha256(parquet) != sidecar.get("sha256"):
        return None
    return sidecar


def remove_temporaries(out: Path) -> int:
    """Leftovers of a killed run (never trusted, never needed)."""
    n = 0
    for p in out.glob(".*.tmp-*"):
        p.unlink(missing_ok=True)
        n += 1
    return n


@dataclass
class Vectors:
    """Everything an encoding job wrote, in corpus order (shard by shard)."""

    manifest: dict[str, Any]
    ids: list[str]
    dense: np.ndarray | None
    sparse: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # (offsets, indices, values), CSR rows


def read_vectors(out: str | os.PathLike, verify: bool = True) -> Vectors:
    """Load a finished job's shards; with ``verify`` every shard's checksum is checked first."""
    out = Path(out)
    manifest_path = out / MANIFEST
    if not manifest_path.exists():
        raise DataError(f"{out}: no {MANIFEST}; the encoding job has not finished there (run it again to resume)")
    manifest = read_json(manifest_path)
    if manifest.get("format") != FORMAT:
        raise DataError(f"{manifest_path}: not a raytrieve encoding job manifest")
    ids: list[str] = []
    dense_parts, offsets_parts, index_parts, value_parts = [], [], [], []
    base = 0
    for shard in manifest["shards"]:
        path = out / shard["file"]
        if not path.exists():
            raise DataError(f"{path}: shard listed in the manifest is missing; run the encoding job again")
        if verify and file_sha256(path) != shard["sha256"]:
            raise DataError(f"{path}: checksum differs from the manifest (the file changed); run the job again")
        table = pq.read_table(path)
        ids.extend(table.column("id").to_pylist())
        if "dense" in table.column_names:
            col = table.column("dense").combine_chunks()
            dense_parts.append(col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size))
        if "sparse_indices" in table.column_names:
            idx = table.column("sparse_indices").combine_chunks()
            val = table.column("sparse_values").combine_chunks()
            offs = idx.offsets.to_numpy().astype(np.int64)
            offsets_parts.append(offs[1:] - offs[0] + base if offsets_parts else offs - offs[0] + base)
            index_parts.append(idx.values.to_numpy()[offs[0]: offs[-1]])
            value_parts.append(val.values.to_numpy()[offs[0]: offs[-1]])
            base += int(offs[-1] - offs[0])
    dense = np.concatenate(dense_parts) if dense_parts else None
    sparse = None
    if offsets_parts:
        sparse = (np.concatenate(offsets_parts), np.concatenate(index_parts).astype(np.int64),
                  np.concatenate(value_parts).astype(np.float32))
    if len(ids) != manifest["rows"]:
        raise DataError(f"{out}: the shards hold {len(ids)} rows, the manifest says {manifest['rows']}")
    return Vectors(manifest, ids, dense, sparse)
