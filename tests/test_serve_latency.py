"""Serve's latency paths without Ray.

- /search's texts come along with the recall (``Retrieval.search_with_texts``): the answers equal
  those of the lookup-only pipeline (tests/test_search.py's, checked there against a hand-made
  fusion), and the lookup runs only for the texts that did not come along.
- The model replica's lone-text rule (``single_text_float32``): a single text alone runs in
  float32 when the model computes under a half format's autocast on CPU, exactly as the
  encoder's float32 encode; texts that batch keep the model's dtype. The oracle is the same
  encoder loaded in float32 (and in bfloat16 for the batched side)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from tests import test_search

from raytrieve.config import from_dict
from raytrieve.encoders import load_encoder
from raytrieve.serve.config import DeploymentConfig
from raytrieve.serve.deployments import ModelReplica
from raytrieve.serve.schemas import SearchRequest
from raytrieve.serve.search import TEXTS_AHEAD, Retrieval, SearchPipeline

QUERY = "how do I read a csv file into a dataframe"
OTHER = "sorting a list of tuples by the second item"


def with_texts(plain: SearchPipeline, shipped: int | None, asked: list[list[str]]) -> SearchPipeline:
    """``plain``'s retrievals, their searches sending texts along (the first ``shipped`` hits'
    at most, None: as many as asked), and a lookup that records what it is asked for."""

    def ship(retrieval: Retrieval) -> Retrieval:
        async def search_with_texts(vector, k: int, n: int):
            hits = await retrieval.search(vector, k)
            first = hits[: n if shipped is None else min(n, shipped)]
            return hits, {d: test_search.TEXTS[d] for d, _ in first}

        return Retrieval(retrieval.encode, retrieval.search, search_with_texts)

    async def lookup(ids: list[str]) -> list[str]:
        asked.append(list(ids))
        return await plain.lookup(ids)

    return SearchPipeline({k: ship(r) for k, r in plain.retrievers.items()}, lookup, plain.rerank)


@pytest.mark.parametrize(
    "request_", [{"top_k": 5, "rerank": True, "rerank_depth": 8}, {"top_k": 4}, {"top_k": 4, "return_text": False}]
)
@pytest.mark.parametrize("shipped", [None, 1])
def test_texts_sent_with_the_recall_give_the_same_answer(request_, shipped):
    plain = test_search.pipeline()
    asked: list[list[str]] = []
    fast = with_texts(plain, shipped, asked)
    want = asyncio.run(plain.search(SearchRequest(query=test_search.QUERY, **request_)))
    got = asyncio.run(fast.search(SearchRequest(query=test_search.QUERY, **request_)))
    assert got["hits"] == want["hits"]
    if request_.get("return_text", True):
        assert all(hit["text"] == test_search.TEXTS[hit["id"]] for hit in got["hits"])
    looked_up = [d for ids in asked for d in ids]
    assert len(looked_up) == len(set(looked_up))  # nothing fetched twice
    assert ("lookup_ms" in got["timings_ms"]) == bool(looked_up)
    stages = asyncio.run(plain.search(SearchRequest(query=test_search.QUERY, return_stages=True, **request_)))
    needed = {h["id"] for h in got["hits"]} if request_.get("return_text", True) else set()
    if request_.get("rerank"):
        needed |= {d for d, _ in stages["stages"]["fused"][: request_["rerank_depth"]]}
    # What came along: each list's first hits, as many as the answer may show or rerank.
    shown = max(request_["top_k"] if request_.get("return_text", True) else 0, request_.get("rerank_depth", 0))
    wanted = TEXTS_AHEAD * shown
    per_list = wanted if shipped is None else min(wanted, shipped)
    sent = {d for name in plain.retrievers for d, _ in stages["stages"][name][:per_list]}
    assert set(looked_up) == needed - sent
    if shipped is not None and needed:
        assert looked_up  # this case really looks something up


def replica(kind: str, path, **spec):
    cfg = from_dict(DeploymentConfig, {"model": str(path), "num_cpus": 1, "torch_threads": 1, **spec})
    return ModelReplica.func_or_class(kind, cfg)  # the plain class under @serve.deployment


def encoder(kind: str, path, dtype: str):
    return load_encoder({"dense": "dense", "sparse": "sparse"}[kind], str(path), device="cpu", dtype=dtype)


def dense_rows(kind: str, out) -> np.ndarray:
    """Replica outputs as a dense [n, dim] array (sparse rows are (indices, values))."""
    if kind == "dense":
        return np.asarray(out, dtype=np.float32)
    width = 1 + max(int(np.max(i)) for i, _ in out if len(i))
    rows = np.zeros((len(out), width), dtype=np.float32)
    for row, (indices, values) in zip(rows, out):
        row[np.asarray(indices, dtype=np.int64)] = values
    return rows


def reference(kind: str, model, texts: list[str]) -> np.ndarray:
    if kind == "dense":
        return np.asarray(model.encode_query(texts, show_progress_bar=False), dtype=np.float32)
    return dense_rows(kind, [(r["indices"], r["values"]) for r in model.encode_query(texts, as_dicts=True)])


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_a_lone_text_runs_in_float32_and_batches_keep_the_dtype(kind, tiny_models):
    rep = replica(kind, tiny_models[kind], dtype="bfloat16")
    info = rep.describe()
    assert (info["dtype"], info["single_text_dtype"]) == ("bfloat16", "float32")
    exact = reference(kind, encoder(kind, tiny_models[kind], "float32"), [QUERY])
    half = reference(kind, encoder(kind, tiny_models[kind], "bfloat16"), [QUERY, OTHER])
    assert not np.array_equal(exact[0], half[0])  # the two formats really differ on this model

    lone, tokens = asyncio.run(rep([QUERY], "query"))
    width = exact.shape[1]
    assert np.array_equal(dense_rows(kind, lone)[:, :width], exact)
    assert tokens == [len(rep.model.input_module("query").tokenize_ids([QUERY])["input_ids"][0])]

    # A batch (what the replica's @serve.batch method runs, which needs a Serve replica around
    # it): two texts compute in the model's own bfloat16.
    both, _ = asyncio.run(rep._in_model_thread([QUERY, OTHER], "query", None))
    got = dense_rows(kind, both)
    cols = min(got.shape[1], half.shape[1])
    np.testing.assert_allclose(got[:, :cols], half[:, :cols], rtol=0, atol=1e-6)


def test_the_rule_can_be_switched_off_and_never_touches_float32_or_int8(tiny_models):
    off = replica("dense", tiny_models["dense"], dtype="bfloat16", single_text_float32=False)
    assert off.describe()["single_text_dtype"] == "bfloat16"
    lone, _ = asyncio.run(off([QUERY], "query"))
    half = reference("dense", encoder("dense", tiny_models["dense"], "bfloat16"), [QUERY])
    np.testing.assert_allclose(np.asarray(lone), half, rtol=0, atol=1e-6)
    exact = reference("dense", encoder("dense", tiny_models["dense"], "float32"), [QUERY])
    assert not np.array_equal(np.asarray(lone), exact)

    for dtype in ("float32", "int8"):
        assert replica("dense", tiny_models["dense"], dtype=dtype).describe()["single_text_dtype"] == dtype
