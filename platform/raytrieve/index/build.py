"""Indices from an encoding job's output: ``raytrieve index build --vectors DIR --out DIR``.

    out/
      source.json     the job's manifest (models, prompts, side, counts): what queries must be
                      encoded with to search these indices
      dense/          a DenseIndex (if the job wrote dense vectors)
      sparse/         a SparseIndex (if the job wrote sparse vectors)

The whole folder is written atomically, so a failed build never leaves half an index.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raytrieve import _io
from raytrieve.errors import DataError, InputError
from raytrieve.index.base import load_index
from raytrieve.index.dense import DenseIndex, index_similarity
from raytrieve.index.sparse import SparseIndex

if TYPE_CHECKING:  # the index library imports the encoding job's modules only when it reads a job's output
    from raytrieve.inference.shards import VectorsManifest

SOURCE = "source.json"


@dataclass
class IndexOptions:
    quantize: str | None = None  # None | "int8" | "binary" (exact search over codes, float rescoring)
    backend: str = "exact"  # "exact" | "faiss"
    faiss_index: str = "flat"  # "flat" | "ivf" | "hnsw"
    faiss_params: dict[str, Any] | None = None


def build_indices(vectors_dir: str | Path, out_dir: str | Path, options: IndexOptions | None = None) -> dict[str, Any]:
    """Build every index the job's vectors allow; returns a summary."""
    from raytrieve.inference.shards import read_manifest, read_vectors

    options = options or IndexOptions()
    _io.check_replaceable(out_dir, SOURCE, "--out")  # an earlier index there is replaced, nothing else
    # Everything the manifest and the options decide, before the shards are read and verified
    # (minutes and gigabytes on a large corpus).
    manifest = read_manifest(vectors_dir)
    similarity = "cosine"
    if manifest.dense is not None:
        precision = manifest.dense.precision
        if precision not in ("float32", "float16"):
            raise DataError(
                f"{vectors_dir}: dense vectors are {precision}; an index needs float32 or float16 vectors "
                "(it quantizes itself and rescores with the floats): encode with dense.precision: float32 "
                "and build with --quantize int8|binary"
            )
        similarity = index_similarity(manifest.dense.similarity, f"{vectors_dir} (dense.similarity)")
        DenseIndex.check_options(
            similarity, options.quantize, options.backend, options.faiss_index, options.faiss_params
        )
    vectors = read_vectors(vectors_dir)
    summary: dict[str, Any] = {"out": str(out_dir), "rows": len(vectors.ids)}
    with _io.atomic_directory(Path(out_dir)) as tmp:
        if vectors.dense is not None:
            dense = DenseIndex.build(
                vectors.ids,
                vectors.dense,
                similarity=similarity,
                quantize=options.quantize,
                backend=options.backend,
                faiss_index=options.faiss_index,
                faiss_params=options.faiss_params,
            )
            dense.save(tmp / "dense")
            summary["dense"] = {
                "dim": dense.dim,
                "similarity": similarity,
                "quantize": options.quantize,
                "backend": options.backend,
            }
        if vectors.sparse is not None:
            offsets, indices, values = vectors.sparse
            assert manifest.sparse is not None, "read_vectors checks that the manifest describes its sparse vectors"
            sparse = SparseIndex.from_csr(vectors.ids, offsets, indices, values, manifest.sparse.vocab_size)
            sparse.save(tmp / "sparse")
            summary["sparse"] = {"vocab_size": sparse.vocab_size, "nnz": int(sparse.nnz)}
        _io.write_json(tmp / SOURCE, manifest.to_json())
    return summary


@dataclass
class Indices:
    source: VectorsManifest
    dense: DenseIndex | None
    sparse: SparseIndex | None


def read_source(path: str | Path) -> VectorsManifest:
    """The manifest of the encoding job whose vectors the index folder ``path`` holds."""
    from raytrieve.inference.shards import parse_manifest

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such folder; give an index folder (build one with `raytrieve index build`)")
    if not (path / SOURCE).exists():
        raise DataError(f"{path}: no {SOURCE}; not an index folder (build one with `raytrieve index build`)")
    return parse_manifest(
        _io.read_json(path / SOURCE), str(path / SOURCE), "build the index again (`raytrieve index build`)"
    )


def load_indices(path: str | Path, mmap: bool = True) -> Indices:
    """The folder ``build_indices`` wrote: the job's manifest and each index, memory-mapped."""
    path = Path(path)
    source = read_source(path)
    dense = load_index(path / "dense", mmap=mmap) if (path / "dense").exists() else None
    sparse = load_index(path / "sparse", mmap=mmap) if (path / "sparse").exists() else None
    if dense is None and sparse is None:
        raise InputError(f"{path}: holds neither a dense/ nor a sparse/ index")
    return Indices(source, dense, sparse)
