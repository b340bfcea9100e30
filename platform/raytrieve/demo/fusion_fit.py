"""The demo's fit of ``/search``'s settings on the dev split, before each phase is served.

The dev split's dense and sparse candidates (each query's top ``serving.recall``, from the
in-process evaluation) are replayed under every recall depth and fusion setting
(serve/tuning.py); the cross-encoder then scores the top candidates of the chosen fusion for
the first ``fusion_fit.rerank_queries`` dev queries, which decides the rerank depth, or no
rerank. The setting becomes the served app's ``search:`` defaults, so the test queries that
leave them out are answered with it: its test figure is held out from the fit.
"""

from __future__ import annotations

from typing import Any

from raytrieve.demo.config import DemoConfig
from raytrieve.demo.progress import Progress
from raytrieve.demo.sample import Split
from raytrieve.serve import tuning

DEPTHS = (20, 50, 100)


def fit_on_dev(
    cfg: DemoConfig, dev: Split, dev_result: dict[str, Any], reranker: str, progress: Progress
) -> dict[str, Any]:
    """The fitted setting (``search_fields``: the serve config's ``search:``) and its dev scores,
    the rerank depth decided with ``reranker`` (the model this phase serves)."""
    qrels = {q: {d: 1.0} for q, d in dev.qrels.items()}
    candidates = {
        qid: {kind: [(d, s) for d, s in dev_result[kind]["candidates"][qid]] for kind in ("dense", "sparse")}
        for qid in qrels
    }
    depths = tuple(d for d in DEPTHS if d <= cfg.serving.recall) or (cfg.serving.recall,)
    fused = tuning.fit_fusion(candidates, qrels, depths)
    default = tuning.Setting({"dense": cfg.serving.recall, "sparse": cfg.serving.recall})
    progress(
        f"  fusion fitted on {len(qrels)} dev queries ({len(fused.tried)} settings): {fused.best.label()} "
        f"NDCG@10 {fused.score:.3f} (RRF k=60: {_mean(tuning.per_query(candidates, qrels, default)):.3f})"
    )
    best, rerank = fused.best, None
    f = cfg.fusion_fit
    if f.rerank_queries and f.rerank_depths:
        chosen = sorted(qrels)[: f.rerank_queries]
        scores = _cross_scores(cfg, reranker, dev, {q: candidates[q] for q in chosen}, best, max(f.rerank_depths))
        rerank = tuning.fit_rerank(
            {q: candidates[q] for q in chosen}, {q: qrels[q] for q in chosen}, best, scores, [0, *f.rerank_depths]
        )
        best = rerank.best
        by_depth = ", ".join(f"{s.rerank_depth or 'none'}: {v:.3f}" for s, v in sorted(rerank.tried, key=_depth))
        gain = rerank.gain
        verdict = (
            ""
            if gain is None
            else f"; rerank@{gain['depth']} {gain['delta']:+.3f} [{gain['ci95'][0]:+.3f}, {gain['ci95'][1]:+.3f}]"
            + (" adopted" if gain["adopted"] else " within noise: not adopted")
        )
        progress(
            f"  rerank depth on {len(chosen)} dev queries (NDCG@10 by depth: {by_depth}{verdict}): "
            f"{best.rerank_depth or 'none'}"
        )
    return {
        "setting": best.search_fields(),
        "label": best.label(),
        "dev_ndcg@10": {
            "fitted_fusion": fused.score,
            "rrf_default": _mean(tuning.per_query(candidates, qrels, default)),
            **{s.label(): v for s, v in fused.tried if s.fusion == default.fusion or not all(s.recall.values())},
        },
        "rerank_dev_ndcg@10": {str(s.rerank_depth): v for s, v in rerank.tried} if rerank else None,
        "rerank_gain": rerank.gain if rerank else None,
    }


def _depth(sv: tuple[tuning.Setting, float]) -> int:
    return sv[0].rerank_depth


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _cross_scores(
    cfg: DemoConfig, model: str, dev: Split, candidates: dict[str, Any], setting: tuning.Setting, depth: int
) -> dict[str, dict[str, float]]:
    """Cross-encoder scores of each query's top ``depth`` fused candidates, in process."""
    from raytrieve.encoders import load_encoder

    # The served reranker's format (auto: bf16 where this CPU has it and the model passes its guard).
    reranker = load_encoder("cross", model, device="cpu", max_seq_length=cfg.models.max_seq_length, dtype="auto")
    heads = {q: tuning.fused(lists, setting)[:depth] for q, lists in candidates.items()}
    pairs = [(dev.queries[q], dev.corpus[d]) for q, docs in heads.items() for d in docs]
    flat = iter(float(s) for s in reranker.predict(pairs, batch_size=32, show_progress_bar=False))
    return {q: {d: next(flat) for d in docs} for q, docs in heads.items()}
