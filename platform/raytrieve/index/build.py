"""Indices from an encoding job's output: ``raytrieve index build --vectors DIR --out DIR``.

    out/
      source.json     the job's manifest (models, prompts, side, counts): what queries must be
                      encoded with to search these indices
      dense/          a DenseIndex (if the job wrote dense vectors)
      sparse/         a SparseIndex (if the job wrote sparse vectors)
      documents/      the documents' texts, read from the corpus and checked against the
                      encoding (index/documents.py): what Serve returns and reranks

The whole folder is written atomically on disk, so a failed build never leaves half an index; a
folder URI is built on disk, then replaced file by file behind ``files.INCOMPLETE``, which every
reader refuses.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raytrieve import _io
from raytrieve.errors import DataError, InputError
from raytrieve.index import base
from raytrieve.index.base import load_index
from raytrieve.index.dense import DenseBuilder, DenseIndex, index_similarity
from raytrieve.index.documents import DocumentsWriter
from raytrieve.index.sparse import SparseBuilder, SparseIndex

if TYPE_CHECKING:  # the index library imports the encoding job's modules only when it reads a job's output
    from raytrieve.inference.shards import VectorsManifest

SOURCE = "source.json"


@dataclass
class IndexOptions:
    quantize: str | None = None  # None | "int8" | "binary" (exact search over codes, float rescoring)
    backend: str = "exact"  # "exact" | "faiss"
    faiss_index: str = "flat"  # "flat" | "ivf" | "hnsw"
    faiss_params: dict[str, Any] | None = None


def build_indices(
    vectors_dir: str | Path,
    out_dir: str | Path,
    options: IndexOptions | None = None,
    kinds: tuple[str, ...] = ("dense", "sparse"),
    texts: bool = True,
) -> dict[str, Any]:
    """Build every index of ``kinds`` the job's vectors allow, and (``texts``) the folder's
    documents/ from the corpus the job encoded; returns a summary."""
    from raytrieve.data.files import OutputStore, file_uri_path, is_uri
    from raytrieve.inference.shards import read_manifest

    options = options or IndexOptions()
    # An earlier index there is replaced, nothing else; in an object store, file by file (a
    # file:// URI is a local folder, replaced atomically).
    out_dir = file_uri_path(os.fspath(out_dir))
    store = OutputStore(out_dir) if is_uri(out_dir) else None
    if store is not None:
        store.check_replaceable(SOURCE, "--out")
    else:
        _io.check_replaceable(out_dir, SOURCE, "--out")
    # Everything the manifest and the options decide, before the shards are read and verified
    # (minutes and gigabytes on a large corpus).
    manifest = read_manifest(vectors_dir)
    built = [kind for kind in kinds if manifest.output(kind) is not None]
    similarity = "cosine"
    if manifest.dense is not None and "dense" in built:
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
    if manifest.rows == 0:
        raise DataError(f"{vectors_dir}: the encoding job wrote 0 rows; there is nothing to index")
    corpus = _CorpusShards(vectors_dir) if texts else None  # the corpus's plan, checked before any shard is read
    summary: dict[str, Any] = {"out": _io.redact(str(out_dir)), "rows": manifest.rows}

    def write(folder: Path) -> None:
        summary.update(_stream_build(vectors_dir, manifest, built, folder, similarity, options, corpus))
        _io.write_json(folder / SOURCE, manifest.to_json())

    if store is None:
        with _io.atomic_directory(Path(out_dir)) as tmp:
            write(tmp)
        return summary
    with tempfile.TemporaryDirectory(prefix="raytrieve-index-") as tmp:  # built on disk, then put file by file
        write(Path(tmp))
        store.replace_with(Path(tmp))
    return summary


def _stream_build(
    vectors_dir: str | Path,
    manifest: VectorsManifest,
    kinds: list[str],
    tmp: Path,
    similarity: str,
    options: IndexOptions,
    corpus: _CorpusShards | None,
) -> dict[str, Any]:
    """The index of each of ``kinds`` into ``tmp``, one shard in memory at a time: the rows go
    straight into memory-mapped arrays (a sparse index reads the shards twice: it counts each
    term's postings, then places them). Peak memory is a shard, not the corpus. Returns what
    each index is, for the summary. ``corpus``: documents/ too, each shard's texts read from its
    corpus shard (the encoding job's plan) and checked against the job's text hashes."""
    from raytrieve.inference.shards import MANIFEST, dense_block, iter_shards, sparse_block

    for kind in kinds:
        (tmp / kind).mkdir()
    fix = "run the encoding job again"
    ids = base.IdsWriter([tmp / k for k in kinds], f"{vectors_dir}: {fix}")
    dense: DenseBuilder | None = None
    sparse = None
    if manifest.sparse is not None and "sparse" in kinds:
        sparse = SparseBuilder(manifest.rows, manifest.sparse.vocab_size, tmp / "sparse")
    documents: DocumentsWriter | None = None
    try:
        if corpus is not None:
            documents = DocumentsWriter(tmp)
        for number, table in enumerate(iter_shards(vectors_dir)):
            where = f"{vectors_dir}/{manifest.shards[number].file}"
            for kind, column in (("dense", "dense"), ("sparse", "sparse_indices")):
                held, described = column in table.column_names, manifest.output(kind) is not None
                if held and not described:  # readers take the vectors' model from it
                    raise DataError(
                        f"{vectors_dir}: the shards hold {kind} vectors, {MANIFEST} has no {kind!r} part; {fix}"
                    )
                if described and not held:
                    raise DataError(f"{where}: holds no {kind} vectors, which {MANIFEST} describes; {fix}")
            if ids.count + table.num_rows > manifest.rows:
                raise DataError(f"{vectors_dir}: the shards hold more than the {manifest.rows} rows the manifest says")
            block_ids = table.column("id").to_pylist()
            ids.add(block_ids, where)
            if documents is not None and corpus is not None:
                documents.add(block_ids, corpus.texts(number, table, block_ids, where))
            if "dense" in kinds:
                block = dense_block(table)
                if dense is None:
                    dense = DenseBuilder(
                        manifest.rows,
                        block.shape[1],
                        similarity=similarity,
                        float16=block.dtype == np.float16,
                        quantize=options.quantize,
                        backend=options.backend,
                        faiss_index=options.faiss_index,
                        faiss_params=options.faiss_params,
                        folder=tmp / "dense",
                    )
                dense.add(block, block_ids, where)
            if sparse is not None:
                sparse.count_block(*sparse_block(table), block_ids)
        if ids.count != manifest.rows:
            raise DataError(f"{vectors_dir}: the shards hold {ids.count} rows, the manifest says {manifest.rows}")
        hashes, rows = ids.close(rows=documents is not None)
        if documents is not None and rows is not None:
            documents.finish(hashes, rows)
        del hashes, rows
    except BaseException:
        try:
            ids.abort()
        finally:
            if documents is not None:
                documents.close()
        raise
    summary: dict[str, Any] = {}
    if dense is not None:
        dense.finish(None)
        summary["dense"] = {
            "dim": dense.dim,
            "similarity": similarity,
            "quantize": options.quantize,
            "backend": options.backend,
        }
    if sparse is not None:
        for table in iter_shards(vectors_dir):  # checked again: a shard that changed since is refused
            sparse.fill_block(*sparse_block(table), table.column("id").to_pylist())
        nnz = int(sparse.finish()[2].shape[0])
        SparseIndex.write_manifest(tmp / "sparse", manifest.rows, sparse.vocab_size, nnz)
        summary["sparse"] = {"vocab_size": sparse.vocab_size, "nnz": nnz}
    return summary


class _CorpusShards:
    """The corpus shards an encoding job read (its plan, from job.json), for their texts."""

    def __init__(self, vectors_dir: str | Path) -> None:
        from raytrieve.inference.lookup import EncodedCorpus

        self.encoded = EncodedCorpus.of(str(vectors_dir))

    def texts(self, number: int, table: Any, ids: list[str], where: str) -> list[str]:
        """The texts of the encoded shard ``number`` (``table``, ``ids``), in its row order."""
        from raytrieve.inference.lookup import shard_texts

        if table.num_rows == 0:
            return []
        if "text_hash" not in table.column_names:
            raise DataError(f"{where}: made by an older raytrieve (no text hashes); encode the corpus again")
        return shard_texts(self.encoded.specs[number], self.encoded.corpus, ids, table.column("text_hash").to_pylist())


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


INDEX_EXPECT = "a folder `raytrieve index build` wrote"


def local_index(folder: str | os.PathLike, pin: str | None = None) -> Path:
    """An index folder on this machine: ``folder`` itself, or, for a folder URI on an object store
    (``s3://bucket/index``), its copy in ``$RAYTRIEVE_CACHE/store``, downloaded once per content
    (``files.fetch_folder``): indices are memory-mapped, which needs a local file. ``pin``: the
    content wanted (``index_pin``, taken when a Serve app was built): a folder written again at
    the URI since is refused where this machine has no copy of the pinned one."""
    from raytrieve.data.files import fetch_folder, is_uri

    text = os.fspath(folder)
    if not is_uri(text):
        return Path(text)
    from raytrieve.assets import cache_dir

    return fetch_folder(text, cache_dir() / "store", "index", (SOURCE,), INDEX_EXPECT, pin)


def index_pin(folder: str) -> str | None:
    """For a folder URI, the key of its content now (listed, not downloaded): a Serve app built
    over it has every replica read that content (``local_index``), whenever it starts. None for
    a folder on disk, which replicas read in place."""
    from raytrieve.data.files import folder_key, is_uri

    return folder_key(folder, "index", (SOURCE,), INDEX_EXPECT) if is_uri(folder) else None


def load_indices(path: str | Path, mmap: bool = True) -> Indices:
    """The folder ``build_indices`` wrote: the job's manifest and each index, memory-mapped."""
    path = Path(path)
    source = read_source(path)
    dense = load_index(path / "dense", mmap=mmap) if (path / "dense").exists() else None
    sparse = load_index(path / "sparse", mmap=mmap) if (path / "sparse").exists() else None
    if dense is None and sparse is None:
        raise InputError(f"{path}: holds neither a dense/ nor a sparse/ index")
    if dense is not None and sparse is not None and sparse.ids == dense.ids:
        sparse.ids = dense.ids  # one job's rows: their ids are held once
    return Indices(source, dense, sparse)
