"""The demo's fit of ``/search``'s settings on the dev split, before each phase is served.

The dev split's dense and sparse candidates (each query's top ``serving.recall``, from the
in-process evaluation) are replayed under every recall depth and fusion setting
(serve/tuning.py); the cross-encoder then scores the top candidates of the chosen fusion for
the first ``fusion_fit.rerank_queries`` dev queries, which decides the rerank depth, or no
rerank. The setting becomes the served app's ``search:`` defaults, so the test queries that
leave them out are answered with it: its test figure is held out from the fit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from raytrieve.demo.config import DemoConfig
from raytrieve.demo.progress import Progress
from raytrieve.demo.sample import Split
from raytrieve.serve import tuning

if TYPE_CHECKING:
    from raytrieve.serve.config import DeploymentConfig


def fit_on_dev(
    cfg: DemoConfig, dev: Split, dev_result: dict[str, Any], reranker: DeploymentConfig, progress: Progress
) -> dict[str, Any]:
    """The fitted setting (``search_fields``: the serve config's ``search:``) and its dev scores,
    the rerank depth decided with ``reranker``: the reranker deployment of the serve config this
    phase serves (phase_configs.serve_config), so the fit scores pairs as the served app does."""
    qrels = dev.qrels
    candidates = {
        qid: {kind: [(d, s) for d, s in dev_result[kind]["candidates"][qid]] for kind in ("dense", "sparse")}
        for qid in qrels
    }
    fused = tuning.fit_fusion(candidates, qrels, tuning.recall_depths(cfg.serving.recall))
    default = tuning.Setting({"dense": cfg.serving.recall, "sparse": cfg.serving.recall})
    progress(
        f"  fusion fitted on {len(qrels)} dev queries ({len(fused.tried)} settings): {fused.best.label()} "
        f"NDCG@10 {fused.score:.3f} (RRF k=60: {tuning.mean(tuning.per_query(candidates, qrels, default)):.3f})"
    )
    best, rerank = fused.best, None
    f = cfg.fusion_fit
    if f.rerank_queries and f.rerank_depths:
        chosen = [q for q in dev.queries if q in qrels][: f.rerank_queries]  # the sample's own (seeded) order
        scores = tuning.cross_scores(
            {q: candidates[q] for q in chosen},
            best,
            max(f.rerank_depths),
            dev.queries,
            dev.corpus,
            _score_pairs(reranker),
        )
        rerank = tuning.fit_rerank(
            {q: candidates[q] for q in chosen}, {q: qrels[q] for q in chosen}, best, scores, [0, *f.rerank_depths]
        )
        best = rerank.best
        by_depth = ", ".join(f"{s.rerank_key()}: {v:.3f}" for s, v in _best_per_depth(rerank.tried))
        gain, verdict = rerank.gain, ""
        if gain is not None:  # fit_rerank sets cross_fitted with it
            held = gain["cross_fitted"]
            verdict = (
                f"; rerank@{gain['depth']} weight {gain['weight']:g} {gain['delta']:+.3f} "
                f"[{gain['ci95'][0]:+.3f}, {gain['ci95'][1]:+.3f}], cross-fitted {held['delta']:+.3f} "
                f"[{held['ci95'][0]:+.3f}, {held['ci95'][1]:+.3f}]"
                + (" adopted" if gain["adopted"] else ": not clear, not adopted")
            )
        progress(
            f"  rerank depth and weight on {len(chosen)} dev queries (NDCG@10, best weight per depth: "
            f"{by_depth}{verdict}); served: {best.rerank_label()}"
        )
    return {
        "setting": best.search_fields(),
        "label": best.label(),
        "dev_ndcg@10": {
            "fitted_fusion": fused.score,
            "rrf_default": tuning.mean(tuning.per_query(candidates, qrels, default)),
            **{s.label(): v for s, v in fused.tried if s.fusion == default.fusion or not all(s.recall.values())},
        },
        "rerank_dev_ndcg@10": {s.rerank_key(): v for s, v in rerank.tried} if rerank else None,
        "rerank_gain": rerank.gain if rerank else None,
        # The dev's best rerank on the fitted fusion, adopted or not: the demo also scores it on
        # test, so "tuned hybrid + rerank" has a held-out figure even where the gate said no.
        "with_rerank": _best_reranking(rerank),
    }


def rerank_request(fitted: dict[str, Any] | None, rerank_depth: int) -> dict[str, Any] | None:
    """The rerank fields of the demo's "fitted+rerank" test request: the served (fitted) recall and
    fusion, reranked at the dev's best depth and weight. None: the fitted setting reranks already,
    so that stage is the fitted one. Without a rerank fit, ``rerank_depth`` in the cross-encoder's
    order."""
    if fitted is not None and fitted["setting"]["rerank"]:
        return None
    chosen = (fitted or {}).get("with_rerank")
    if chosen is None:
        return {"rerank": True, "rerank_depth": rerank_depth, "rerank_weight": 1.0}
    return {k: chosen["setting"][k] for k in ("rerank", "rerank_depth", "rerank_weight")}


def _best_reranking(rerank: tuning.Fitted | None) -> dict[str, Any] | None:
    """The search fields and label of ``tuning.best_reranking``, or None when no rerank was fitted."""
    best = tuning.best_reranking(rerank) if rerank is not None else None
    return None if best is None else {"setting": best.search_fields(), "label": best.label()}


def _best_per_depth(tried: list[tuple[tuning.Setting, float]]) -> list[tuple[tuning.Setting, float]]:
    """Each rerank depth's best weight (``tried`` is best first), by depth."""
    best: dict[int, tuple[tuning.Setting, float]] = {}
    for s, v in tried:
        best.setdefault(s.rerank_depth, (s, v))
    return [best[d] for d in sorted(best)]


# The deployment fields that decide a served cross-encoder's scores (serve/deployments.py
# load_model): a fit cached under other values was scored by another model.
SCORING_FIELDS = ("model", "max_seq_length", "dtype", "trust_remote_code")


def scoring_key(reranker: DeploymentConfig) -> dict[str, Any]:
    return {k: getattr(reranker, k) for k in SCORING_FIELDS}


def _score_pairs(reranker: DeploymentConfig) -> Any:
    """The served cross-encoder, in process on the CPU, loaded from its deployment's settings as
    the replica loads it (auto dtype: bf16 where this CPU has it and the model passes its guard)."""
    from raytrieve.encoders import load_encoder

    model = load_encoder(
        "cross",
        reranker.model,
        device="cpu",
        max_seq_length=reranker.max_seq_length,
        trust_remote_code=reranker.trust_remote_code,
        dtype=reranker.dtype,
    )
    budget = reranker.max_batch_tokens  # the replica's budget per forward pass
    return lambda pairs: model.predict(pairs, batch_size=32, token_budget=budget, show_progress_bar=False)
