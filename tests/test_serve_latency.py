"""/search's texts come along with the recall (``Retrieval.search_with_texts``), without Ray:
the answers equal those of the lookup-only pipeline (tests/test_search.py's, checked there
against a hand-made fusion), and the lookup runs only for the texts that did not come along."""

from __future__ import annotations

import asyncio
import time

import pytest
from tests import test_search

from raytrieve.serve.schemas import SearchRequest
from raytrieve.serve.search import TEXTS_AHEAD, TEXTS_AHEAD_MAX_EXTRA, Retrieval, SearchPipeline


searched: list[float] = []


def with_texts(
    plain: SearchPipeline, shipped: int | None, asked: list[list[str]], one_call: bool = False
) -> SearchPipeline:
    """``plain``'s retrievals, their searches sending texts along (the first ``shipped`` hits'
    at most, None: as many as asked), and a lookup that records what it is asked for.
    ``one_call``: as an encoder holding its own index, encode and search in one ``recall``
    (the search times it reports: ``searched``)."""

    def ship(retrieval: Retrieval) -> Retrieval:
        async def search_with_texts(vector, k: int, n: int):
            hits = await retrieval.search(vector, k)
            first = hits[: n if shipped is None else min(n, shipped)]
            return hits, {d: test_search.TEXTS[d] for d, _ in first}

        async def recall(query: str, k: int, n: int):
            vector = await retrieval.encode(query)
            started = time.perf_counter()
            hits, texts = await search_with_texts(vector, k, n)
            searched.append((time.perf_counter() - started) * 1000)  # as ModelReplica times its search
            return hits, texts, searched[-1]

        if one_call:
            return Retrieval(recall=recall)
        return Retrieval(retrieval.encode, retrieval.search, search_with_texts)

    async def lookup(ids: list[str]) -> list[str]:
        asked.append(list(ids))
        return await plain.lookup(ids)

    return SearchPipeline({k: ship(r) for k, r in plain.retrievers.items()}, lookup, plain.rerank)


@pytest.mark.parametrize(
    "request_", [{"top_k": 5, "rerank": True, "rerank_depth": 8}, {"top_k": 4}, {"top_k": 4, "return_text": False}]
)
@pytest.mark.parametrize("shipped", [None, 1])
@pytest.mark.parametrize("one_call", [False, True])
def test_texts_sent_with_the_recall_give_the_same_answer(request_, shipped, one_call):
    plain = test_search.pipeline()
    asked: list[list[str]] = []
    fast = with_texts(plain, shipped, asked, one_call)
    want = asyncio.run(plain.search(SearchRequest(query=test_search.QUERY, **request_)))
    got = asyncio.run(fast.search(SearchRequest(query=test_search.QUERY, **request_)))
    assert got["hits"] == want["hits"]
    if request_.get("return_text", True):
        assert all(hit["text"] == test_search.TEXTS[hit["id"]] for hit in got["hits"])
    looked_up = [d for ids in asked for d in ids]
    assert len(looked_up) == len(set(looked_up))  # nothing fetched twice
    assert ("lookup_ms" in got["timings_ms"]) == bool(looked_up)
    if one_call:  # each recall's own search time is reported as recall_* (the rest as encode_*)
        reported = sorted(got["timings_ms"][f"recall_{name}_ms"] for name in plain.retrievers)
        assert reported == sorted(round(ms, 3) for ms in searched[-len(plain.retrievers) :])
    stages = asyncio.run(plain.search(SearchRequest(query=test_search.QUERY, return_stages=True, **request_)))
    needed = {h["id"] for h in got["hits"]} if request_.get("return_text", True) else set()
    if request_.get("rerank"):
        needed |= {d for d, _ in stages["stages"]["fused"][: request_["rerank_depth"]]}
    # What came along: each list's first hits, as many as the answer may show or rerank.
    shown = max(request_["top_k"] if request_.get("return_text", True) else 0, request_.get("rerank_depth", 0))
    wanted = min(TEXTS_AHEAD * shown, shown + TEXTS_AHEAD_MAX_EXTRA)
    per_list = wanted if shipped is None else min(wanted, shipped)
    sent = {d for name in plain.retrievers for d, _ in stages["stages"][name][:per_list]}
    assert set(looked_up) == needed - sent
    if shipped is not None and needed:
        assert looked_up  # this case really looks something up


def test_a_retrieval_needs_recall_or_both_encode_and_search():
    async def encode(query: str):
        return query

    with pytest.raises(TypeError, match="recall, or both encode and search"):
        Retrieval(encode)
    with pytest.raises(TypeError, match="recall, or both encode and search"):
        Retrieval()
