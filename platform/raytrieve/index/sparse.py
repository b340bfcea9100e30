"""SparseIndex: an inverted index (term-major CSR) with exact dot-product search, for SPLADE.

    rows = sparse_rows(encoder.encode_document(texts))        # [{"indices", "values"}, ...]
    index = SparseIndex.build(ids, rows, vocab_size=30522)
    hits = index.search(sparse_rows(encoder.encode_query(queries)), top_k=10)

Only documents sharing at least one (nonzero-weight) term with a query are hits: a document
with no overlap is never returned, even when fewer than top_k documents match, so a result
row can be shorter than top_k (padded with -inf / -1). Scores are summed in float64 and
returned as float32; ranking uses the float32 scores.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raytrieve import _io
from raytrieve.errors import DataError, InputError
from raytrieve.index import base
from raytrieve.index.base import SearchResult


def _torch_sparse_rows(x: Any, where: str, vocab_size: int | None = None) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """A 2-D torch sparse tensor (what ``SparseEncoder.encode`` returns by default) as one
    (indices, values) pair per row; None for anything else. Duck-typed: the index needs no torch."""
    if "sparse" not in str(getattr(x, "layout", "")):
        return None
    if x.dim() != 2:
        raise InputError(f"{where}: expected a 2-D sparse tensor (one row per text), got {x.dim()}-D")
    if vocab_size is not None and x.shape[1] != vocab_size:
        raise InputError(f"{where}: expected {vocab_size} columns (the vocabulary), got {x.shape[1]}")
    coo = x.to_sparse_coo().coalesce().cpu()  # coalesced: row-major, one entry per (row, term)
    rows, terms = coo.indices().numpy()
    values = coo.values()
    values = (values.float() if values.element_size() < 4 else values).numpy()  # numpy has no bfloat16
    bounds = np.searchsorted(rows, np.arange(x.shape[0] + 1))
    return [(terms[a:b], values[a:b]) for a, b in itertools.pairwise(bounds)]


def _pair(row: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(indices, values) from a pair or an ``{"indices", "values"}`` dict, validated."""
    if isinstance(row, dict):
        if "indices" not in row or "values" not in row:
            raise InputError(f"{where}: a dict needs keys 'indices' and 'values', got {sorted(row)}")
        row = (row["indices"], row["values"])
    try:
        indices, values = row
    except (TypeError, ValueError):
        raise InputError(f"{where}: expected an (indices, values) pair or a dict, got {type(row).__name__}") from None
    indices, values = np.asarray(indices).reshape(-1), np.asarray(values).reshape(-1)
    if indices.size and not np.issubdtype(indices.dtype, np.integer):
        raise InputError(f"{where}: indices must be integers, got dtype {indices.dtype}")
    if indices.shape != values.shape:
        raise InputError(f"{where}: {indices.size} indices but {values.size} values; they must pair up")
    return indices.astype(np.int64), values.astype(np.float64)


def _check_terms(indices: np.ndarray, values: np.ndarray, vocab_size: int, where: str) -> None:
    bad = (indices < 0) | (indices >= vocab_size)
    if bad.any():
        raise InputError(f"{where}: term id {int(indices[bad][0])} is outside the vocabulary [0, {vocab_size})")
    if not np.isfinite(values).all():
        raise InputError(f"{where}: values contain NaN or inf")


def _gather_postings(term_ptr: np.ndarray, terms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of all postings of ``terms`` in the posting arrays, and which term each came from."""
    starts, lengths = term_ptr[terms], term_ptr[terms + 1] - term_ptr[terms]
    owner = np.repeat(np.arange(terms.size), lengths)
    first = np.cumsum(lengths) - lengths
    return starts[owner] + (np.arange(lengths.sum()) - first[owner]), owner


def _postings(
    indptr: np.ndarray, indices: Any, values: Any, ids: Sequence[str], first_row: int, vocab_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One CSR block's postings, term-major with rows ascending within a term: (term, corpus row,
    float32 weight). A term repeated in a document is summed; zero weights are dropped."""
    indices, values = _pair((indices, values), "indices/values")
    if indptr.size == 0 or indptr[0] != 0 or (np.diff(indptr) < 0).any() or indptr[-1] != indices.size:
        raise InputError(f"indptr: must start at 0, never decrease and end at len(indices)={indices.size}")
    local = np.repeat(np.arange(indptr.size - 1, dtype=np.int64), np.diff(indptr))
    bad = (indices < 0) | (indices >= vocab_size)
    if bad.any():
        where = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"indices: term id {int(indices[where])} of document {ids[local[where]]!r} "
            f"is outside the vocabulary [0, {vocab_size})"
        )
    _check_terms(indices, values, vocab_size, "values")
    order = np.lexsort((local, indices))  # term-major, documents ascending within a term
    term, local, values = indices[order], local[order], values[order]
    new = np.ones(term.size, dtype=bool)
    new[1:] = (term[1:] != term[:-1]) | (local[1:] != local[:-1])
    starts = np.flatnonzero(new)
    weights = (np.add.reduceat(values, starts) if starts.size else values).astype(np.float32)
    keep = weights != 0
    return term[starts][keep], local[starts][keep] + first_row, weights[keep]


def _row_dtype(count: int) -> type:
    """The corpus rows' dtype in ``doc_rows``: int32 while it holds them (half the postings' bytes)."""
    return np.int32 if count < 2**31 else np.int64


class SparseBuilder:
    """A sparse index's term-major arrays from document-major CSR blocks given in corpus order,
    in two passes over the same blocks: ``count_block`` each (postings per term), then
    ``fill_block`` each. Only one block's postings are in memory at a time; with ``folder`` the
    arrays are that folder's memory-mapped .npy files, so the index may be larger than memory."""

    def __init__(self, count: int, vocab_size: int, folder: Path | None = None) -> None:
        self.count, self.vocab_size, self.folder = count, vocab_size, folder
        self._per_term = np.zeros(vocab_size, dtype=np.int64)
        self._rows = 0  # the rows of the pass under way
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._cursor = np.empty(0, dtype=np.int64)  # pass 2: where each term's next posting goes

    def _block(self, indptr: Any, indices: Any, values: Any, ids: Sequence[str]) -> tuple[np.ndarray, ...]:
        indptr = np.asarray(indptr).reshape(-1).astype(np.int64)
        rows = max(indptr.size - 1, 0)
        if self._rows + rows > self.count:
            raise InputError(f"sparse blocks: more than the {self.count} rows this index was sized for")
        postings = _postings(indptr, indices, values, ids, self._rows, self.vocab_size)
        self._rows += rows
        return postings

    def count_block(self, indptr: Any, indices: Any, values: Any, ids: Sequence[str]) -> None:
        term, _, _ = self._block(indptr, indices, values, ids)
        self._per_term += np.bincount(term, minlength=self.vocab_size)

    def fill_block(self, indptr: Any, indices: Any, values: Any, ids: Sequence[str]) -> None:
        if self._arrays is None:  # the first block of the second pass
            self._check_rows("counted")
            term_ptr = np.concatenate([[0], np.cumsum(self._per_term)]).astype(np.int64)
            nnz = int(term_ptr[-1])
            doc_rows = base.new_array(self.folder, "doc_rows", (nnz,), _row_dtype(self.count))
            weights = base.new_array(self.folder, "weights", (nnz,), np.float32)
            self._arrays, self._cursor, self._rows = (term_ptr, doc_rows, weights), term_ptr[:-1].copy(), 0
        term, rows, weights = self._block(indptr, indices, values, ids)
        # Each term's postings of this block follow those of the blocks before it: rows ascend.
        rank = np.arange(term.size) - np.searchsorted(term, term, side="left")
        at = self._cursor[term] + rank
        if at.size and (at >= self._arrays[0][term + 1]).any():
            raise InputError("sparse blocks: the second pass holds postings the first did not count")
        self._arrays[1][at], self._arrays[2][at] = rows, weights
        self._cursor += np.bincount(term, minlength=self.vocab_size)

    def _check_rows(self, what: str) -> None:
        if self._rows != self.count:
            raise InputError(f"sparse blocks: {what} {self._rows} rows, the index was sized for {self.count}")

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(term_ptr, doc_rows, weights), every posting in place."""
        if self._arrays is None:
            raise InputError("sparse blocks: finish() before the second pass (fill_block)")
        self._check_rows("filled")
        if not np.array_equal(self._cursor, self._arrays[0][1:]):
            raise InputError("sparse blocks: the second pass missed postings the first counted")
        for array in self._arrays[1:]:
            base.finish_array(array)
        if self.folder is not None:  # vocabulary-sized: built in memory, written whole
            base.save_array(self.folder, "term_ptr", self._arrays[0])
        return self._arrays


class SparseIndex:
    """Exact sparse dot-product search over an inverted index; see the module docstring."""

    kind = "sparse"

    def __init__(
        self, ids: Sequence[str], term_ptr: np.ndarray, doc_rows: np.ndarray, weights: np.ndarray, vocab_size: int
    ) -> None:
        # Use build(), from_csr() or load(); this only assembles validated parts.
        self.ids, self.term_ptr, self.doc_rows, self.weights = base.Ids(ids), term_ptr, doc_rows, weights
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nnz(self) -> int:
        return int(self.weights.shape[0])

    @classmethod
    def build(cls, ids: Sequence[Any], rows: Sequence[Any], vocab_size: int) -> SparseIndex:
        """``rows``: per document an (indices, values) pair or an ``{"indices", "values"}`` dict,
        or ``SparseEncoder.encode``'s sparse tensor (one row per document)."""
        converted = _torch_sparse_rows(rows, "rows", vocab_size)
        rows = rows if converted is None else converted
        ids = base.normalize_ids(ids, len(rows), what="rows")
        pairs = [_pair(r, f"rows[{i}] (id {ids[i]!r})") for i, r in enumerate(rows)]
        indptr = np.concatenate([[0], np.cumsum([p[0].size for p in pairs])]).astype(np.int64)
        indices = np.concatenate([p[0] for p in pairs]) if pairs else np.empty(0, np.int64)
        values = np.concatenate([p[1] for p in pairs]) if pairs else np.empty(0)
        return cls.from_csr(ids, indptr, indices, values, vocab_size)

    @classmethod
    def from_csr(
        cls, ids: Sequence[Any], indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, vocab_size: int
    ) -> SparseIndex:
        """Build from document-major CSR arrays (e.g. a scipy ``csr_matrix``'s indptr/indices/data).

        Zero weights are dropped; a term repeated within one document has its weights summed
        (in float64, then stored as float32; a sum of 0 is dropped too).
        """
        vocab_size = base.positive_int("vocab_size", vocab_size)
        indptr = np.asarray(indptr).reshape(-1)
        ids = base.normalize_ids(ids, max(indptr.size - 1, 0), what="rows")
        # One block: its postings, term-major, are the index (SparseBuilder places many blocks').
        term, rows, weights = _postings(indptr, indices, values, ids, 0, vocab_size)
        term_ptr = np.concatenate([[0], np.cumsum(np.bincount(term, minlength=vocab_size))]).astype(np.int64)
        return cls(ids, term_ptr, rows.astype(_row_dtype(len(ids))), weights, vocab_size)

    # ------------------------------------------------------------------ search

    def search(self, queries: Any, top_k: int = 10) -> SearchResult:
        """Exact top-k by dot product: score descending, ties by lower row; see the module docstring.

        ``queries``: a list of (indices, values) pairs or ``{"indices", "values"}`` dicts, a 2-D
        torch sparse tensor (``SparseEncoder.encode_query``'s), or any object with ``.tocsr()``
        (a scipy sparse matrix); both duck-typed, so neither torch nor scipy is needed.
        """
        k = base.positive_int("top_k", top_k)
        base.check_not_empty(len(self))
        pairs = self._prepare_queries(queries)
        scores = np.full((len(pairs), k), -np.inf, dtype=np.float32)
        rows = np.full((len(pairs), k), -1, dtype=np.int64)
        for i, (terms, q_values) in enumerate(pairs):
            hit_rows, hit_scores = self._score(terms, q_values)
            if hit_rows.size:
                s, r = base.chunk_top_k(hit_scores[None, :], k, hit_rows)
                s, r = base.sort_top_k(s, r, k)
                scores[i], rows[i] = s[0], r[0]
        return base.to_result(scores, rows, self.ids)

    def _prepare_queries(self, queries: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        converted = _torch_sparse_rows(queries, "queries", self.vocab_size)
        queries = queries if converted is None else converted
        if hasattr(queries, "tocsr"):
            csr = queries.tocsr()
            if csr.shape[1] != self.vocab_size:
                raise InputError(f"queries: expected {self.vocab_size} columns (the vocabulary), got {csr.shape[1]}")
            queries = [(csr.indices[a:b], csr.data[a:b]) for a, b in zip(csr.indptr[:-1], csr.indptr[1:])]
        if isinstance(queries, (dict, np.ndarray)) or not isinstance(queries, Sequence) or len(queries) == 0:
            raise InputError(
                "queries: expected a non-empty list of (indices, values) pairs or {'indices', 'values'} dicts"
            )
        pairs = []
        for i, query in enumerate(queries):
            terms, values = _pair(query, f"queries[{i}]")
            _check_terms(terms, values, self.vocab_size, f"queries[{i}]")
            nonzero = values != 0
            pairs.append((terms[nonzero], values[nonzero]))
        return pairs

    def _score(self, terms: np.ndarray, q_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows sharing a term with the query (ascending) and their float32 dot products."""
        positions, owner = _gather_postings(self.term_ptr, terms)
        if positions.size == 0:
            return positions, np.empty(0, dtype=np.float32)
        docs = np.asarray(self.doc_rows[positions], dtype=np.int64)
        # float32 x float32 is exact in float64, so only the sum rounds, and it rounds once at the end.
        q64 = q_values.astype(np.float32).astype(np.float64)
        products = q64[owner] * np.asarray(self.weights[positions], dtype=np.float64)
        hit_rows, inverse = np.unique(docs, return_inverse=True)
        return hit_rows, np.bincount(inverse, weights=products, minlength=hit_rows.size).astype(np.float32)

    # ------------------------------------------------------------------ disk

    def save(self, path: str | Path) -> None:
        """Write the index directory atomically (see raytrieve.index.base for the layout)."""
        with _io.atomic_directory(Path(path)) as tmp:
            base.write_ids(tmp, self.ids)
            for name in ("term_ptr", "doc_rows", "weights"):
                base.save_array(tmp, name, getattr(self, name))
            self.write_manifest(tmp, len(self), self.vocab_size, self.nnz)

    @classmethod
    def write_manifest(cls, folder: Path, count: int, vocab_size: int, nnz: int) -> None:
        base.write_manifest(folder, cls.kind, count, vocab_size=vocab_size, nnz=nnz)

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True) -> SparseIndex:
        """Open a saved index; ``mmap`` memory-maps the posting arrays."""
        path = Path(path)
        m = base.read_manifest(path, cls.kind)
        vocab, nnz = m.get("vocab_size"), m.get("nnz")
        if not isinstance(vocab, int) or vocab < 1 or not isinstance(nnz, int) or nnz < 0:
            raise DataError(f"{path / base.MANIFEST_FILE}: bad or missing 'vocab_size'/'nnz'; {base.REBUILD_HINT}")
        ids = base.read_ids(path, m["count"])
        term_ptr = base.load_array(path, "term_ptr", mmap, (vocab + 1,))
        doc_rows = base.load_array(path, "doc_rows", mmap, (nnz,))
        weights = base.load_array(path, "weights", mmap, (nnz,))
        if int(term_ptr[-1]) != nnz:
            raise DataError(f"{path / 'term_ptr.npy'}: ends at {int(term_ptr[-1])}, not nnz={nnz}; {base.REBUILD_HINT}")
        return cls(ids, term_ptr, doc_rows, weights, vocab)
