"""raytrieve.index: exact search equals brute force (ties included), quantized and FAISS recall,
on-disk round trips and the errors that name what is wrong. Fast: numpy, pyarrow, faiss only."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from raytrieve.errors import DataError, InputError
from raytrieve.index import DenseIndex, SearchResult, SparseIndex, load_index

# ------------------------------------------------------------------ oracles and data


def brute_force(scores: np.ndarray, k: int, hits: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Full score matrix -> (rows, scores) by score descending, lower row first; non-hits dropped."""
    nq, n = scores.shape
    rows = np.full((nq, k), -1, dtype=np.int64)
    top = np.full((nq, k), -np.inf, dtype=np.float32)
    for i in range(nq):
        cand = np.arange(n) if hits is None else np.flatnonzero(hits[i])
        order = cand[np.lexsort((cand, -scores[i, cand]))][:k]
        rows[i, : order.size], top[i, : order.size] = order, scores[i, order]
    return rows, top


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.sqrt((x * x).sum(axis=1, keepdims=True))


def tie_heavy(n: int, n_distinct: int, seed: int, dim: int = 16) -> np.ndarray:
    """Few distinct rows, each with 1, 4 or 16 entries of ±1: unit-normalizing them is exact
    (norms 1, 2, 4), so every score is exact in float32 and equal vectors tie exactly."""
    rng = np.random.default_rng(seed)
    base = np.zeros((n_distinct, dim), dtype=np.float32)
    for row in base:
        nnz = rng.choice([1, 4, 16])
        row[rng.choice(dim, nnz, replace=False)] = rng.choice([-1.0, 1.0], nnz)
    return base[rng.integers(0, n_distinct, n)]


def topical(n: int, dim: int, seed: int, spread: float = 0.5) -> np.ndarray:
    """Clustered like real embeddings: 20 topics x 10 subtopics, points around subtopics."""
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((20, dim))
    subtopics = (topics[:, None] + 0.6 * rng.standard_normal((20, 10, dim))).reshape(200, dim)
    return (subtopics[rng.integers(0, 200, n)] + spread * rng.standard_normal((n, dim))).astype(np.float32)


def ids_for(n: int) -> list[str]:
    return [f"doc-{i}" for i in range(n)]


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact)]))


def assert_same(a: SearchResult, b: SearchResult) -> None:
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert a.ids == b.ids


# ------------------------------------------------------------------ dense exact


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, 65536])
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_dense_exact_equals_brute_force_with_ties(chunk_size, similarity, dtype):
    n, k = 301, 10
    corpus = tie_heavy(n, 40, seed=1).astype(dtype)
    queries = tie_heavy(25, 25, seed=2)
    index = DenseIndex.build(ids_for(n), corpus, similarity=similarity, chunk_size=chunk_size)
    assert index.vectors.dtype == dtype
    stored = corpus.astype(np.float32)
    q = queries
    if similarity == "cosine":
        stored, q = normalize(stored), normalize(queries)
    np.testing.assert_array_equal(index.vectors.astype(np.float32), stored)
    rows, scores = brute_force(q @ stored.T, k)
    # The data must really put equal scores on both sides of the k boundary.
    full = np.sort(q @ stored.T, axis=1)[:, ::-1]
    assert (full[:, k - 1] == full[:, k]).sum() >= 10
    result = index.search(queries, top_k=k)
    np.testing.assert_array_equal(result.rows, rows)
    np.testing.assert_array_equal(result.scores, scores)
    assert result.ids == [[f"doc-{r}" for r in row] for row in rows]


@pytest.mark.parametrize("chunk_size", [3, 100, 65536])
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_dense_exact_equals_brute_force_on_float_data(chunk_size, similarity):
    rng = np.random.default_rng(3)
    corpus, queries = rng.standard_normal((777, 24)).astype(np.float32), rng.standard_normal((13, 24)).astype(np.float32)
    index = DenseIndex.build(ids_for(777), corpus, similarity=similarity, chunk_size=chunk_size)
    c, q = (normalize(corpus), normalize(queries)) if similarity == "cosine" else (corpus, queries)
    rows, scores = brute_force(q @ c.T, 10)
    result = index.search(queries, top_k=10)
    np.testing.assert_array_equal(result.rows, rows)
    np.testing.assert_allclose(result.scores, scores, rtol=1e-6, atol=1e-6)


def test_dense_top_k_beyond_corpus_pads_and_one_query_vector_works():
    corpus = np.eye(5, dtype=np.float32)
    result = DenseIndex.build(list("abcde"), corpus, similarity="dot").search(corpus[2], top_k=8)
    assert result.ids == [["c", "a", "b", "d", "e"]]
    np.testing.assert_array_equal(result.rows, [[2, 0, 1, 3, 4, -1, -1, -1]])
    np.testing.assert_array_equal(result.scores, [[1, 0, 0, 0, 0, -np.inf, -np.inf, -np.inf]])
    assert result.scores.dtype == np.float32 and result.rows.dtype == np.int64


# ------------------------------------------------------------------ quantized


@pytest.mark.parametrize(
    "quantize,dim,multiplier",
    [("int8", 64, 4), ("int8", 384, 4), ("binary", 384, 4),
     # 64 sign bits are too coarse for the default 4x (recall ~0.92 here); 10x candidates recover it.
     ("binary", 64, 10)],
)
def test_quantized_rescoring_recall_and_exact_scores(quantize, dim, multiplier):
    data = topical(5100, dim, seed=0)
    corpus, queries = data[:5000], data[5000:]
    exact = DenseIndex.build(ids_for(5000), corpus).search(queries, top_k=10)
    index = DenseIndex.build(ids_for(5000), corpus, quantize=quantize)
    result = index.search(queries, top_k=10, rescore_multiplier=multiplier)
    assert recall(result.rows, exact.rows) >= (0.99 if multiplier == 4 else 0.98)
    true_scores = np.take_along_axis(normalize(queries) @ normalize(corpus).T, result.rows, axis=1)
    np.testing.assert_allclose(result.scores, true_scores, atol=1e-5)
    assert (np.diff(result.scores, axis=1) <= 0).all()


@pytest.mark.parametrize("quantize", ["int8", "binary"])
def test_quantized_with_every_row_a_candidate_equals_exact_including_ties(quantize):
    corpus, queries = tie_heavy(200, 30, seed=4), tie_heavy(15, 15, seed=5)
    exact = DenseIndex.build(ids_for(200), corpus, similarity="dot").search(queries, top_k=7)
    index = DenseIndex.build(ids_for(200), corpus, similarity="dot", quantize=quantize, chunk_size=9)
    assert_same(index.search(queries, top_k=7, rescore_multiplier=30), exact)


def test_binary_without_rescoring_ranks_by_hamming():
    rng = np.random.default_rng(6)
    corpus, queries = rng.standard_normal((400, 20)).astype(np.float32), rng.standard_normal((9, 20)).astype(np.float32)
    index = DenseIndex.build(ids_for(400), corpus, quantize="binary", chunk_size=33)
    hamming = ((queries > 0)[:, None, :] != (corpus > 0)[None, :, :]).sum(axis=2)
    rows, scores = brute_force((20 - 2 * hamming).astype(np.float32), 10)
    result = index.search(queries, top_k=10, rescore=False)
    np.testing.assert_array_equal(result.rows, rows)
    np.testing.assert_array_equal(result.scores, scores)


def test_int8_without_rescoring_scores_dequantized_vectors():
    data = topical(1000, 32, seed=7)
    index = DenseIndex.build(ids_for(990), data[:990], quantize="int8")
    lo, hi = index.ranges
    step = (hi - lo) / 255
    dequantized = lo + (index.codes.astype(np.float32) + 128.5) * step
    expected = normalize(data[990:]) @ dequantized.T
    result = index.search(data[990:], top_k=10, rescore=False)
    np.testing.assert_allclose(result.scores, np.take_along_axis(expected, result.rows, axis=1), atol=1e-4)
    np.testing.assert_allclose(result.scores[:, -1], np.sort(expected, axis=1)[:, -10], atol=1e-4)
    # Bucket centres stay within half a bucket of the true (normalized) values.
    assert np.abs(dequantized - normalize(data[:990])).max() <= step.max() / 2 + 1e-6


# ------------------------------------------------------------------ FAISS


def test_faiss_flat_equals_exact():
    rng = np.random.default_rng(8)
    corpus, queries = rng.standard_normal((2000, 32)).astype(np.float32), rng.standard_normal((20, 32)).astype(np.float32)
    exact = DenseIndex.build(ids_for(2000), corpus).search(queries, top_k=10)
    flat = DenseIndex.build(ids_for(2000), corpus, backend="faiss").search(queries, top_k=10)
    assert flat.ids == exact.ids
    np.testing.assert_allclose(flat.scores, exact.scores, atol=1e-5)


@pytest.mark.parametrize(
    "faiss_index,params", [("ivf", {"nlist": 64, "nprobe": 8}), ("hnsw", {"M": 16, "ef_construction": 40, "ef_search": 32})]
)
def test_faiss_approximate_recall_and_round_trip(tmp_path, faiss_index, params):
    data = topical(5100, 64, seed=9)
    corpus, queries = data[:5000], data[5000:]
    exact = DenseIndex.build(ids_for(5000), corpus).search(queries, top_k=10)
    index = DenseIndex.build(ids_for(5000), corpus, backend="faiss", faiss_index=faiss_index, faiss_params=params)
    result = index.search(queries, top_k=10)
    assert recall(result.rows, exact.rows) >= 0.95
    true_scores = np.take_along_axis(normalize(queries) @ normalize(corpus).T, result.rows, axis=1)
    np.testing.assert_allclose(result.scores, true_scores, atol=1e-5)
    index.save(tmp_path / "idx")
    loaded = load_index(tmp_path / "idx")
    assert loaded.faiss_params == index.faiss_params and loaded.backend == "faiss"
    assert_same(loaded.search(queries, top_k=10), result)


def test_faiss_pads_missing_hits():
    result = DenseIndex.build(list("abc"), np.eye(3, dtype=np.float32), backend="faiss").search(np.eye(3)[:1], top_k=5)
    assert result.ids == [["a", "b", "c"]]
    np.testing.assert_array_equal(result.rows, [[0, 1, 2, -1, -1]])
    assert np.isneginf(result.scores[0, 3:]).all()


def test_faiss_missing_or_misconfigured_is_named(monkeypatch):
    with pytest.raises(InputError, match="faiss_params.*'nprobes'.*valid"):
        DenseIndex.build(["a", "b"], np.eye(2), backend="faiss", faiss_index="ivf", faiss_params={"nprobes": 2})
    # A string, 0 or a negative: a TypeError, an OverflowError, a FAISS abort (exit 134) before.
    for kind, params, least in (("ivf", {"nlist": "abc"}, 1), ("ivf", {"nprobe": -1}, 1), ("ivf", {"nlist": 0}, 1),
                                ("hnsw", {"M": 0}, 2), ("hnsw", {"ef_search": True}, 1)):
        key, value = next(iter(params.items()))
        with pytest.raises(InputError, match=rf"faiss_params\['{key}'\]={value!r} \(--faiss-param\): must be a whole number >= {least}"):
            DenseIndex.build(["a", "b"], np.eye(2), backend="faiss", faiss_index=kind, faiss_params=params)
    monkeypatch.setitem(sys.modules, "faiss", None)  # what `import faiss` does when it is not installed
    with pytest.raises(InputError, match="pip install faiss-cpu"):
        DenseIndex.build(["a", "b"], np.eye(2), backend="faiss")


# ------------------------------------------------------------------ save / load


@pytest.mark.parametrize("quantize", [None, "int8", "binary"])
def test_dense_save_load_round_trip(tmp_path, quantize):
    data = topical(620, 48, seed=10).astype(np.float16)
    index = DenseIndex.build(ids_for(600), data[:600], quantize=quantize, chunk_size=50)
    expected = index.search(data[600:], top_k=12)
    index.save(tmp_path / "idx")
    index.save(tmp_path / "idx")  # overwriting an existing index replaces it whole
    loaded = load_index(tmp_path / "idx")
    assert isinstance(loaded, DenseIndex) and isinstance(loaded.vectors, np.memmap)
    assert loaded.vectors.dtype == np.float16 and loaded.ids == index.ids and len(loaded) == 600
    assert_same(loaded.search(data[600:], top_k=12), expected)
    in_memory = DenseIndex.load(tmp_path / "idx", mmap=False)
    assert not isinstance(in_memory.vectors, np.memmap)
    assert_same(in_memory.search(data[600:], top_k=12), expected)
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["format"] == "raytrieve-index" and manifest["version"] == 1
    assert manifest["kind"] == "dense" and manifest["count"] == 600 and manifest["quantize"] == quantize


@pytest.fixture
def saved_dense(tmp_path):
    path = tmp_path / "idx"
    DenseIndex.build(["a", "b", "c"], np.eye(3, dtype=np.float32)).save(path)
    return path


@pytest.mark.parametrize(
    "damage,file",
    [
        (lambda p: (p / "manifest.json").unlink(), "manifest.json"),
        (lambda p: (p / "manifest.json").write_text("{not json"), "manifest.json"),
        (lambda p: (p / "manifest.json").write_text('{"format": "other"}'), "manifest.json"),
        (lambda p: (p / "vectors.npy").unlink(), "vectors.npy"),
        (lambda p: (p / "vectors.npy").write_bytes(b"\x93NUMPY garbage"), "vectors.npy"),
        (lambda p: (p / "ids.parquet").unlink(), "ids.parquet"),
        (lambda p: (p / "ids.parquet").write_bytes(b"not parquet"), "ids.parquet"),
    ],
)
def test_damaged_index_names_the_file(saved_dense, damage, file):
    damage(saved_dense)
    with pytest.raises(DataError, match=rf"{file}.*raytrieve index build"):
        load_index(saved_dense)


def test_wrong_kind_or_shape_or_missing_directory(saved_dense, tmp_path):
    with pytest.raises(DataError, match="is a dense index"):
        SparseIndex.load(saved_dense)
    np.save(saved_dense / "vectors.npy", np.eye(4, dtype=np.float32))
    with pytest.raises(DataError, match="vectors.npy: shape"):
        load_index(saved_dense)
    with pytest.raises(DataError, match="no such index directory"):
        load_index(tmp_path / "missing")
    faiss_path = tmp_path / "f"
    DenseIndex.build(["a", "b"], np.eye(2), backend="faiss").save(faiss_path)
    (faiss_path / "faiss.index").unlink()
    with pytest.raises(DataError, match="faiss.index.*raytrieve index build"):
        load_index(faiss_path)


# ------------------------------------------------------------------ sparse


def random_sparse(n: int, vocab: int, seed: int, integer: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        nnz = rng.integers(0, 7)
        idx = rng.integers(0, vocab, nnz)  # repeats allowed: they must be summed
        val = rng.integers(0, 4, nnz).astype(np.float32) if integer else rng.random(nnz).astype(np.float32)
        rows.append((idx, val))
    return rows


def sparse_oracle(docs, queries, vocab):
    """Dense numpy scores and overlap mask, with the index's rules (sums in float64, float32 out)."""
    d = np.zeros((len(docs), vocab))
    for i, (idx, val) in enumerate(docs):
        np.add.at(d[i], idx, val.astype(np.float64))
    d = d.astype(np.float32).astype(np.float64)
    q = np.zeros((len(queries), vocab))
    for i, (idx, val) in enumerate(queries):
        np.add.at(q[i], idx, np.asarray(val, dtype=np.float32).astype(np.float64))
    hits = ((np.abs(q) > 0).astype(np.int64) @ (d != 0).T.astype(np.int64)) > 0
    return (q @ d.T).astype(np.float32), hits, d


@pytest.mark.parametrize("integer", [True, False])
def test_sparse_exact_equals_brute_force(integer):
    vocab, k = 60, 8
    docs = random_sparse(300, 50, seed=11, integer=integer)  # terms 50..59 occur in no document
    queries = random_sparse(40, 50, seed=12, integer=integer)
    # No overlap at all; overlap through term 3 only; an empty query.
    queries += [(np.array([55]), np.array([1.0])), (np.array([3, 57]), np.array([2.0, 1.0]))]
    queries += [(np.array([], int), np.array([]))]
    index = SparseIndex.build(ids_for(300), docs, vocab_size=vocab)
    scores, hits, dense = sparse_oracle(docs, queries, vocab)
    rows, top = brute_force(scores, k, hits)
    if integer:
        assert sum(len(set(s[np.isfinite(s)])) < np.isfinite(s).sum() for s in top) > 10  # ties
    result = index.search(queries, top_k=k)
    np.testing.assert_array_equal(result.rows, rows)
    np.testing.assert_array_equal(result.scores, top)
    assert result.ids[-3] == [] and result.ids[-1] == [] and (result.rows[-3] == -1).all()
    assert [len(i) for i in result.ids] == [min(k, h.sum()) for h in hits]
    assert index.nnz == int((dense != 0).sum())  # zeros dropped, repeated terms merged


def test_sparse_input_forms_agree(tmp_path):
    import scipy.sparse as scipy_sparse  # a test dependency; the library never imports it
    docs = random_sparse(120, 40, seed=13, integer=False)
    queries = random_sparse(10, 40, seed=14, integer=False)
    from_pairs = SparseIndex.build(ids_for(120), docs, vocab_size=40)
    dicts = [{"indices": i, "values": v} for i, v in docs]
    csr = scipy_sparse.csr_matrix(
        (np.concatenate([v for _, v in docs]), np.concatenate([i for i, _ in docs]),
         np.concatenate([[0], np.cumsum([len(i) for i, _ in docs])])), shape=(120, 40))
    from_csr = SparseIndex.from_csr(ids_for(120), csr.indptr, csr.indices, csr.data, vocab_size=40)
    expected = from_pairs.search(queries, top_k=5)
    assert_same(SparseIndex.build(ids_for(120), dicts, vocab_size=40).search(queries, top_k=5), expected)
    assert_same(from_csr.search(queries, top_k=5), expected)
    q_csr = scipy_sparse.csr_matrix(
        (np.concatenate([v for _, v in queries]), np.concatenate([i for i, _ in queries]),
         np.concatenate([[0], np.cumsum([len(i) for i, _ in queries])])), shape=(10, 40))
    assert_same(from_pairs.search(q_csr, top_k=5), expected)
    assert_same(from_pairs.search([{"indices": i, "values": v} for i, v in queries], top_k=5), expected)
    # SparseEncoder.encode's default output: a 2-D torch sparse tensor (COO, or CSR), with a row
    # that has no term at all among the documents.
    import torch

    def as_torch(pairs, n):
        rows = np.concatenate([np.full(len(i), r) for r, (i, _) in enumerate(pairs)])
        coo = torch.sparse_coo_tensor(np.stack([rows, np.concatenate([i for i, _ in pairs])]),
                                      np.concatenate([v for _, v in pairs]), (n, 40))
        return coo
    def unique_terms(pairs):  # a tensor sums a row's repeated term into one entry: keep the first only
        return [(i[first], v[first]) for i, v in pairs for _, first in [np.unique(i, return_index=True)]]
    empty_doc = unique_terms([*docs[:119], (np.array([], np.int64), np.array([], np.float32))])
    one_each = unique_terms(queries)
    from_empty = SparseIndex.build(ids_for(120), empty_doc, vocab_size=40)
    t_docs = as_torch(empty_doc, 120)
    for form in (t_docs, t_docs.to_sparse_csr()):
        built = SparseIndex.build(ids_for(120), form, vocab_size=40)
        assert_same(built.search(one_each, top_k=5), from_empty.search(one_each, top_k=5))
        assert_same(built.search(as_torch(one_each, 10), top_k=5), from_empty.search(one_each, top_k=5))
    with pytest.raises(InputError, match=r"queries: expected 40 columns \(the vocabulary\), got 41"):
        from_pairs.search(torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0), (1, 41)))
    from_pairs.save(tmp_path / "s")
    loaded = load_index(tmp_path / "s")
    assert isinstance(loaded, SparseIndex) and isinstance(loaded.weights, np.memmap)
    assert_same(loaded.search(queries, top_k=5), expected)
    (tmp_path / "s" / "doc_rows.npy").unlink()
    with pytest.raises(DataError, match="doc_rows.npy.*raytrieve index build"):
        load_index(tmp_path / "s")


def test_sparse_errors_name_the_input():
    docs = [(np.array([1, 2]), np.array([1.0, 2.0])), (np.array([3]), np.array([1.0]))]
    index = SparseIndex.build(["a", "b"], docs, vocab_size=10)
    with pytest.raises(InputError, match=r"queries\[1\].*term id 99.*\[0, 10\)"):
        index.search([(np.array([1]), np.array([1.0])), (np.array([99]), np.array([1.0]))], top_k=3)
    with pytest.raises(InputError, match=r"queries\[0\].*2 indices but 1 values"):
        index.search([(np.array([1, 2]), np.array([1.0]))])
    with pytest.raises(InputError, match="top_k"):
        index.search([(np.array([1]), np.array([1.0]))], top_k=0)
    with pytest.raises(DataError, match="duplicate.*'a'"):
        SparseIndex.build(["a", "a"], docs, vocab_size=10)
    with pytest.raises(InputError, match=r"indices: term id 12 of document 'b'"):
        SparseIndex.build(["a", "b"], [docs[0], (np.array([12]), np.array([1.0]))], vocab_size=10)
    with pytest.raises(InputError, match="indptr"):
        SparseIndex.from_csr(["a", "b"], np.array([0, 2, 1]), np.array([1, 2]), np.array([1.0, 1.0]), vocab_size=10)
    with pytest.raises(InputError, match="ids: got 3 ids for 2 rows"):
        SparseIndex.build(["a", "b", "c"], docs, vocab_size=10)


# ------------------------------------------------------------------ dense input errors


def test_dense_errors_name_the_input():
    vectors = np.eye(8, dtype=np.float32)
    index = DenseIndex.build(ids_for(8), vectors)
    with pytest.raises(InputError, match=r"queries: expected dimension 8 \(the index's\), got 5"):
        index.search(np.ones((2, 5)), top_k=3)
    with pytest.raises(InputError, match="top_k must be an integer >= 1, got 0"):
        index.search(vectors, top_k=0)
    with pytest.raises(InputError, match="ids: got 7 ids for 8 vectors"):
        DenseIndex.build(ids_for(7), vectors)
    with pytest.raises(DataError, match=r"duplicate.*'doc-1'"):
        DenseIndex.build(["doc-0", "doc-1", "doc-1"], vectors[:3])
    with pytest.raises(InputError, match="ids: empty"):
        DenseIndex.build([], np.zeros((0, 8), dtype=np.float32))
    with pytest.raises(InputError, match="vectors: row 2 .*'doc-2'.* NaN"):
        DenseIndex.build(ids_for(3), np.where(np.arange(3)[:, None] == 2, np.nan, 1.0) * np.ones((3, 4)))
    with pytest.raises(InputError, match="similarity='l2'"):
        DenseIndex.build(ids_for(8), vectors, similarity="l2")
    with pytest.raises(InputError, match="rescore_multiplier"):
        DenseIndex.build(ids_for(8), vectors, quantize="int8").search(vectors, rescore_multiplier=0)


def test_ids_are_the_text_a_client_sends_back():
    """str(b"x") is "b'x'" and str(2.0) is "2.0": ids that silently no longer matched the user's."""
    vectors = np.eye(4, dtype=np.float32)
    assert DenseIndex.build([b"x", 1, np.int64(2), "y"], vectors).ids == ["x", "1", "2", "y"]
    with pytest.raises(InputError, match=r"ids: row 1 is the float 2.0; pass ids as text or integers"):
        DenseIndex.build(["a", 2.0, "c", "d"], vectors)
    with pytest.raises(InputError, match=r"ids: row 0 is bytes that are not UTF-8"):
        DenseIndex.build([b"\xff", "b", "c", "d"], vectors)
    with pytest.raises(DataError, match=r"duplicate id\(s\), e.g. \['x'\]"):
        DenseIndex.build([b"x", "x", "c", "d"], vectors)


def test_a_loaded_index_holds_its_ids_as_one_arrow_array_not_python_strings(tmp_path):
    """An index's ids cost the ids' bytes plus 8 bytes a row (one large_string Arrow array), not a
    Python list's ~60-100; they read like the list they replace: by row, slice, iteration,
    equality, and ``take`` for the hits."""
    import pyarrow as pa

    from raytrieve.index.base import Ids

    ids = [f"döc-{i}" for i in range(70_000)]  # more than one iteration block, non-ASCII
    vectors = np.random.default_rng(0).standard_normal((len(ids), 8)).astype(np.float32)
    DenseIndex.build(ids, vectors).save(tmp_path / "ix")
    loaded = load_index(tmp_path / "ix")
    assert isinstance(loaded.ids.array, pa.LargeStringArray) and not isinstance(loaded.ids, list)
    assert loaded.ids == ids and list(loaded.ids) == ids and loaded.ids != ids[::-1] and loaded.ids != ids[:-1]
    assert loaded.ids[0] == "döc-0" and loaded.ids[-1] == "döc-69999" and loaded.ids[5:8] == ids[5:8]
    assert loaded.ids.take(np.array([69_999, 0, 3])) == ["döc-69999", "döc-0", "döc-3"]
    assert Ids(pa.chunked_array([["a"], ["b", "c"]])) == Ids(["a", "b", "c"]) == ["a", "b", "c"]
    hits = loaded.search(vectors[[12_345]], top_k=1)
    assert hits.ids == [["döc-12345"]] and type(hits.ids[0][0]) is str


def test_an_index_folder_given_for_an_encoding_jobs_output_is_named_as_one(tmp_path):
    """`index build --vectors` (and mining's corpus_vectors) take an encoding job's output; an index
    folder has a manifest.json too, which was called a broken job manifest to be written again."""
    from raytrieve.errors import DataError
    from raytrieve.inference.shards import read_manifest

    DenseIndex.build(["a", "b"], np.eye(2, 4, dtype=np.float32), similarity="dot").save(tmp_path / "idx")
    with pytest.raises(DataError, match=r"idx: an index folder \(`raytrieve index build`, DenseIndex/SparseIndex.save\), "
                                        r"not an encoding job's output; give the output_dir of `raytrieve encode`"):
        read_manifest(tmp_path / "idx")
