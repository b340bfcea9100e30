"""`raytrieve index build` from an encoding job's folder of several shards, without Ray: the
indices are built one shard at a time into memory-mapped files, never from the whole corpus
in memory. Oracles: numpy brute force over the job's vectors (scores and order), and the
in-memory build of the same rows in one block (arrays equal to the byte)."""

from __future__ import annotations

import numpy as np
import pytest

from raytrieve.errors import DataError, InputError
from raytrieve.index import DenseIndex, SparseIndex
from raytrieve.index.build import IndexOptions, build_indices, load_indices
from raytrieve.index.documents import DocumentStore
from raytrieve.inference import shards

VOCAB = 50
DIM = 12
SIZES = [7, 1, 23, 0, 16]  # a shard of one row, and one whose rows were all bad rows


def _rows(rng: np.random.Generator, n: int, dtype: str):
    dense = rng.integers(-3, 4, size=(n, DIM)).astype(dtype)  # small integers: ties in every ranking
    dense[rng.random(n) < 0.1] = 0  # all-zero rows score 0 under cosine
    counts = rng.integers(0, 6, size=n)
    indices = rng.integers(0, VOCAB, size=counts.sum())  # a term may repeat in a document: summed
    values = rng.choice([0.0, 0.5, 1.0, 2.0], size=counts.sum()).astype(np.float32)  # zeros dropped
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return dense, (offsets, indices, values)


def _text(number: int, id_: str) -> str:
    return f"téxt {id_} of shard {number} ✓"


def _job(tmp_path, dtype: str = "float32", sizes=SIZES, damage=None, name: str = "vectors", hashed: bool = True):
    """A finished encoding job's folder made by hand: ``sizes`` shards, dense and sparse vectors,
    and its corpus (a folder of one parquet file per shard; shard 2 has a bad row, a null text,
    which the job left out; shard 3's rows are all bad)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raytrieve.hashing import text_hashes

    rng = np.random.default_rng(0)
    store = shards.OutputStore(str(tmp_path / name))
    corpus = tmp_path / f"{name}-corpus"
    corpus.mkdir()
    entries, first = [], 0
    for number, n in enumerate(sizes):
        ids = [f"d{first + i}" for i in range(n)]
        dense, sparse = _rows(rng, n, dtype)
        if damage is not None:
            ids, dense = damage(number, ids, dense)
        texts = [_text(number, i) for i in ids]
        rows = list(zip(ids, texts)) + ([("b3", None), ("b4", "  ")] if number == 3 else [])
        if number == 2:
            rows.insert(3, ("b2", None))
        pq.write_table(pa.table({"id": [r[0] for r in rows], "text": [r[1] for r in rows]},
                                schema=pa.schema([("id", pa.string()), ("text", pa.string())])),
                       corpus / f"part-{number}.parquet")
        table = shards.shard_table(ids, dense, sparse, text_hashes(texts) if hashed else None)
        sidecar = shards.write_shard(store, number, table, {"input_rows": len(rows), "bad_rows": []})
        entries.append({"file": sidecar["file"], "rows": n, "input_rows": len(rows), "sha256": sidecar["sha256"]})
        first += n
    model = {"model": "m", "model_path": "/m", "prompt": None, "max_seq_length": 32}
    store.write_json(shards.JOB, {"config": {"rows_per_shard": 64}})  # the plan: one shard per file
    store.write_json(shards.MANIFEST, {
        "format": "raytrieve-vectors", "version": 2, "fingerprint": "f",
        "corpus": {"path": str(corpus), "format": "parquet", "input_rows": first + 3, "bad_rows": 3,
                   "id_column": "id", "text_column": "text"},
        "rows": first, "side": "document",
        "dense": {**model, "similarity": "cosine", "dim": DIM, "precision": dtype, "truncate_dim": None,
                  "normalize": False, "ranges": None},
        "sparse": {**model, "similarity": "dot", "vocab_size": VOCAB, "max_active_dims": None},
        "shards": entries,
    })
    return tmp_path / name


def _texts(sizes) -> list[str]:
    """The texts of the rows the job encoded, in order: the oracle of documents/."""
    out, first = [], 0
    for number, n in enumerate(sizes):
        out += [_text(number, f"d{first + i}") for i in range(n)]
        first += n
    return out


@pytest.fixture
def no_whole_read(monkeypatch):
    """`index build` must not read the whole job into memory: read_vectors fails the test. The
    oracle's copy of it is returned."""
    whole = shards.read_vectors
    monkeypatch.setattr(shards, "read_vectors", lambda *a, **k: pytest.fail("the whole job was read into memory"))
    return whole


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("quantize", [None, "int8", "binary"])
def test_shard_by_shard_build_equals_one_block_and_brute_force(tmp_path, no_whole_read, dtype, quantize):
    job = _job(tmp_path, dtype)
    summary = build_indices(job, tmp_path / "index", IndexOptions(quantize=quantize))
    v = no_whole_read(job)
    assert summary["rows"] == len(v.ids) == sum(SIZES)
    built = load_indices(tmp_path / "index")
    dense, sparse = built.dense, built.sparse
    assert isinstance(dense, DenseIndex) and isinstance(sparse, SparseIndex)
    assert dense.ids == sparse.ids == v.ids

    # documents/: each row's text as the corpus has it, by row and by id; the bad rows are not there.
    want = _texts(SIZES)
    store = DocumentStore(tmp_path / "index", len(v.ids))
    assert len(store) == len(want) and store.texts(range(len(want))) == want
    assert store.lookup(v.ids[::-1]) == want[::-1] and store.lookup(["b2", "b3", "nope"]) == [None, None, None]

    # The same rows in one block, in memory: every array equal.
    one = DenseIndex.build(v.ids, v.dense, similarity="cosine", quantize=quantize)
    assert dense.vectors.dtype == np.dtype(dtype) and np.array_equal(dense.vectors, one.vectors)
    if quantize is not None:
        assert np.array_equal(dense.codes, one.codes)
        assert (dense.ranges is None) == (quantize == "binary")
        if quantize == "int8":  # the ranges are the min and max of every stored row, not a shard's
            stored = np.asarray(one.vectors, dtype=np.float32)
            np.testing.assert_array_equal(dense.ranges, np.vstack((stored.min(0), stored.max(0))))
    one_sparse = SparseIndex.from_csr(v.ids, *v.sparse, vocab_size=VOCAB)
    for name in ("term_ptr", "doc_rows", "weights"):
        assert np.array_equal(getattr(sparse, name), getattr(one_sparse, name)), name

    # Brute force over the job's vectors: scores and order (score descending, ties by lower row).
    rng = np.random.default_rng(1)
    queries = rng.integers(-3, 4, size=(6, DIM)).astype(np.float32)
    if quantize is None:
        docs = v.dense.astype(np.float32)
        docs = docs / np.where((n := np.linalg.norm(docs, axis=1, keepdims=True)) == 0, 1, n)
        docs = docs.astype(dtype).astype(np.float32)  # a float16 index stores float16 rows
        q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        got = dense.search(queries, top_k=9)
        for i, scores in enumerate(q @ docs.T):
            order = np.lexsort((np.arange(scores.size), -scores))[:9]
            assert got.rows[i].tolist() == order.tolist()
            np.testing.assert_allclose(got.scores[i], scores[order], rtol=1e-6, atol=1e-6)
    offsets, indices, values = v.sparse
    matrix = np.zeros((len(v.ids), VOCAB))
    np.add.at(matrix, (np.repeat(np.arange(len(v.ids)), np.diff(offsets)), indices), values)
    query_rows = [(np.arange(0, VOCAB, 7), np.ones(8, np.float32)), (np.array([3, 4]), np.array([1.0, 0.5]))]
    got = sparse.search(query_rows, top_k=5)
    for i, (terms, weights) in enumerate(query_rows):
        scores = matrix[:, terms] @ weights
        hits = np.flatnonzero((matrix[:, terms] != 0).any(axis=1))
        order = hits[np.lexsort((hits, -scores[hits]))][:5]
        assert got.rows[i][got.rows[i] >= 0].tolist() == order.tolist()


def test_faiss_built_shard_by_shard_equals_exact(tmp_path, no_whole_read):
    job = _job(tmp_path)
    build_indices(job, tmp_path / "index", IndexOptions(backend="faiss"))
    built = load_indices(tmp_path / "index")
    assert built.dense is not None and built.dense.backend == "faiss" and built.dense.vectors is None
    assert not (tmp_path / "index" / "dense" / "vectors.npy").exists()  # FAISS keeps its own rows
    exact = DenseIndex.build(built.dense.ids, no_whole_read(job).dense)
    queries = np.random.default_rng(2).normal(size=(5, DIM)).astype(np.float32)
    got, want = built.dense.search(queries, top_k=8), exact.search(queries, top_k=8)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-6)


def _duplicate(number, ids, dense):
    return (["d0", *ids[1:]] if number == 2 else ids), dense


def _nan(number, ids, dense):
    if number == 4:
        dense = dense.copy()
        dense[5, 3] = np.nan
    return ids, dense


@pytest.mark.parametrize(
    "damage,error,message",
    [
        (_duplicate, DataError, r"ids: 1 duplicate id\(s\), e\.g\. \['d0'\]; ids must be unique"),
        (_nan, InputError, r"part-00004\.parquet: row 36 \(id 'd36'\) contains NaN or inf"),
    ],
)
def test_a_bad_row_in_a_later_shard_is_named_and_nothing_is_written(tmp_path, damage, error, message):
    build_indices(_job(tmp_path), tmp_path / "index")
    with pytest.raises(error, match=message):
        build_indices(_job(tmp_path, damage=damage, name="damaged"), tmp_path / "index")
    assert len(load_indices(tmp_path / "index").dense) == sum(SIZES)  # the earlier index, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # no leftover
        "damaged", "damaged-corpus", "index", "vectors", "vectors-corpus"]


def test_shards_that_disagree_with_the_manifest_are_refused(tmp_path):
    job = _job(tmp_path)
    manifest = shards.OutputStore(str(job)).read_json(shards.MANIFEST)
    manifest["rows"] += 1
    shards.OutputStore(str(job)).write_json(shards.MANIFEST, manifest)
    with pytest.raises(DataError, match=r"the shards hold 47 rows, the manifest says 48"):
        build_indices(job, tmp_path / "index")
    manifest["rows"] -= 2
    shards.OutputStore(str(job)).write_json(shards.MANIFEST, manifest)
    with pytest.raises(DataError, match=r"the shards hold more than the 46 rows the manifest says"):
        build_indices(job, tmp_path / "index")
    assert not (tmp_path / "index").exists()


def test_a_corpus_changed_since_the_encoding_is_refused_not_indexed(tmp_path):
    """documents/ holds the texts the vectors were encoded from: a text edited or a row removed
    since is refused by file, id and fix (Serve would have returned and reranked the new text
    against the old vector), and nothing is written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    job = _job(tmp_path)
    part = tmp_path / "vectors-corpus" / "part-4.parquet"
    table = pq.read_table(part)
    texts = table.column("text").to_pylist()
    texts[5] = "edited"
    pq.write_table(table.set_column(1, "text", pa.array(texts)), part)
    fix = "the corpus changed since it was encoded: run the encoding job again"
    with pytest.raises(DataError, match=rf"part-4\.parquet: the text of id 'd36' \(and 0 more\) in shard 4 of the "
                                        rf"corpus is not the one encoded; {fix}"):
        build_indices(job, tmp_path / "index")
    pq.write_table(table.slice(0, 15), part)  # d46, the shard's last row, is gone
    with pytest.raises(DataError, match=rf"part-4\.parquet: id 'd46' is no longer in shard 4 of the corpus; {fix}"):
        build_indices(job, tmp_path / "index")
    assert not (tmp_path / "index").exists()
    build_indices(job, tmp_path / "index", texts=False)  # mining's index: vectors only, no texts
    assert not (tmp_path / "index" / "documents").exists()
    # Shards without text hashes (an older raytrieve) cannot vouch for a text: refused too.
    with pytest.raises(DataError, match=r"part-00000\.parquet: made by an older raytrieve \(no text hashes\); "
                                        r"encode the corpus again"):
        build_indices(_job(tmp_path, name="unhashed", hashed=False), tmp_path / "index2")
    assert not (tmp_path / "index2").exists()


def test_ids_whose_hashes_collide_are_told_apart_by_their_text(tmp_path, monkeypatch):
    """documents/ finds an id by its 64-bit hash, then compares the id itself: with a hash that
    collides for every other id, each lookup still returns its own text (and the duplicate
    check, which shares the hashes, still finds none)."""
    from raytrieve.index import base, documents

    job = _job(tmp_path)  # its shards hold the real text hashes, checked with the real function
    collide = lambda ids: np.array([len(i) % 2 for i in ids], dtype=np.int64)
    monkeypatch.setattr(base, "text_hashes", collide)  # the ids' hashes: duplicate check, documents/
    monkeypatch.setattr(documents, "text_hashes", collide)  # a lookup by id
    build_indices(job, tmp_path / "index")
    store = DocumentStore(tmp_path / "index", sum(SIZES))
    ids = [f"d{i}" for i in range(sum(SIZES))]
    assert store.lookup(ids) == _texts(SIZES) and store.lookup(["d47", "x"]) == [None, None]
