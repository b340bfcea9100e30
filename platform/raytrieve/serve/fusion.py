"""Fusing ranked lists from several retrievers (library code: no Ray, no HTTP).

Each input is a best-first list of (doc_id, score). The output is one best-first list of
(doc_id, fused score); ties go to the document that appears first in the earliest list, so
the order is deterministic.

- ``rrf``: reciprocal rank fusion, sum over lists of 1 / (k + rank), rank starting at 1.
- ``convex``: sum over lists of weight * normalized score; a document missing from a list
  gets that list's floor, never more than a document the list returned: 0 after min-max,
  the lowest z-score after z-scoring. A list whose scores all tie (one hit, say) says only
  which documents it found: min-max gives them 1, z-scoring 0 and the missing -1.
- ``interpolate`` (after a rerank): the reranked head in cross-encoder order, or ordered by a
  weighted sum of the cross-encoder's and the first stage's z-scored scores.

``METHODS`` maps each ``/search`` fusion method to its function; the request schema's allowed
``fusion.method`` values are its keys. A new method is one function taking the retrievers'
lists by name ("dense", "sparse") and the request's ``fusion`` parameters as a mapping, plus
its entry in ``METHODS``; a new parameter is also a field of ``Fusion`` in serve/schemas.py.
Parameters the method cannot fuse with raise ``FusionParameterError`` (a 422 naming ``fusion``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Ranked = Sequence[tuple[str, float]]
NORMALIZATIONS = ("minmax", "zscore", "none")


class FusionParameterError(ValueError):
    """The request's fusion parameters cannot rank these lists (the message names which)."""


def _first_seen(lists: Sequence[Ranked]) -> dict[str, int]:
    order: dict[str, int] = {}
    for ranked in lists:
        for doc, _ in ranked:
            order.setdefault(doc, len(order))
    return order


def _sorted(scores: dict[str, float], order: dict[str, int]) -> list[tuple[str, float]]:
    return sorted(scores.items(), key=lambda item: (-item[1], order[item[0]]))


def rrf(lists: Sequence[Ranked], k: float = 60.0) -> list[tuple[str, float]]:
    if k < 0:
        raise ValueError("rrf k must be >= 0")
    scores: dict[str, float] = {}
    for ranked in lists:
        for rank, (doc, _) in enumerate(ranked, start=1):
            scores[doc] = scores.get(doc, 0.0) + 1.0 / (k + rank)
    return _sorted(scores, _first_seen(lists))


def normalize(scores: Sequence[float], method: str) -> list[float]:
    if method == "none" or not scores:
        return list(scores)
    if method == "minmax":
        lo, hi = min(scores), max(scores)
        return [1.0 if hi == lo else (s - lo) / (hi - lo) for s in scores]
    if method == "zscore":
        mean = sum(scores) / len(scores)
        std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
        return [0.0 if std == 0 else (s - mean) / std for s in scores]
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {method!r}")


def _floor(normalized: dict[str, float], method: str) -> float:
    """What a document a list did not return scores in it: below or level with all it returned."""
    if not normalized:
        return 0.0
    lowest = min(normalized.values())
    if method == "minmax":
        return 0.0  # min-max's bottom; its lowest hit's score, unless every hit tied at 1
    if method == "zscore" and lowest == max(normalized.values()):
        return -1.0  # all tied at 0: the hits are above what was not found
    return lowest


def convex(lists: Sequence[Ranked], weights: Sequence[float], normalization: str = "minmax") -> list[tuple[str, float]]:
    if len(weights) != len(lists):
        raise ValueError(f"convex fusion needs one weight per list ({len(lists)}), got {len(weights)}")
    normalized = [
        dict(zip([d for d, _ in ranked], normalize([s for _, s in ranked], normalization))) for ranked in lists
    ]
    floors = [_floor(n, normalization) for n in normalized]
    order = _first_seen(lists)
    scores = {doc: sum(w * n.get(doc, floor) for w, n, floor in zip(weights, normalized, floors)) for doc in order}
    return _sorted(scores, order)


def _rrf_method(lists: Mapping[str, Ranked], params: Mapping[str, Any]) -> list[tuple[str, float]]:
    return rrf(list(lists.values()), k=float(params["k"]))


def _convex_method(lists: Mapping[str, Ranked], params: Mapping[str, Any]) -> list[tuple[str, float]]:
    # Each retriever's weight is the parameter named after it: dense_weight, sparse_weight.
    weights = [float(params[f"{name}_weight"]) for name in lists]
    if not any(weights):  # every score would be 0: the order would be the lists' order, not a fusion
        named = " and ".join(f"{name}_weight" for name in lists)
        raise FusionParameterError(f"convex fusion weighs every list 0 ({named}); give one a weight above 0")
    return convex(list(lists.values()), weights, str(params["normalization"]))


def interpolate(head: Ranked, rerank_scores: Sequence[float], weight: float) -> list[tuple[str, float]]:
    """``head`` (best-first (doc, first-stage score)) re-ordered by ``weight`` x the cross-encoder's
    score + (1 - ``weight``) x the first stage's, each z-scored over the head (the two live on
    unrelated scales); ties keep the head's order. Returns (doc, interpolated score), best first.

    A reranker from another domain can order a head worse than the first stage did, and still
    know something the first stage does not: a share of its score can help where its order alone
    hurts. ``weight`` 1 is the cross-encoder's order alone, with its own scores (the first
    stage's are then not read)."""
    if not 0 < weight <= 1:
        raise ValueError(f"rerank weight must be in (0, 1], got {weight}")
    if len(rerank_scores) != len(head):
        raise ValueError(f"{len(rerank_scores)} rerank scores for {len(head)} candidates")
    if weight == 1:
        scores = [float(s) for s in rerank_scores]
        order = sorted(range(len(head)), key=lambda i: (-scores[i], i))
        return [(head[i][0], scores[i]) for i in order]
    first = normalize([s for _, s in head], "zscore")
    cross = normalize([float(s) for s in rerank_scores], "zscore")
    scores = [(1 - weight) * f + weight * c for f, c in zip(first, cross)]
    order = sorted(range(len(head)), key=lambda i: (-scores[i], i))
    return [(head[i][0], scores[i]) for i in order]


FusionMethod = Callable[[Mapping[str, Ranked], Mapping[str, Any]], list[tuple[str, float]]]
METHODS: dict[str, FusionMethod] = {"rrf": _rrf_method, "convex": _convex_method}


def fuse(method: str, lists: Mapping[str, Ranked], params: Mapping[str, Any]) -> list[tuple[str, float]]:
    """Fuse best-first lists keyed by retriever with ``METHODS[method]``."""
    if method not in METHODS:
        raise ValueError(f"fusion method must be one of {sorted(METHODS)}, got {method!r}")
    return METHODS[method](lists, params)
