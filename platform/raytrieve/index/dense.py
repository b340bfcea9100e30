"""DenseIndex: exact (chunked, memory-mapped) or FAISS search over embedding vectors.

    index = DenseIndex.build(ids, embeddings, similarity="cosine", quantize="int8")
    index.save("corpus.index")
    hits = DenseIndex.load("corpus.index").search(query_embeddings, top_k=10)

For cosine the corpus rows are L2-normalized at build and queries at search, so every score
is a dot product. Quantized indices (int8 codes or packed sign bits) pick candidates cheaply,
then rescore them exactly with the float vectors, of which only the candidate rows are read.
The FAISS backend lives in ``raytrieve.index.faiss``; this module is the exact numpy path and
the index's public face (build, search, save, load) for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raytrieve import _io
from raytrieve.errors import DataError, InputError
from raytrieve.index import base
from raytrieve.index.base import SearchResult
from raytrieve.index.faiss import FAISS_PARAMS, FaissIndex
from raytrieve.quantization import quantize_embeddings

SIMILARITIES = ("cosine", "dot")
QUANTIZATIONS = (None, "int8", "binary")
BACKENDS = ("exact", "faiss")
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def index_similarity(model_similarity: str | None, where: str) -> str:
    """What an index ranks a dense model's vectors by: the model's own similarity, cosine or dot
    (None is cosine, sentence-transformers' default). Euclidean and manhattan distances order
    vectors of unequal length otherwise than a dot product does: refused, not approximated."""
    if model_similarity in (None, "cosine"):
        return "cosine"
    if model_similarity == "dot":
        return "dot"
    raise DataError(
        f"{where}: the model's similarity is {model_similarity!r}; an index ranks by cosine or dot product only, "
        f"which order {model_similarity} distances differently. Use a model whose similarity_fn_name is cosine or "
        "dot (sentence-transformers' config_sentence_transformers.json)"
    )


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length in float32; all-zero rows stay zero (they score 0)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.sqrt((x * x).sum(axis=1, keepdims=True))
    return x / np.where(norms == 0, 1, norms)


def _check_vectors(vectors: np.ndarray, dim: int | None = None, where: str = "vectors") -> None:
    if (
        vectors.ndim != 2
        or not (np.issubdtype(vectors.dtype, np.floating) or np.issubdtype(vectors.dtype, np.integer))
        or (dim is not None and vectors.shape[1] != dim)
    ):
        want = f"[n, {dim}]" if dim is not None else "[n, dim]"
        raise InputError(
            f"{where}: expected a 2-D numeric array {want}, got shape {vectors.shape} dtype {vectors.dtype}"
        )


@dataclass
class QuantizedCodes:
    """The cheap first pass of a quantized index: int8 codes with their per-dimension
    ``ranges`` [2, dim] (lows, highs), or sign bits packed 8 dimensions a byte."""

    kind: str  # "int8" | "binary"
    codes: np.ndarray
    ranges: np.ndarray | None = None

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        kind: str,
        ranges: np.ndarray | None = None,
        folder: Path | None = None,
        chunk: int = 65536,
    ) -> QuantizedCodes:
        """Codes of ``vectors`` (an array or a memory map), ``chunk`` rows at a time; int8 uses
        ``ranges`` [2, dim], the per-dimension min and max of all rows (DenseBuilder keeps them)."""
        n, dim = vectors.shape
        if kind == "binary":
            codes = base.new_array(folder, "codes", (n, (dim + 7) // 8), np.uint8)
            for lo in range(0, n, chunk):
                codes[lo : lo + chunk] = np.packbits(np.asarray(vectors[lo : lo + chunk]) > 0, axis=1)
            base.finish_array(codes)
            return cls(kind, codes)
        if n < 2:
            raise InputError("quantize='int8' needs at least 2 vectors to set per-dimension ranges; use quantize=None")
        assert ranges is not None, "int8 codes need the rows' ranges"
        ranges = np.asarray(ranges, dtype=np.float32)
        codes = base.new_array(folder, "codes", (n, dim), np.int8)
        for lo in range(0, n, chunk):
            block = np.asarray(vectors[lo : lo + chunk], dtype=np.float32)
            codes[lo : lo + chunk] = quantize_embeddings(block, "int8", ranges=ranges)
        base.finish_array(codes)
        if folder is not None:
            base.save_array(folder, "ranges", ranges)
        return cls(kind, codes, ranges)

    def scan(self, q: np.ndarray, k: int, chunk: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of prepared queries ``q`` against the codes (quantized scores)."""
        codes, n = self.codes, self.codes.shape[0]
        if self.kind == "int8":
            ranges = self.ranges
            assert ranges is not None, "an int8 index has its ranges (build and load set them)"
            # Bucket b of dimension j stands for start_j + (b + 0.5) * step_j, and code = b - 128.
            start, step = ranges[0], (ranges[1] - ranges[0]) / 255
            q_scaled = q * step
            offset = (q @ (start + 128.5 * step))[:, None]

            def score(lo: int, hi: int) -> np.ndarray:
                return (q_scaled @ np.asarray(codes[lo:hi], dtype=np.float32).T + offset).astype(np.float32)

            return base.scan_top_k(n, q.shape[0], k, chunk, score)
        q_bits = np.packbits(q > 0, axis=1)
        width = q_bits.shape[1]
        chunk = min(chunk, max(1, (1 << 22) // (q.shape[0] * width)))  # bounds the [q, chunk, bytes] xor

        def score_bits(lo: int, hi: int) -> np.ndarray:
            xor = np.bitwise_xor(q_bits[:, None, :], np.asarray(codes[lo:hi])[None, :, :])
            hamming = _POPCOUNT[xor].sum(axis=2, dtype=np.int32)
            return (dim - 2 * hamming).astype(np.float32)

        return base.scan_top_k(n, q.shape[0], k, chunk, score_bits)


class DenseIndex:
    """Search float (or quantized) vectors by dot product; see the module docstring."""

    kind = "dense"

    def __init__(
        self,
        ids: Sequence[str],
        vectors: np.ndarray | None,
        *,
        dim: int,
        similarity: str,
        chunk_size: int = 65536,
        quantized: QuantizedCodes | None = None,
        faiss: FaissIndex | None = None,
    ) -> None:
        # Use build() or load(); this only assembles validated parts. An exact index has
        # ``vectors`` (and ``quantized`` codes when quantized); a FAISS one has only ``faiss``.
        self.ids, self.vectors, self.dim, self.similarity = base.Ids(ids), vectors, dim, similarity
        self.chunk_size, self.quantized, self.faiss = chunk_size, quantized, faiss

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def backend(self) -> str:
        return "exact" if self.faiss is None else "faiss"

    @property
    def quantize(self) -> str | None:
        return None if self.quantized is None else self.quantized.kind

    @property
    def codes(self) -> np.ndarray | None:
        return None if self.quantized is None else self.quantized.codes

    @property
    def ranges(self) -> np.ndarray | None:
        return None if self.quantized is None else self.quantized.ranges

    @property
    def faiss_index(self) -> str:
        return "flat" if self.faiss is None else self.faiss.kind

    @property
    def faiss_params(self) -> dict[str, Any]:
        return {} if self.faiss is None else self.faiss.params

    @staticmethod
    def check_options(
        similarity: str = "cosine",
        quantize: str | None = None,
        backend: str = "exact",
        faiss_index: str = "flat",
        faiss_params: dict[str, Any] | None = None,
    ) -> None:
        """``build``'s options, checked without vectors (``raytrieve index build`` checks them
        before it reads a corpus's shards)."""
        base.choice("similarity", similarity, SIMILARITIES)
        base.choice("quantize", quantize, QUANTIZATIONS)
        base.choice("backend", backend, BACKENDS)
        base.choice("faiss_index", faiss_index, tuple(FAISS_PARAMS))
        if backend == "faiss":
            if quantize is not None:
                raise InputError(
                    f"quantize {quantize} works with the exact backend only (FAISS keeps its own float32 vectors); "
                    "leave quantize out, or use the exact backend"
                )
            FaissIndex.check(faiss_index, faiss_params)
        elif faiss_params:
            raise InputError("faiss_params (--faiss-param) only applies with backend='faiss' (--backend faiss)")

    @classmethod
    def build(
        cls,
        ids: Sequence[Any],
        vectors: np.ndarray,
        similarity: str = "cosine",
        quantize: str | None = None,
        backend: str = "exact",
        faiss_index: str = "flat",
        faiss_params: dict[str, Any] | None = None,
        chunk_size: int = 65536,
    ) -> DenseIndex:
        vectors = np.asarray(vectors)
        _check_vectors(vectors)
        builder = DenseBuilder(
            vectors.shape[0],
            vectors.shape[1],
            similarity=similarity,
            float16=vectors.dtype == np.float16,
            quantize=quantize,
            backend=backend,
            faiss_index=faiss_index,
            faiss_params=faiss_params,
            chunk_size=chunk_size,
        )
        ids = base.normalize_ids(ids, vectors.shape[0])
        builder.add(vectors, ids)
        index = builder.finish(ids)
        assert index is not None, "given ids, finish returns the index"
        return index

    # ------------------------------------------------------------------ search

    def search(
        self,
        queries: np.ndarray,
        top_k: int = 10,
        *,
        rescore: bool = True,
        rescore_multiplier: int = 4,
        chunk_size: int | None = None,
    ) -> SearchResult:
        """Top-k corpus rows per query, by score descending, ties by lower row.

        Quantized indices take ``top_k * rescore_multiplier`` candidates and rescore them with
        the float vectors. With ``rescore=False`` scores are the quantized ones: for int8 the dot
        product with the bucket-centre (dequantized) vectors; for binary ``dim - 2 * hamming``,
        the dot product of the ±1 sign vectors.
        """
        k = base.positive_int("top_k", top_k)
        base.check_not_empty(len(self))
        q = self._prepare_queries(queries)
        chunk = base.positive_int("chunk_size", chunk_size if chunk_size is not None else self.chunk_size)
        if self.faiss is not None:
            scores, rows = self.faiss.search(q, k)
        elif self.quantized is None:
            scores, rows = self._batched(q, base.query_batch_size(chunk), lambda qb: self._scan_float(qb, k, chunk))
        else:
            codes = self.quantized
            width = k * base.positive_int("rescore_multiplier", rescore_multiplier) if rescore else k
            scores, rows = self._batched(
                q, base.query_batch_size(chunk), lambda qb: codes.scan(qb, width, chunk, self.dim)
            )
            if rescore:
                batch = max(1, (1 << 23) // (width * self.dim))
                scores, rows = self._batched(q, batch, lambda qb, rb: self._rescore(qb, rb, k), rows)
        return base.to_result(scores, rows, self.ids)

    def _prepare_queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[0] == 0:
            raise InputError(f"queries: expected a non-empty array [n_queries, {self.dim}], got shape {q.shape}")
        if q.shape[1] != self.dim:
            raise InputError(f"queries: expected dimension {self.dim} (the index's), got {q.shape[1]}")
        q = q.astype(np.float32)
        if not np.isfinite(q).all():
            raise InputError("queries: contain NaN or inf")
        return l2_normalize(q) if self.similarity == "cosine" else q

    @staticmethod
    def _batched(q: np.ndarray, size: int, fn: Any, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Run ``fn`` on ``size`` queries at a time (with their slice of ``rows`` when given)."""
        parts = [
            fn(q[i : i + size]) if rows is None else fn(q[i : i + size], rows[i : i + size])
            for i in range(0, q.shape[0], size)
        ]
        return np.vstack([p[0] for p in parts]), np.vstack([p[1] for p in parts])

    def _scan_float(self, q: np.ndarray, k: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        vectors = self.vectors
        assert vectors is not None, "only a FAISS index keeps no vectors of its own"

        def score(start: int, stop: int) -> np.ndarray:
            return q @ np.asarray(vectors[start:stop], dtype=np.float32).T

        return base.scan_top_k(len(self), q.shape[0], k, chunk, score)

    def _rescore(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        valid = cand >= 0
        unique = np.unique(cand[valid])
        assert self.vectors is not None, "only a FAISS index keeps no vectors of its own"
        # Fancy indexing a memmap reads only these rows; sorted rows keep the reads sequential.
        vecs = np.asarray(self.vectors[unique], dtype=np.float32)
        pos = np.searchsorted(unique, np.where(valid, cand, unique[0]))
        exact = np.matmul(vecs[pos], q[:, :, None])[:, :, 0]
        return base.sort_top_k(np.where(valid, exact, -np.inf).astype(np.float32), cand, k)

    # ------------------------------------------------------------------ disk

    def save(self, path: str | Path) -> None:
        """Write the index directory atomically (see raytrieve.index.base for the layout)."""
        with _io.atomic_directory(Path(path)) as tmp:
            base.write_ids(tmp, self.ids)
            for name in ("vectors", "codes", "ranges"):
                if getattr(self, name) is not None:
                    base.save_array(tmp, name, getattr(self, name))
            if self.faiss is not None:
                self.faiss.save(tmp)
            self.write_manifest(tmp)

    def write_manifest(self, folder: Path, count: int | None = None) -> None:
        """``manifest.json``; ``count`` for an index whose ids were streamed to disk, not held."""
        base.write_manifest(
            folder,
            self.kind,
            len(self) if count is None else count,
            dim=self.dim,
            similarity=self.similarity,
            dtype=None if self.vectors is None else str(self.vectors.dtype),
            quantize=self.quantize,
            backend=self.backend,
            faiss_index=self.faiss_index,
            faiss_params=self.faiss_params,
            chunk_size=self.chunk_size,
        )

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True) -> DenseIndex:
        """Open a saved index; ``mmap`` memory-maps the .npy arrays (FAISS indices are read whole)."""
        path = Path(path)
        m = base.read_manifest(path, cls.kind)

        def field(key: str, allowed: Sequence[Any] | None = None) -> Any:
            if key not in m or (allowed is not None and m[key] not in allowed):
                raise DataError(
                    f"{path / base.MANIFEST_FILE}: bad or missing {key!r} ({m.get(key)!r}); {base.REBUILD_HINT}"
                )
            return m[key]

        n, dim = m["count"], field("dim")
        parts = dict(dim=dim, similarity=field("similarity", SIMILARITIES), chunk_size=field("chunk_size"))
        backend, quantize = field("backend", BACKENDS), field("quantize", QUANTIZATIONS)
        ids = base.read_ids(path, n)
        if backend == "faiss":
            faiss_index, params = field("faiss_index", tuple(FAISS_PARAMS)), field("faiss_params")
            return cls(ids, None, faiss=FaissIndex.load(path, faiss_index, params, n, dim), **parts)
        vectors = base.load_array(path, "vectors", mmap, (n, dim))
        quantized = None
        if quantize == "int8":
            codes = base.load_array(path, "codes", mmap, (n, dim))
            ranges = np.asarray(base.load_array(path, "ranges", False, (2, dim)), dtype=np.float32)
            quantized = QuantizedCodes(quantize, codes, ranges)
        elif quantize == "binary":
            quantized = QuantizedCodes(quantize, base.load_array(path, "codes", mmap, (n, (dim + 7) // 8)))
        return cls(ids, vectors, quantized=quantized, **parts)


class DenseBuilder:
    """A dense index filled block by block in corpus order (``add``), then finished: quantized
    codes or the FAISS index are made from the filled rows, ``chunk_size`` rows at a time.

    With ``folder`` the arrays are memory-mapped .npy files there (the index folder's own), so
    an index larger than memory is built through the page cache: only one block is in memory.
    A FAISS index keeps its float32 rows in memory by its nature (FAISS's own copy)."""

    def __init__(
        self,
        count: int,
        dim: int,
        *,
        similarity: str = "cosine",
        float16: bool = False,
        quantize: str | None = None,
        backend: str = "exact",
        faiss_index: str = "flat",
        faiss_params: dict[str, Any] | None = None,
        chunk_size: int = 65536,
        folder: Path | None = None,
    ) -> None:
        DenseIndex.check_options(similarity, quantize, backend, faiss_index, faiss_params)
        self.chunk_size = base.positive_int("chunk_size", chunk_size)
        self.count, self.dim, self.similarity, self.quantize = count, dim, similarity, quantize
        self.backend, self.faiss_index, self.faiss_params, self.folder = backend, faiss_index, faiss_params, folder
        # float16 in, float16 stored: half the disk and page cache; scoring upcasts per chunk.
        # FAISS takes float32 rows, and keeps them itself: ours are a scratch file then.
        dtype = np.float16 if float16 and backend == "exact" else np.float32
        self.vectors = base.new_array(folder, "vectors", (count, dim), dtype)
        self.filled = 0
        # int8's ranges: the per-dimension min and max of the stored rows, kept as blocks pass.
        self._low = np.full(dim, np.inf, dtype=np.float32)
        self._high = np.full(dim, -np.inf, dtype=np.float32)

    def add(self, vectors: np.ndarray, ids: Sequence[str], where: str = "vectors") -> None:
        """The next rows (their ids name a bad row): checked finite, unit length for cosine."""
        vectors = np.asarray(vectors)
        _check_vectors(vectors, self.dim, where)
        n = vectors.shape[0]
        if self.filled + n > self.count:
            raise InputError(f"{where}: more than the {self.count} rows this index was sized for")
        v32 = vectors.astype(np.float32)
        bad = np.flatnonzero(~np.isfinite(v32).all(axis=1))
        if bad.size:
            raise InputError(
                f"{where}: row {self.filled + bad[0]} (id {ids[bad[0]]!r}) contains NaN or inf; fix the embeddings"
            )
        if self.similarity == "cosine":
            v32 = l2_normalize(v32)
        stored = v32.astype(self.vectors.dtype, copy=False)
        self.vectors[self.filled : self.filled + n] = stored
        if self.quantize == "int8" and n:
            as32 = stored.astype(np.float32, copy=False)
            np.minimum(self._low, as32.min(axis=0), out=self._low)
            np.maximum(self._high, as32.max(axis=0), out=self._high)
        self.filled += n

    def finish(self, ids: list[str] | None) -> DenseIndex | None:
        """The index over every row added. With ``folder`` and no ``ids`` (they were streamed
        there: base.IdsWriter) the folder gets the arrays and manifest, and None is returned."""
        if self.filled != self.count:
            raise InputError(f"vectors: {self.filled} rows added, the index was sized for {self.count}")
        parts: dict[str, Any] = dict(dim=self.dim, similarity=self.similarity, chunk_size=self.chunk_size)
        if self.backend == "faiss":
            faiss = FaissIndex.build(self.vectors, self.faiss_index, self.faiss_params, base.block_rows(self.dim))
            if self.folder is not None:
                del self.vectors
                (self.folder / "vectors.npy").unlink()  # scratch: FAISS holds the rows now
            return self._done(DenseIndex(ids or [], None, faiss=faiss, **parts), ids is None)
        base.finish_array(self.vectors)
        quantized = None
        if self.quantize is not None:
            ranges = np.vstack((self._low, self._high)) if self.quantize == "int8" else None
            block = base.block_rows(self.dim)
            quantized = QuantizedCodes.build(self.vectors, self.quantize, ranges, self.folder, block)
        return self._done(DenseIndex(ids or [], self.vectors, quantized=quantized, **parts), ids is None)

    def _done(self, index: DenseIndex, streamed: bool) -> DenseIndex | None:
        if not streamed:
            return index
        if self.folder is None:
            raise InputError("DenseBuilder.finish: ids are needed for an index built in memory")
        if index.faiss is not None:
            index.faiss.save(self.folder)
        index.write_manifest(self.folder, self.count)
        return None
