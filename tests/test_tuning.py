"""Fitting /search's settings on judged queries (raytrieve.serve.tuning): its replay of a setting
ranks exactly as the /search pipeline does; on planted data it finds the setting that is right
by construction, and prefers the cheaper of equal ones; the serve config's search: defaults fill
what a request leaves out and are checked against the app's limits."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from raytrieve.config import from_dict
from raytrieve.errors import ConfigError
from raytrieve.serve import tuning
from raytrieve.serve.config import ServeConfig
from raytrieve.serve.schemas import SearchRequest
from raytrieve.serve.search import with_defaults
from raytrieve.serve.tuning import Setting
from tests.test_search import QUERY, TEXTS, brute_force, cross_score, pipeline, run


@pytest.mark.parametrize(
    "setting",
    [
        Setting({"dense": 6, "sparse": 6}, {"method": "rrf", "k": 1.0}),
        Setting({"dense": 3, "sparse": 6}, {"method": "rrf", "k": 60.0}),
        Setting({"dense": 6, "sparse": 2}, {"method": "convex", "dense_weight": 0.3, "sparse_weight": 0.7,
                                             "normalization": "minmax"}),
        Setting({"dense": 5, "sparse": 5}, {"method": "convex", "dense_weight": 0.8, "sparse_weight": 0.2,
                                             "normalization": "zscore"}),
        Setting({"dense": 6, "sparse": 0}),
        Setting({"dense": 0, "sparse": 6}),
        Setting({"dense": 6, "sparse": 6}, {"method": "rrf", "k": 10.0}, rerank_depth=3),
    ],
)
def test_replay_ranks_as_the_search_pipeline(setting):
    lists = brute_force()
    ranking = tuning.fused(lists, setting)
    if setting.rerank_depth:
        scores = {d: cross_score(QUERY, TEXTS[d]) for d in ranking[: setting.rerank_depth]}
        ranking = tuning.reranked(ranking, scores, setting.rerank_depth)
    answer = run(pipeline(), top_k=6, return_text=False, **setting.search_fields())
    assert [h["id"] for h in answer["hits"]] == ranking[:6]


@pytest.mark.parametrize("recall", [{"dense": 6, "sparse": 6}, {"dense": 6, "sparse": 0}])
@pytest.mark.parametrize("weight", [0.2, 0.6])
def test_an_interpolated_rerank_orders_by_the_weighted_z_scores(recall, weight):
    """/search with rerank_weight < 1 and the fit's replay both order the head by weight x the
    cross-encoder's z-score + (1 - weight) x the first stage's (fused, or the single list's),
    computed here with numpy; each hit keeps its raw cross-encoder score in scores.rerank."""
    setting = Setting(recall, {"method": "rrf", "k": 10.0}, rerank_depth=5, rerank_weight=weight)
    lists = brute_force()
    first = tuning.fused_ranked(lists, setting)[:5]
    cross = np.array([cross_score(QUERY, TEXTS[d]) for d, _ in first])
    f = np.array([s for _, s in first])
    mixed = (1 - weight) * (f - f.mean()) / f.std() + weight * (cross - cross.mean()) / cross.std()
    expected = [first[i][0] for i in np.argsort(-mixed, kind="stable")]
    scores = {d: float(c) for (d, _), c in zip(first, cross)}
    assert tuning.replay(lists, setting, scores)[:5] == expected
    assert setting.search_fields()["rerank_weight"] == weight
    answer = run(pipeline(), top_k=5, return_text=False, **setting.search_fields())
    assert [h["id"] for h in answer["hits"]] == expected
    for h in answer["hits"]:
        i = [d for d, _ in first].index(h["id"])
        assert h["score"] == pytest.approx(mixed[i]) and h["scores"]["rerank"] == pytest.approx(cross[i])


def _planted(n: int = 12) -> tuple[dict, dict]:
    """Each query's relevant doc is third in both lists; the docs above it are in one list only.
    Either list alone finds it at rank 3 (NDCG@10 = 0.5); any fusion puts it first (1.0)."""
    candidates, qrels = {}, {}
    for q in range(n):
        rel = f"rel{q}"
        dense = [f"d{q}-a", f"d{q}-b", rel] + [f"d{q}-{i}" for i in range(120)]
        sparse = [f"s{q}-a", f"s{q}-b", rel] + [f"s{q}-{i}" for i in range(120)]
        candidates[f"q{q}"] = {
            "dense": [(d, 1.0 - i / 200) for i, d in enumerate(dense)],
            "sparse": [(d, 20.0 - i / 10) for i, d in enumerate(sparse)],
        }
        qrels[f"q{q}"] = {rel: 1.0}
    return candidates, qrels


def test_fit_fusion_finds_the_planted_optimum_and_the_cheapest_of_equals():
    candidates, qrels = _planted()
    fitted = tuning.fit_fusion(candidates, qrels)
    scores = {s.label(): v for s, v in fitted.tried}
    assert scores["dense@100"] == pytest.approx(0.5) and scores["sparse@100"] == pytest.approx(0.5)
    assert fitted.score == pytest.approx(1.0)
    # Many fusions reach 1.0 here: the cheapest recall wins, and every tried setting is scored.
    assert fitted.best.recall == {"dense": 20, "sparse": 20}
    assert len(fitted.tried) == 2 + 9 * (7 + 18)
    assert [v for _, v in fitted.tried] == sorted((v for _, v in fitted.tried), reverse=True)


def test_fit_fusion_weights_the_retriever_that_is_right():
    """Dense ranks the relevant doc first for every query, sparse ranks it tenth: dense alone is
    best, and a convex mix only as good when it leans to dense."""
    candidates, qrels = {}, {}
    for q in range(8):
        dense = [f"r{q}"] + [f"x{q}-{i}" for i in range(60)]
        sparse = [f"y{q}-{i}" for i in range(9)] + [f"r{q}"] + [f"y{q}-{i}" for i in range(9, 60)]
        candidates[f"q{q}"] = {"dense": [(d, 1 - i / 100) for i, d in enumerate(dense)],
                               "sparse": [(d, 10 - i / 10) for i, d in enumerate(sparse)]}
        qrels[f"q{q}"] = {f"r{q}": 1.0}
    fitted = tuning.fit_fusion(candidates, qrels, depths=(20, 50))
    assert fitted.score == pytest.approx(1.0) and fitted.best == Setting({"dense": 50, "sparse": 0})
    convex = {(s.fusion["dense_weight"], s.fusion["normalization"]): v for s, v in fitted.tried
              if s.fusion.get("method") == "convex" and s.recall == {"dense": 50, "sparse": 50}}
    for norm in ("minmax", "zscore"):
        assert convex[(0.9, norm)] == pytest.approx(1.0) and convex[(0.1, norm)] < 0.5


def test_fit_rerank_adopts_a_reranker_that_helps_and_drops_one_that_hurts():
    candidates, qrels = _planted()
    setting = Setting({"dense": 20, "sparse": 0})  # the relevant doc is third
    top = {q: tuning.fused(candidates[q], setting)[:30] for q in candidates}
    helpful = {q: {d: (5.0 if d in qrels[q] else 1.0 - i / 100) for i, d in enumerate(top[q])} for q in top}
    fitted = tuning.fit_rerank(candidates, qrels, setting, helpful)
    assert fitted.best.rerank_depth == 5 and fitted.score == pytest.approx(1.0)  # the shallowest that fixes it
    assert dict((s.rerank_depth, v) for s, v in fitted.tried)[0] == pytest.approx(0.5)
    assert fitted.gain is not None and fitted.gain["adopted"] and fitted.gain["cross_fitted"]["ci95"][0] > 0
    # A reranker that helps one query of twelve: the best depth on these queries, but its gain is
    # within noise (the interval reaches 0), so no rerank is kept, and the gain is reported.
    once = {q: {d: (5.0 if d in qrels[q] and q == "q0" else 1.0 - i / 100) for i, d in enumerate(top[q])} for q in top}
    fitted = tuning.fit_rerank(candidates, qrels, setting, once)
    assert fitted.tried[0][0].rerank_depth == 5 and fitted.tried[0][1] > 0.5  # the best on these queries...
    assert fitted.best.rerank_depth == 0 and fitted.score == pytest.approx(0.5)  # ...not adopted
    assert fitted.gain is not None and not fitted.gain["adopted"]
    assert fitted.gain["cross_fitted"]["ci95"][0] <= 0 and fitted.gain["cross_fitted"]["delta"] == 0.0
    # What "tuned+rerank" scores held out: that best depth, though not adopted.
    assert tuning.best_reranking(fitted) == Setting(setting.recall, setting.fusion, 5, 1.0)
    harmful = {q: {d: (-5.0 if d in qrels[q] else 1.0) for d in top[q]} for q in top}
    fitted = tuning.fit_rerank(candidates, qrels, setting, harmful)
    assert fitted.best.rerank_depth == 0 and fitted.score == pytest.approx(0.5)
    assert fitted.best.search_fields()["rerank"] is False
    assert fitted.best.search_fields()["rerank_weight"] == 1.0  # no stale weight survives a no-rerank fit
    # Of equal scores the cross-encoder's order alone (weight 1) is kept.
    fitted = tuning.fit_rerank(candidates, qrels, setting, helpful)
    assert fitted.best.rerank_weight == 1.0 and "rerank_weight" in fitted.best.search_fields()
    assert tuning.best_reranking(fitted) == fitted.best  # adopted: the served setting itself
    assert tuning.best_reranking(tuning.fit_rerank(candidates, qrels, setting, helpful, depths=(0,))) is None


def test_fit_rerank_finds_the_weight_where_the_order_alone_hurts():
    """The first stage ranks the relevant doc second, just below a wrong one; the cross-encoder
    prefers the relevant doc to that one, but puts two far-down docs above both. Its order alone
    drops the relevant doc to third; a small share of its score lifts it to first."""
    candidates, qrels = {}, {}
    for q in range(12):
        docs = [f"a{q}", f"rel{q}"] + [f"x{q}-{i}" for i in range(18)]
        first = [1.0, 0.99] + [0.5 - i / 100 for i in range(18)]
        candidates[f"q{q}"] = {"dense": list(zip(docs, first))}
        qrels[f"q{q}"] = {f"rel{q}": 1.0}
    cross = {q: {d: {1: 3.0, 10: 5.0, 11: 4.0}.get(i, 0.0) for i, d in enumerate(d for d, _ in c["dense"])}
             for q, c in candidates.items()}
    fitted = tuning.fit_rerank(candidates, qrels, Setting({"dense": 20}), cross, depths=(20,))
    by_key = {s.rerank_key(): v for s, v in fitted.tried}
    assert by_key["0"] == pytest.approx(1 / np.log2(3)) and by_key["20"] == pytest.approx(0.5)
    assert fitted.best.rerank_depth == 20 and fitted.best.rerank_weight < 1 and fitted.score == pytest.approx(1.0)
    assert fitted.gain is not None and fitted.gain["adopted"] and fitted.gain["weight"] == fitted.best.rerank_weight
    assert fitted.best.search_fields() | {"recall": None} == {
        "recall": None, "fusion": {"method": "rrf", "k": 60.0}, "rerank": True, "rerank_depth": 20,
        "rerank_weight": fitted.best.rerank_weight}


def test_per_query_pairs_queries_in_id_order_and_names_what_is_missing():
    candidates, qrels = _planted(3)
    assert tuning.per_query(candidates, qrels, Setting({"dense": 10, "sparse": 0})) == [pytest.approx(0.5)] * 3
    with pytest.raises(ValueError, match="no candidates for 1 judged queries"):
        tuning.per_query({k: v for k, v in candidates.items() if k != "q1"}, qrels, Setting({"dense": 10}))
    with pytest.raises(ValueError, match="needs rerank_scores"):
        tuning.per_query(candidates, qrels, Setting({"dense": 10}, rerank_depth=5))
    with pytest.raises(ValueError, match="no cross-encoder score"):
        tuning.per_query(candidates, qrels, Setting({"dense": 10}, rerank_depth=5), {"q0": {}})


def test_search_defaults_fill_what_a_request_leaves_out():
    defaults = {"top_k": 7, "recall": {"dense": 40, "sparse": 25},
                "fusion": {"method": "convex", "k": 60.0, "dense_weight": 0.8, "sparse_weight": 0.2,
                           "normalization": "zscore"},
                "rerank": True, "rerank_depth": 20}
    plain = with_defaults(SearchRequest(query="q"), defaults)
    assert (plain.top_k, plain.recall.dense, plain.recall.sparse, plain.rerank, plain.rerank_depth) == (
        7, 40, 25, True, 20)
    assert (plain.fusion.method, plain.fusion.dense_weight, plain.fusion.normalization) == ("convex", 0.8, "zscore")
    mixed = with_defaults(
        SearchRequest.model_validate({"query": "q", "top_k": 3, "recall": {"sparse": 0}, "rerank": False,
                                      "fusion": {"method": "rrf"}}), defaults)
    assert (mixed.top_k, mixed.recall.dense, mixed.recall.sparse, mixed.rerank) == (3, 40, 0, False)
    assert (mixed.fusion.method, mixed.fusion.dense_weight) == ("rrf", 0.8)  # weights stay configured


def test_search_defaults_must_be_requests_the_app_accepts():
    base = {"dense": {"model": "all-minilm-l6-v2"}}
    assert from_dict(ServeConfig, base).search.model_dump() == {
        k: v for k, v in SearchRequest(query="q").model_dump().items()
        if k in ("top_k", "recall", "fusion", "rerank", "rerank_depth", "rerank_weight")}
    cases = [
        ({"search": {"rerank": True}}, "search.rerank: true needs a reranker"),
        ({"search": {"top_k": 500}}, r"search.top_k: 500 exceeds limits.max_top_k \(100\)"),
        ({"search": {"recall": {"dense": 5000}}}, "search.recall.dense: exceeds limits.max_recall"),
        ({"search": {"fusion": {"method": "borda"}}}, "search.fusion.method"),
    ]
    for extra, message in cases:
        with pytest.raises(ConfigError, match=message):
            from_dict(ServeConfig, {**base, **extra})


def test_a_fit_switches_off_what_it_never_saw():
    """A fit over dense candidates only: served, the app's own sparse default must not switch sparse on."""
    candidates, qrels = _planted(4)
    fitted = tuning.fit_fusion({q: {"dense": lists["dense"]} for q, lists in candidates.items()}, qrels)
    assert fitted.best.search_fields()["recall"] == {"dense": 100, "sparse": 0}
    served = from_dict(ServeConfig, {"dense": {"model": "all-minilm-l6-v2"}, "sparse": {"model": "splade-tiny"},
                                     "search": fitted.best.search_fields()})
    assert served.search.recall.sparse == 0


def test_fusion_grid_covers_each_retriever_alone_and_every_pair():
    grid = tuning.fusion_grid(["dense", "sparse"], depths=(20, 50))
    recalls = {tuple(s.recall.values()) for s in grid}
    assert recalls == {(50, 0), (0, 50)} | set(itertools.product((20, 50), repeat=2))
    assert {s.fusion["method"] for s in grid if all(s.recall.values())} == {"rrf", "convex"}
    assert tuning.fusion_grid(["dense"]) == [Setting({"dense": 100})]


def test_an_explicit_rerank_weight_is_kept_over_the_configured_default():
    """The demo's untuned row sends rerank_weight 1: a fitted 0.3 in the app's
    search: defaults must not fill it; a request that leaves it out gets the default."""
    defaults = {"rerank": True, "rerank_depth": 10, "rerank_weight": 0.3}
    explicit = with_defaults(SearchRequest.model_validate({"query": "q", "rerank_weight": 1.0}), defaults)
    left_out = with_defaults(SearchRequest.model_validate({"query": "q"}), defaults)
    assert (explicit.rerank_weight, left_out.rerank_weight) == (1.0, 0.3)
    assert explicit.rerank and explicit.rerank_depth == 10


def test_cross_fitted_gains_score_each_half_with_the_other_halfs_choice():
    none, a, b = Setting({"dense": 20}), Setting({"dense": 20}, rerank_depth=5), Setting({"dense": 20}, rerank_depth=10)
    # a helps the even queries only, b the odd ones: each looks like a gain on the queries that
    # would choose it, and neither carries over to the other half.
    values = [[0.5] * 4, [1.0, 0.5, 1.0, 0.5], [0.5, 1.0, 0.5, 1.0]]
    assert tuning.cross_fitted_gains([none, a, b], values) == ([0.0] * 4, [b, a])
    # A setting that helps every query is chosen by both halves and keeps its gain on each.
    values = [[0.5] * 4, [0.9, 0.5, 0.9, 0.5], [1.0] * 4]
    assert tuning.cross_fitted_gains([none, a, b], values) == ([0.5] * 4, [b, b])
    # Of equal means the cheaper setting is chosen: the even half ties a with none and takes none
    # (its choice scores the odd queries: 0), the odd half takes a (its choice scores the even).
    gains, chosen = tuning.cross_fitted_gains([none, a], [[0.5] * 4, [0.7, 0.5, 0.3, 0.6]])
    assert gains == pytest.approx([0.2, 0.0, -0.2, 0.0]) and chosen == [a, none]
    # One query: nobody chooses for it, so no rerank and no gain.
    assert tuning.cross_fitted_gains([none, a], [[0.5], [1.0]]) == ([0.0], [none, a])


def test_fit_rerank_refuses_a_best_setting_that_only_its_own_queries_favour(monkeypatch):
    """The depth-5 rerank helps the even queries, the depth-10 one the odd: on all twelve the
    best (depth 5) gains with an interval above 0, but each half's choice does nothing for the
    other half, so the cross-fitted gain is 0 and no rerank is adopted."""
    candidates, qrels = _planted()
    setting = Setting({"dense": 20, "sparse": 0})
    n = len(qrels)

    def planted(candidates, qrels, s, rerank_scores=None, k=10):
        helped = {5: 0, 10: 1}.get(s.rerank_depth) if s.rerank_weight == 1.0 else None
        return [1.0 if helped is not None and i % 2 == helped else 0.5 for i in range(n)]

    monkeypatch.setattr(tuning, "per_query", planted)
    fitted = tuning.fit_rerank(candidates, qrels, setting, {}, depths=(0, 5, 10))
    gain = fitted.gain
    assert gain is not None and gain["depth"] == 5 and gain["ci95"][0] > 0  # in sample: clear
    assert gain["cross_fitted"]["delta"] == 0.0 and gain["cross_fitted"]["chosen"] == ["rerank@10", "rerank@5"]
    assert not gain["adopted"] and fitted.best.rerank_depth == 0


def test_the_written_serve_config_names_folders_by_absolute_path(tmp_path, monkeypatch):
    """serve_tuned.yaml kept index: out/index as the serve config gave it, relative to where
    evaluate ran: served from elsewhere it was "no source.json; not an index folder"."""
    from raytrieve.evaluate.tune import _absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "index").mkdir(parents=True)
    (tmp_path / "models" / "m").mkdir(parents=True)
    config = {"index": "out/index", "dense": [{"model": "models/m", "index": None}, {"model": "all-minilm-l6-v2"}],
              "reranker": {"model": "ms-marco-minilm-l12-v2"}}
    assert _absolute_paths(config) == {
        "index": str(tmp_path / "out" / "index"),
        "dense": [{"model": str(tmp_path / "models" / "m"), "index": None}, {"model": "all-minilm-l6-v2"}],
        "reranker": {"model": "ms-marco-minilm-l12-v2"}}  # names of shipped models stay names
