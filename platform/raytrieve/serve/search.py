"""The ``/search`` pipeline as a plain class: recall from each retriever, fusion, optional
cross-encoder rerank, and the answer's shape. No Ray and no HTTP here: the ingress
(serve/app.py) hands it callables over its deployment handles, a test hands it plain async
functions over in-process indices.

    pipeline = SearchPipeline(
        {"dense": Retrieval(encode=encode_query, search=dense_top_k)},
        lookup=texts_of,             # ids -> texts
        rerank=score_pairs,          # [(query, text)] -> scores, or None
    )
    answer = await pipeline.search(SearchRequest(query="inverse of a matrix", rerank=True))

Limits from the serve config (sizes, lengths) are the caller's to check; this class refuses
only what it cannot serve (rerank without a reranker, every retriever switched off), with a
SearchError that names the request field.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from raytrieve.errors import InputError
from raytrieve.serve import fusion
from raytrieve.serve.fusion import Ranked
from raytrieve.serve.schemas import SearchRequest

# How many of each list's first hits send their texts along, per text the answer shows: fusion
# lifts documents that both lists rank fairly high (RRF: ranks 30 in both beat rank 1 in one),
# and a text missing costs a lookup round trip (``lookup_ms``; BENCHMARKS.md has how often).
TEXTS_AHEAD = 4
# ... but no more than this many beyond the texts shown: a deep rerank (rerank_depth 200) would
# otherwise ship up to 800 texts per list, a cost paid in every recall for long passages.
TEXTS_AHEAD_MAX_EXTRA = 64


def texts_ahead(shown: int) -> int:
    """How many of each list's first hits send their texts along when the answer may show or
    rerank ``shown`` documents."""
    return min(TEXTS_AHEAD * shown, shown + TEXTS_AHEAD_MAX_EXTRA)


class SearchError(InputError):
    """A request this pipeline cannot serve; ``field`` is the request field to change."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Retrieval:
    """One recall stage: how the query is encoded, and how its index is searched. Either
    ``encode`` and ``search`` (two calls: the query encoder, then the index's holder), or
    ``recall`` (one call to an encoder that holds its own index)."""

    encode: Callable[[str], Awaitable[Any]] | None = None  # the query -> its vector (the model's query side)
    search: Callable[[Any, int], Awaitable[Ranked]] | None = None  # (vector, k) -> best-first (id, score)
    # Optional, for a searcher that also holds the documents' texts: (vector, k, n) -> the hits
    # and the texts of the first n of them. The answer's texts then mostly come along with the
    # recall instead of from a lookup afterwards (over Serve, one round trip less per request).
    search_with_texts: Callable[[Any, int, int], Awaitable[tuple[Ranked, Mapping[str, str]]]] | None = None
    # Optional, for an encoder that holds its own index: (query, k, n) -> the hits, the texts of
    # the first n, and the search's milliseconds, in one call instead of encode and search.
    recall: Callable[[str, int, int], Awaitable[tuple[Ranked, Mapping[str, str], float]]] | None = None

    def __post_init__(self) -> None:
        if self.recall is None and (self.encode is None or self.search is None):
            raise TypeError("a Retrieval needs recall, or both encode and search")


Lookup = Callable[[list[str]], Awaitable[Sequence[str]]]
Rerank = Callable[[list[tuple[str, str]]], Awaitable[Sequence[float]]]


class SearchPipeline:
    """Runs ``SearchRequest``s over the given retrievers. Their names ("dense", "sparse") are
    fields of the request's ``recall`` sizes and prefixes of its per-stage scores and timings."""

    def __init__(
        self,
        retrievers: Mapping[str, Retrieval],
        lookup: Lookup,
        rerank: Rerank | None = None,
        models: Mapping[str, str] | None = None,
    ) -> None:
        """``models``: the name of the model behind each stage ("dense", "sparse", "reranker"),
        which answers list under ``models`` for the stages they ran."""
        self.retrievers, self.lookup, self.rerank = dict(retrievers), lookup, rerank
        # With texts sent along, a lookup is the exception, and its time is reported (lookup_ms).
        self._texts_along = any(
            r.search_with_texts is not None or r.recall is not None for r in self.retrievers.values()
        )
        self.models = dict(models or {})

    async def search(self, request: SearchRequest) -> dict[str, Any]:
        if request.rerank and self.rerank is None:
            raise SearchError("rerank", "rerank: no reranker is served here")
        sizes = {name: getattr(request.recall, name) for name in self.retrievers}
        sizes = {name: k for name, k in sizes.items() if k > 0}
        if not sizes:
            raise SearchError("recall", "recall: every served retriever is switched off (all sizes 0)")
        timings: dict[str, float] = {}
        # The texts the answer may need: the final top_k's and the reranked candidates'. They are
        # among each list's first hits, mostly; the rest come from the lookup (``_texts``).
        shown = max(request.top_k if request.return_text else 0, request.rerank_depth if request.rerank else 0)
        wanted = texts_ahead(shown)
        known: dict[str, str] = {}
        found = await asyncio.gather(
            *(self._recall(name, request.query, k, timings, wanted, known) for name, k in sizes.items())
        )
        lists = dict(zip(sizes, found))

        started = time.perf_counter()
        # One list needs no fusion: its own scores stand, and no hit gets a fusion score.
        fused = next(iter(lists.values())) if len(lists) == 1 else self._fuse(request, lists)
        timings["fusion_ms"] = _ms_since(started)

        reranked: dict[str, float] = {}
        final = list(fused)
        head: list[tuple[str, float]] = []
        if request.rerank and fused:
            ids = [d for d, _ in fused[: request.rerank_depth]]
            candidates = await self._texts(ids, known, timings)  # timed as lookup_ms when it runs
            started = time.perf_counter()
            reranked = await self._rerank(request.query, ids, candidates)
            # Cross-encoder order; below weight 1, a share of the fused score too (hit score: the mix).
            head = fusion.interpolate(fused[: len(ids)], [reranked[d] for d in ids], request.rerank_weight)
            timings["rerank_ms"] = _ms_since(started)
            # Below the rerank depth the candidates follow in fused order with their fused scores
            # (scores.rerank null): a top_k larger than the depth still gets top_k hits.
            final = head + list(fused[request.rerank_depth :])
        final = final[: request.top_k]
        texts = await self._texts([d for d, _ in final], known, timings) if request.return_text else []
        return self._answer(request, lists, fused, reranked, head, final, texts, timings)

    async def _recall(
        self, name: str, query: str, k: int, timings: dict[str, float], wanted: int, known: dict[str, str]
    ) -> Ranked:
        retrieval = self.retrievers[name]
        started = time.perf_counter()
        if retrieval.recall is not None:
            hits, texts, search_ms = await retrieval.recall(query, k, wanted)
            known.update(texts)
            # One call: the search's own time is recall_*; the encode and the hop are encode_*.
            timings[f"encode_{name}_ms"] = max(0.0, _ms_since(started) - search_ms)
            timings[f"recall_{name}_ms"] = search_ms
            return hits
        assert retrieval.encode is not None and retrieval.search is not None, "Retrieval checks it has them"
        vector = await retrieval.encode(query)
        timings[f"encode_{name}_ms"] = _ms_since(started)
        started = time.perf_counter()
        if retrieval.search_with_texts is not None and wanted:
            hits, texts = await retrieval.search_with_texts(vector, k, wanted)
            known.update(texts)
        else:
            hits = await retrieval.search(vector, k)
        timings[f"recall_{name}_ms"] = _ms_since(started)
        return hits

    async def _texts(self, ids: list[str], known: dict[str, str], timings: dict[str, float]) -> list[str]:
        """The texts of ``ids``: those recalled along with the hits, the others looked up (the
        lookup's time, when one ran after texts came along, is ``lookup_ms``)."""
        missing = [d for d in dict.fromkeys(ids) if d not in known]
        if missing:
            started = time.perf_counter()
            known.update(zip(missing, await self.lookup(missing)))
            if self._texts_along:
                timings["lookup_ms"] = timings.get("lookup_ms", 0.0) + _ms_since(started)
        return [known[d] for d in ids]

    @staticmethod
    def _fuse(request: SearchRequest, lists: Mapping[str, Ranked]) -> Ranked:
        try:
            return fusion.fuse(request.fusion.method, lists, request.fusion.model_dump())
        except fusion.FusionParameterError as e:
            raise SearchError("fusion", f"fusion: {e}") from None

    async def _rerank(self, query: str, ids: list[str], texts: list[str]) -> dict[str, float]:
        """Each candidate's cross-encoder score (the order is ``fusion.interpolate``'s)."""
        assert self.rerank is not None, "search() refuses rerank without a reranker"
        scores = [float(s) for s in await self.rerank([(query, text) for text in texts])]
        return dict(zip(ids, scores))

    def _answer(
        self,
        request: SearchRequest,
        lists: Mapping[str, Ranked],
        fused: Ranked,
        reranked: Mapping[str, float],
        head: Sequence[tuple[str, float]],
        final: Sequence[tuple[str, float]],
        texts: Sequence[str],
        timings: Mapping[str, float],
    ) -> dict[str, Any]:
        per_stage = {name: dict(ranked) for name, ranked in lists.items()}
        fused_scores = dict(fused) if len(lists) > 1 else {}
        hits = []
        for rank, (doc, score) in enumerate(final, start=1):
            hit: dict[str, Any] = {
                "id": doc,
                "rank": rank,
                "score": score,
                "scores": {
                    "dense": per_stage.get("dense", {}).get(doc),
                    "sparse": per_stage.get("sparse", {}).get(doc),
                    "fusion": fused_scores.get(doc),
                    "rerank": reranked.get(doc),
                },
            }
            if request.return_text:
                hit["text"] = texts[rank - 1]
            hits.append(hit)
        ran = [*lists, *(["reranker"] if reranked else [])]
        answer: dict[str, Any] = {
            "query": request.query,
            "hits": hits,
            "models": {stage: self.models[stage] for stage in ran if stage in self.models},
            "timings_ms": {k: round(v, 3) for k, v in timings.items()},
        }
        if request.return_stages:
            answer["stages"] = {
                **{name: [[d, s] for d, s in ranked] for name, ranked in lists.items()},
                "fused": [[d, s] for d, s in fused],
                # The whole reranked head (rerank_depth), whatever top_k cuts from the hits.
                **({"reranked": [[d, s] for d, s in head]} if reranked else {}),
            }
            # What ran: the request merged with the app's search: defaults (an evaluation of the
            # app records the settings it measured).
            answer["settings"] = request.model_dump(
                include={"recall", "fusion", "rerank", "rerank_depth", "rerank_weight"}
            )
        return answer


def with_defaults(request: SearchRequest, defaults: Mapping[str, Any]) -> SearchRequest:
    """``request`` with every field it left out taken from ``defaults`` (the serve config's
    ``search:``); ``recall`` and ``fusion`` are merged field by field, so a request that names
    only ``fusion.method`` keeps the configured weights."""
    merged = {k: dict(v) if isinstance(v, Mapping) else v for k, v in defaults.items()}
    for key, value in request.model_dump(exclude_unset=True).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return SearchRequest.model_validate(merged)


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
