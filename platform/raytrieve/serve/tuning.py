"""Choosing ``/search``'s settings on judged dev queries (library code: no Ray, no HTTP).

The caller retrieves each dev query's candidates once, per retriever at the deepest recall
tried, with their scores (the ``stages`` a ``/search`` with ``return_stages`` answers, or
in-process indices). Everything below replays ``/search`` on those lists: a shorter recall is
the list's head (an index returns its exact top k), fusion runs serve/fusion.py's own methods,
and a rerank puts the top ``rerank_depth`` fused candidates in cross-encoder order (or, with a
``rerank_weight`` below 1, in the order of its mix with the fused score) with the rest following
in fused order, as serve/search.py does.

1. ``fit_fusion``: every recall depth pair (a retriever switched off included) with every
   fusion setting (RRF's k, convex weights and normalization), by mean NDCG@k.
2. ``fit_rerank``: on the chosen fusion, each rerank depth (0: no rerank) and rerank weight
   (the cross-encoder's share of the head's order, serve/fusion.py ``interpolate``) with
   cross-encoder scores the caller computed for the top ``max(depths)`` candidates of each query. A rerank
   costs a cross-encoder pass per candidate on every query, so the best setting is adopted only
   when two 95% paired-bootstrap intervals lie above 0: its own gain over no rerank, and the gain
   of the choosing itself on queries it did not see (each half of the dev queries scored with
   the setting the other half chose: ``cross_fitted_gains``). The first alone is optimistic, the
   best of 1 + 6 per depth settings on the queries that picked it: as the only gate, on a
   40-query BEIR dev split, it adopted rerank@10 at weight 0.7 (+0.030 [+0.001, +0.065] on dev)
   that lost on test, as benchmarks/rerank_weight.py had seen a dev-best weight do.

Ties go to the cheaper setting (fewer retrievers, shallower recall, no or shallower rerank).
What these return is fitted to the dev split: report a held-out split's figure with it
(``per_query`` scores any setting on any split).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from raytrieve.evaluation.metrics import query_metrics
from raytrieve.serve import fusion
from raytrieve.serve.fusion import Ranked
from raytrieve.serve.schemas import Fusion, Recall

RRF_KS = (1.0, 5.0, 10.0, 20.0, 40.0, 60.0, 100.0)
CONVEX_WEIGHTS = tuple(round(0.1 * i, 1) for i in range(1, 10))  # the dense weight; sparse gets 1 - it
RECALL_DEPTHS = (20, 50, 100)
RERANK_DEPTHS = (0, 5, 10, 20, 30)
RERANK_WEIGHTS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)  # the cross-encoder's share; 1: its order alone

# query id -> retriever name -> best-first (doc id, score) at the deepest recall tried
Candidates = Mapping[str, Mapping[str, Ranked]]
Qrels = Mapping[str, Mapping[str, float]]  # query id -> doc id -> grade (> 0: relevant)


@dataclass(frozen=True)
class Setting:
    """One way to run ``/search``: the recall per retriever (0: off), the fusion parameters
    (serve/schemas.py ``Fusion`` fields), the rerank depth (0: no rerank) and weight."""

    recall: dict[str, int]
    fusion: dict[str, Any] = field(default_factory=lambda: {"method": "rrf", "k": 60.0})
    rerank_depth: int = 0
    rerank_weight: float = 1.0

    def search_fields(self) -> dict[str, Any]:
        """The ``/search`` request fields (and the serve config's ``search:`` defaults)."""
        # Every retriever /search knows gets a size: one the fit never saw (0 here) must not be
        # switched on by the app's own default when the fragment is served.
        recall = {name: 0 for name in Recall.model_fields} | dict(self.recall)
        out: dict[str, Any] = {"recall": recall, "fusion": dict(self.fusion)}
        out["rerank"] = self.rerank_depth > 0
        if self.rerank_depth:
            out["rerank_depth"] = self.rerank_depth
        # Always: a weight left in a serve config by an earlier fit must not mix into a later
        # rerank that this fit never chose.
        out["rerank_weight"] = self.rerank_weight if self.rerank_depth else 1.0
        return out

    def rerank_key(self) -> str:
        """The rerank part alone: "0" (none), "10" (depth 10, the cross-encoder's order), "10@0.3"
        (depth 10, weight 0.3): the keys of a rerank fit's scores in reports."""
        if not self.rerank_depth:
            return "0"
        return str(self.rerank_depth) if self.rerank_weight >= 1 else f"{self.rerank_depth}@{self.rerank_weight:g}"

    def cost(self) -> tuple[int, int, int]:
        """Cheaper first: no or shallower rerank, fewer retrievers, shallower recall."""
        on = [k for k in self.recall.values() if k > 0]
        return (self.rerank_depth, len(on), sum(on))

    def label(self) -> str:
        on = {n: k for n, k in self.recall.items() if k > 0}
        parts = [" + ".join(f"{n}@{k}" for n, k in on.items())]
        if len(on) > 1:
            params = {k: v for k, v in self.fusion.items() if k != "method"}
            parts.append(f"{self.fusion['method']}({', '.join(f'{k}={v}' for k, v in params.items())})")
        if self.rerank_depth:
            parts.append(self.rerank_label())
        return ", ".join(parts)

    def rerank_label(self) -> str:
        """The rerank part in words: "rerank@10 weight 0.3", "rerank@10" (its order alone), "no rerank"."""
        if not self.rerank_depth:
            return "no rerank"
        weight = f" weight {self.rerank_weight:g}" if self.rerank_weight < 1 else ""
        return f"rerank@{self.rerank_depth}{weight}"


@dataclass(frozen=True)
class Fitted:
    """The chosen setting, its dev score, and every setting tried with its dev score (best first);
    ``gain``: for a rerank fit whose best setting reranks, that setting's mean gain over no rerank
    with its 95% interval, the cross-fitted gain (``cross_fitted_gains``) with its interval and
    the halves' choices, and whether the rerank was ``adopted`` (both intervals above 0)."""

    best: Setting
    score: float
    tried: list[tuple[Setting, float]]
    gain: dict[str, Any] | None = None


def fused_ranked(lists: Mapping[str, Ranked], setting: Setting) -> list[tuple[str, float]]:
    """The fused (doc, score) list ``/search`` ranks by for these recall lists under ``setting``."""
    cut = {n: list(lists.get(n, ()))[:k] for n, k in setting.recall.items() if k > 0}
    if len(cut) == 1:  # one list is not fused: its own order and scores stand (serve/search.py)
        return list(next(iter(cut.values())))
    params = {**Fusion().model_dump(), **setting.fusion}  # what /search's request schema fills in
    return fusion.fuse(str(params["method"]), cut, params)


def fused(lists: Mapping[str, Ranked], setting: Setting) -> list[str]:
    """The fused ranking ``/search`` returns for these recall lists under ``setting`` (no rerank)."""
    return [d for d, _ in fused_ranked(lists, setting)]


def reranked(
    ranking: Sequence[str],
    scores: Mapping[str, float],
    depth: int,
    weight: float = 1.0,
    first_stage: Mapping[str, float] | None = None,
) -> list[str]:
    """The top ``depth`` by cross-encoder score (ties keep the fused order), then the rest; with
    ``weight`` < 1, by that share of it and the rest of ``first_stage``'s score (``interpolate``)."""
    head = list(ranking[:depth])
    missing = [d for d in head if d not in scores]
    if missing:
        raise ValueError(f"no cross-encoder score for {len(missing)} candidate(s), e.g. {missing[:3]}")
    if weight < 1 and first_stage is None:
        raise ValueError("a rerank weight below 1 needs the first stage's scores")
    first = first_stage or {}  # weight 1 reads none (serve/fusion.py interpolate)
    mixed = fusion.interpolate([(d, first.get(d, 0.0)) for d in head], [scores[d] for d in head], weight)
    return [d for d, _ in mixed] + list(ranking[depth:])


def replay(
    lists: Mapping[str, Ranked], setting: Setting, rerank_scores: Mapping[str, float] | None = None
) -> list[str]:
    """The ranking ``/search`` answers for one query's recall lists under ``setting``, reranked
    (depth and weight) with ``rerank_scores`` when the setting reranks."""
    ranked = fused_ranked(lists, setting)
    ids = [d for d, _ in ranked]
    if not setting.rerank_depth:
        return ids
    return reranked(ids, rerank_scores or {}, setting.rerank_depth, setting.rerank_weight, dict(ranked))


def per_query(
    candidates: Candidates,
    qrels: Qrels,
    setting: Setting,
    rerank_scores: Mapping[str, Mapping[str, float]] | None = None,
    k: int = 10,
) -> list[float]:
    """NDCG@k of every judged query under ``setting``, in sorted query-id order (pairs up across
    settings for paired intervals)."""
    missing = sorted(set(qrels) - set(candidates))
    if missing:
        raise ValueError(f"no candidates for {len(missing)} judged queries, e.g. {missing[:3]}")
    if setting.rerank_depth and rerank_scores is None:
        raise ValueError("a setting with a rerank depth needs rerank_scores")
    values = []
    for qid in sorted(qrels):
        ranking = replay(candidates[qid], setting, (rerank_scores or {}).get(qid, {}))
        values.append(query_metrics(ranking[:k], qrels[qid], (k,))[f"ndcg@{k}"])
    return values


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def recall_depths(deepest: int) -> tuple[int, ...]:
    """The recall depths tried: RECALL_DEPTHS below the candidates' depth, and that depth itself."""
    return tuple(sorted({d for d in RECALL_DEPTHS if d < deepest} | {deepest}))


def cross_scores(
    candidates: Candidates,
    setting: Setting,
    depth: int,
    queries: Mapping[str, str],
    corpus: Mapping[str, str],
    score_pairs: Callable[[list[tuple[str, str]]], Sequence[float]],
) -> dict[str, dict[str, float]]:
    """Cross-encoder scores of each query's top ``depth`` candidates under ``setting``'s fusion
    (what ``fit_rerank`` and a reranked ``per_query`` read); one ``score_pairs`` call."""
    heads = {q: fused(lists, setting)[:depth] for q, lists in candidates.items()}
    pairs = [(q, d) for q, docs in heads.items() for d in docs]
    scores = iter(float(s) for s in score_pairs([(queries[q], corpus[d]) for q, d in pairs]))
    out: dict[str, dict[str, float]] = {q: {} for q in heads}
    for q, d in pairs:
        out[q][d] = next(scores)
    return out


def _best(scored: list[tuple[Setting, float]]) -> Fitted:
    # Round away float noise so that equal scores tie and the cheaper setting wins.
    ordered = sorted(scored, key=lambda sv: (-round(sv[1], 9), sv[0].cost()))
    return Fitted(ordered[0][0], ordered[0][1], ordered)


def fusion_grid(retrievers: Sequence[str], depths: Sequence[int] = RECALL_DEPTHS) -> list[Setting]:
    """Each retriever alone, and every depth pair with every fusion setting."""
    settings = [Setting({n: (max(depths) if n == alone else 0) for n in retrievers}) for alone in retrievers]
    if len(retrievers) != 2:
        return settings  # convex weights are per pair; one retriever has nothing to fuse
    first, second = retrievers
    methods: list[dict[str, Any]] = [{"method": "rrf", "k": k} for k in RRF_KS]
    methods += [
        {"method": "convex", f"{first}_weight": w, f"{second}_weight": round(1 - w, 1), "normalization": norm}
        for norm in ("minmax", "zscore")
        for w in CONVEX_WEIGHTS
    ]
    for a in depths:
        for b in depths:
            settings += [Setting({first: a, second: b}, m) for m in methods]
    return settings


def fit_fusion(candidates: Candidates, qrels: Qrels, depths: Sequence[int] = RECALL_DEPTHS, k: int = 10) -> Fitted:
    """The recall depths and fusion with the best mean NDCG@k on these queries."""
    retrievers = sorted({n for lists in candidates.values() for n in lists})
    if not retrievers:
        raise ValueError("no retriever's candidates to fit")
    return _best([(s, mean(per_query(candidates, qrels, s, k=k))) for s in fusion_grid(retrievers, depths)])


def best_reranking(fitted: Fitted) -> Setting | None:
    """The best-scoring setting of a ``fit_rerank`` that reranks, adopted or not (None: no depth
    tried): what "tuned hybrid + rerank" is when the gate kept the rerank off, for a held-out figure."""
    return next((s for s, _ in fitted.tried if s.rerank_depth), None)


def fit_rerank(
    candidates: Candidates,
    qrels: Qrels,
    setting: Setting,
    rerank_scores: Mapping[str, Mapping[str, float]],
    depths: Sequence[int] = RERANK_DEPTHS,
    k: int = 10,
    weights: Sequence[float] = RERANK_WEIGHTS,
) -> Fitted:
    """``setting``'s fusion with the rerank depth (0: none) and weight of the best mean NDCG@k,
    adopted only if its gain over no rerank is clear (module docstring). The scores must cover
    each query's top ``max(depths)`` fused candidates (``fused``)."""
    from raytrieve.evaluate.scoring import paired_interval

    none = Setting(setting.recall, setting.fusion, 0)
    tried = [none] + [
        # Weight 1 first at each depth: of equal scores, the cross-encoder's order alone is kept.
        Setting(setting.recall, setting.fusion, d, w)
        for d in sorted(set(depths) - {0})
        for w in sorted(set(weights), reverse=True)
    ]
    values = [per_query(candidates, qrels, s, rerank_scores, k) for s in tried]
    fitted = _best([(s, mean(v)) for s, v in zip(tried, values)])
    if not fitted.best.rerank_depth:
        return fitted
    delta, low, high = paired_interval(values[0], values[tried.index(fitted.best)])
    held, choices = cross_fitted_gains(tried, values)
    held_delta, held_low, held_high = paired_interval([0.0] * len(held), held)
    adopted = low > 0 and held_low > 0
    gain = {
        "depth": fitted.best.rerank_depth,
        "weight": fitted.best.rerank_weight,
        "delta": delta,  # of the best setting, on the queries that chose it: optimistic
        "ci95": [low, high],
        # The choosing itself, scored on queries it did not see: each half's choice on the other.
        "cross_fitted": {
            "delta": held_delta,
            "ci95": [held_low, held_high],
            "chosen": [s.rerank_label() for s in choices],
        },
        "adopted": adopted,
    }
    if adopted:
        return Fitted(fitted.best, fitted.score, fitted.tried, gain)
    return Fitted(none, mean(values[0]), fitted.tried, gain)


def cross_fitted_gains(
    tried: Sequence[Setting], values: Sequence[Sequence[float]]
) -> tuple[list[float], list[Setting]]:
    """Per query, the gain over ``tried[0]`` (no rerank) of the setting that the other half of the
    queries chose (the best mean there, ties to the cheaper): the choosing never sees the query it
    is scored on. Halves: alternate queries in ``values``' (sorted id) order. Also the two
    choices (the odd half's, scoring the even queries; then the even half's).

    With one query the choosing half is empty, so no rerank is chosen and the gain is 0: a
    rerank is never adopted on one query. Either half choosing no rerank gives its queries 0."""
    n = len(values[0])
    halves = [range(0, n, 2), range(1, n, 2)]
    gains = [0.0] * n
    choices: list[Setting] = []
    for scored, chooser in ((halves[0], halves[1]), (halves[1], halves[0])):
        best = _best([(s, mean([v[i] for i in chooser])) for s, v in zip(tried, values)]).best
        chosen = values[list(tried).index(best)]
        choices.append(best)
        for i in scored:
            gains[i] = chosen[i] - values[0][i]
    return gains, choices
