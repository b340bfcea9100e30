"""The /search pipeline (raytrieve.serve.search) without HTTP or Ray: real in-process indices
over six documents, answers compared with brute-force rankings and fusion and rerank orders
computed here by hand; what it refuses; the fusion table is what the request schema allows."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from raytrieve.index import DenseIndex, SparseIndex
from raytrieve.serve import fusion
from raytrieve.serve.schemas import Fusion, SearchRequest
from raytrieve.serve.search import Retrieval, SearchError, SearchPipeline

IDS = ["a", "b", "c", "d", "e", "f"]
TEXTS = {
    "a": "invert a square matrix",
    "b": "matrix determinant",
    "c": "sort a list in place",
    "d": "inverse of a matrix by solving",
    "e": "read a parquet file",
    "f": "the inverse of a matrix",
}
DENSE = np.array(
    [[0.9, 0.1, 0.0], [0.6, 0.5, 0.1], [0.0, 0.2, 0.9], [0.8, 0.0, 0.3], [0.1, 0.9, 0.2], [0.5, 0.6, 0.4]],
    dtype=np.float32,
)
VOCAB = 8
SPARSE = [  # (term ids, weights) per document
    ([0, 1], [1.0, 0.5]),
    ([1], [2.0]),
    ([4], [1.0]),
    ([0, 2], [2.5, 1.0]),
    ([5], [3.0]),
    ([0, 1, 2], [0.4, 0.3, 3.0]),
]
QUERY = "inverse of a matrix"
Q_DENSE = np.array([1.0, 0.2, 0.1], dtype=np.float32)
Q_SPARSE = (np.array([0, 2]), np.array([1.0, 0.5], dtype=np.float32))


def brute_force() -> dict[str, list[tuple[str, float]]]:
    """Each retriever's full ranking by score, ties to the lower row; sparse keeps only overlaps."""
    dense = DENSE @ Q_DENSE
    docs, query = np.zeros((len(IDS), VOCAB)), np.zeros(VOCAB)
    for row, (terms, weights) in enumerate(SPARSE):
        docs[row, terms] = weights
    query[Q_SPARSE[0]] = Q_SPARSE[1]
    sparse = docs @ query
    out = {}
    for name, scores in (("dense", dense), ("sparse", sparse)):
        rows = sorted(range(len(IDS)), key=lambda r: (-scores[r], r))
        out[name] = [(IDS[r], float(scores[r])) for r in rows if name == "dense" or scores[r] > 0]
    return out


def pipeline(rerank: bool = True, kinds: tuple[str, ...] = ("dense", "sparse")) -> SearchPipeline:
    dense = DenseIndex.build(IDS, DENSE, similarity="dot")
    sparse = SparseIndex.build(IDS, SPARSE, vocab_size=VOCAB)

    async def encode_dense(query: str):
        assert query == QUERY
        return Q_DENSE

    async def encode_sparse(query: str):
        return Q_SPARSE

    def searcher(index, batch):
        async def search(vector, k: int):
            hits = index.search(batch(vector), top_k=min(k, len(index)))
            return list(zip(hits.ids[0], hits.scores[0][: len(hits.ids[0])].tolist()))

        return search

    retrievers = {
        "dense": Retrieval(encode_dense, searcher(dense, lambda v: v[None, :])),
        "sparse": Retrieval(encode_sparse, searcher(sparse, lambda v: [v])),
    }

    async def lookup(ids: list[str]) -> list[str]:
        return [TEXTS[i] for i in ids]

    async def score_pairs(pairs: list[tuple[str, str]]) -> list[float]:
        return [cross_score(q, t) for q, t in pairs]

    return SearchPipeline({k: retrievers[k] for k in kinds}, lookup, score_pairs if rerank else None)


def cross_score(query: str, text: str) -> float:
    """A stand-in cross-encoder: words shared with the query, shorter texts first among equals."""
    return len(set(query.split()) & set(text.split())) - len(text) / 1000


def run(p: SearchPipeline, **request) -> dict:
    return asyncio.run(p.search(SearchRequest(query=QUERY, **request)))


def hand_rrf(lists: list[list[tuple[str, float]]], k: float) -> list[tuple[str, float]]:
    scores: dict[str, float] = {}
    first_seen: list[str] = []
    for ranked in lists:
        for rank, (doc, _) in enumerate(ranked, start=1):
            scores[doc] = scores.get(doc, 0.0) + 1 / (k + rank)
            if doc not in first_seen:
                first_seen.append(doc)
    return sorted(scores.items(), key=lambda item: (-item[1], first_seen.index(item[0])))


def test_hybrid_rrf_equals_hand_computation_with_every_stage():
    reference = brute_force()
    dense, sparse = reference["dense"][:4], reference["sparse"][:4]
    expected = hand_rrf([dense, sparse], k=10)
    answer = run(pipeline(), top_k=3, recall={"dense": 4, "sparse": 4}, fusion={"method": "rrf", "k": 10},
                 return_stages=True)
    hits = answer["hits"]
    assert [h["id"] for h in hits] == [d for d, _ in expected[:3]]
    np.testing.assert_allclose([h["score"] for h in hits], [s for _, s in expected[:3]], atol=1e-12)
    assert [h["rank"] for h in hits] == [1, 2, 3]
    for h in hits:
        assert h["text"] == TEXTS[h["id"]]
        assert h["scores"]["fusion"] == h["score"] and h["scores"]["rerank"] is None
        assert h["scores"]["dense"] == pytest.approx(dict(dense).get(h["id"]), abs=1e-6)
        assert h["scores"]["sparse"] == pytest.approx(dict(sparse).get(h["id"]), abs=1e-6)
    stages = answer["stages"]
    for name, ranked in (("dense", dense), ("sparse", sparse)):
        assert [d for d, _ in stages[name]] == [d for d, _ in ranked]
        np.testing.assert_allclose([s for _, s in stages[name]], [s for _, s in ranked], atol=1e-6)
    assert stages["fused"] == [[d, s] for d, s in expected]
    assert answer["query"] == QUERY
    assert set(answer["timings_ms"]) == {
        "encode_dense_ms", "recall_dense_ms", "encode_sparse_ms", "recall_sparse_ms", "fusion_ms"
    }


def test_convex_equals_hand_computation():
    reference = brute_force()
    lists = [reference["dense"][:5], reference["sparse"][:5]]
    normalized = []
    for ranked in lists:
        lo, hi = min(s for _, s in ranked), max(s for _, s in ranked)
        normalized.append({d: (s - lo) / (hi - lo) for d, s in ranked})
    docs = {d for ranked in lists for d, _ in ranked}
    convex = {d: 0.7 * normalized[0].get(d, 0.0) + 0.3 * normalized[1].get(d, 0.0) for d in docs}
    answer = run(pipeline(), top_k=6, recall={"dense": 5, "sparse": 5}, return_text=False,
                 fusion={"method": "convex", "dense_weight": 0.7, "sparse_weight": 0.3, "normalization": "minmax"})
    assert len(answer["hits"]) == len(docs)
    for h in answer["hits"]:
        assert h["score"] == pytest.approx(convex[h["id"]], abs=1e-6) and "text" not in h
    scores = [h["score"] for h in answer["hits"]]
    assert scores == sorted(scores, reverse=True)


def test_rerank_orders_the_fused_candidates_by_the_cross_encoder():
    reference = brute_force()
    fused = hand_rrf([reference["dense"][:4], reference["sparse"][:4]], k=60)
    candidates = [d for d, _ in fused[:3]]  # rerank_depth
    expected = sorted(candidates, key=lambda d: (-cross_score(QUERY, TEXTS[d]), candidates.index(d)))
    answer = run(pipeline(), top_k=2, recall={"dense": 4, "sparse": 4}, rerank=True, rerank_depth=3)
    hits = answer["hits"]
    assert [h["id"] for h in hits] == expected[:2]
    for h in hits:
        assert h["score"] == h["scores"]["rerank"] == pytest.approx(cross_score(QUERY, TEXTS[h["id"]]))
        assert h["scores"]["fusion"] == pytest.approx(dict(fused)[h["id"]])
    assert "rerank_ms" in answer["timings_ms"]
    # The reranker changes the order here, so the test would notice a rerank that did nothing.
    assert expected[:2] != candidates[:2]


def test_rerank_keeps_top_k_the_rest_in_fused_order():
    """top_k above the rerank depth: the reranked head, then the next fused candidates in fused
    order with their fused scores and no rerank score."""
    reference = brute_force()
    fused = hand_rrf([reference["dense"][:5], reference["sparse"][:5]], k=60)
    head = sorted([d for d, _ in fused[:2]], key=lambda d: (-cross_score(QUERY, TEXTS[d]), [x for x, _ in fused].index(d)))
    answer = run(pipeline(), top_k=5, recall={"dense": 5, "sparse": 5}, rerank=True, rerank_depth=2)
    hits = answer["hits"]
    assert len(fused) >= 5 and [h["id"] for h in hits] == head + [d for d, _ in fused[2:5]]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    for h in hits[2:]:
        assert h["scores"]["rerank"] is None and h["score"] == pytest.approx(dict(fused)[h["id"]])
    assert all(h["scores"]["rerank"] is not None for h in hits[:2])


def test_one_retriever_is_not_fused():
    dense = brute_force()["dense"]
    for p, recall in ((pipeline(kinds=("dense",)), {"dense": 3}), (pipeline(), {"dense": 3, "sparse": 0})):
        answer = run(p, top_k=3, recall=recall, fusion={"method": "convex"})
        assert [(h["id"], h["score"]) for h in answer["hits"]] == [(d, pytest.approx(s)) for d, s in dense[:3]]
        assert all(h["scores"]["fusion"] is None and h["scores"]["sparse"] is None for h in answer["hits"])


def test_what_it_cannot_serve_names_the_field():
    with pytest.raises(SearchError, match="no reranker") as e:
        run(pipeline(rerank=False), rerank=True)
    assert e.value.field == "rerank"
    with pytest.raises(SearchError, match="switched off") as e:
        run(pipeline(kinds=("sparse",)), recall={"dense": 5, "sparse": 0})
    assert e.value.field == "recall"
    # Convex weights of 0 each would give every hit score 0 (an answer of 200 that ranks nothing).
    zero = {"method": "convex", "dense_weight": 0.0, "sparse_weight": 0.0}
    with pytest.raises(SearchError, match=r"convex fusion weighs every list 0 \(dense_weight and sparse_weight\)") as e:
        run(pipeline(), recall={"dense": 3, "sparse": 3}, fusion=zero)
    assert e.value.field == "fusion"
    one = run(pipeline(), top_k=3, recall={"dense": 3, "sparse": 3}, fusion={**zero, "sparse_weight": 1.0})
    sparse = brute_force()["sparse"]
    assert [h["id"] for h in one["hits"]] == [d for d, _ in sparse[:3]]  # one list weighed: its order


def test_a_fusion_method_is_one_function_and_one_table_entry(monkeypatch):
    """The request schema allows exactly the table's methods and normalizations, and the
    pipeline dispatches through the table: a method added there is what /search runs."""
    schema = Fusion.model_json_schema()["properties"]
    assert schema["method"]["enum"] == list(fusion.METHODS)
    assert schema["normalization"]["enum"] == list(fusion.NORMALIZATIONS)

    def best_of(lists, params):  # each document's best score in any list
        best: dict[str, float] = {}
        for ranked in lists.values():
            for doc, score in ranked:
                best[doc] = max(best.get(doc, float("-inf")), score)
        return sorted(best.items(), key=lambda item: -item[1])

    monkeypatch.setitem(fusion.METHODS, "max", best_of)
    request = SearchRequest(query=QUERY, top_k=2, recall={"dense": 3, "sparse": 3})
    request.fusion.method = "max"  # the schema was built before the entry: set it past validation
    hits = asyncio.run(pipeline().search(request))["hits"]
    reference = brute_force()
    expected = best_of({k: v[:3] for k, v in reference.items()}, {})[:2]
    assert [(h["id"], h["score"]) for h in hits] == [(d, pytest.approx(s)) for d, s in expected]
    with pytest.raises(ValueError, match="fusion method must be one of"):
        fusion.fuse("nope", {"dense": reference["dense"]}, {})


def test_the_pipeline_imports_neither_ray_nor_http():
    from tests.test_boundaries import _probe

    found, chains = _probe("raytrieve.serve.search", ("ray", "fastapi", "starlette"))
    assert not found["loaded"], f"raytrieve.serve.search imported {found['loaded'][:8]}:\n{chains}"
