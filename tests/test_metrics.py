"""Ranking metrics against trec_eval (pytrec_eval) on random runs with ties, graded
relevance, and queries that have no relevant document."""

from __future__ import annotations

import random

import numpy as np
import pytest
import pytrec_eval

from raytrieve.evaluation.metrics import pearson, query_metrics, rank_documents, ranking_metrics, spearman

KS = (1, 3, 5, 10)


def _random_case(seed: int):
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(30)]
    run, qrels = {}, {}
    for q in range(25):
        qid = f"q{q}"
        # Scores rounded to one decimal: many ties.
        run[qid] = {d: round(rng.random(), 1) for d in rng.sample(docs, rng.randint(1, 20))}
        judged = rng.sample(docs, rng.randint(1, 8))
        qrels[qid] = {d: rng.choice([0, 1, 1, 2]) for d in judged}
    qrels["q_none"] = {"d1": 0, "d2": 0}  # no relevant document
    run["q_none"] = {"d1": 0.5}
    return run, qrels


@pytest.mark.parametrize("seed", range(5))
def test_per_query_metrics_equal_trec_eval(seed):
    run, qrels = _random_case(seed)
    measures = {f"{m}.{','.join(map(str, KS))}" for m in ("P", "recall", "ndcg_cut", "map_cut", "success")}
    trec = pytrec_eval.RelevanceEvaluator(qrels, measures | {"recip_rank"}).evaluate(run)
    checked = 0
    for qid, relevant in qrels.items():
        n_rel = sum(1 for g in relevant.values() if g > 0)
        if n_rel == 0:
            continue
        ours = query_metrics(rank_documents(run[qid]), relevant, KS + (1000,))
        t = trec[qid]
        for k in KS:
            assert ours[f"precision@{k}"] == pytest.approx(t[f"P_{k}"], abs=1e-9)
            assert ours[f"recall@{k}"] == pytest.approx(t[f"recall_{k}"], abs=1e-9)
            assert ours[f"ndcg@{k}"] == pytest.approx(t[f"ndcg_cut_{k}"], abs=1e-9)
            assert ours[f"accuracy@{k}"] == pytest.approx(t[f"success_{k}"], abs=1e-9)
            # trec_eval's map_cut divides by R; ours (sentence-transformers') by min(k, R).
            assert ours[f"map@{k}"] * min(k, n_rel) / n_rel == pytest.approx(t[f"map_cut_{k}"], abs=1e-9)
        assert ours["mrr@1000"] == pytest.approx(t["recip_rank"], abs=1e-9)
        checked += 1
    assert checked >= 20


def test_means_skip_queries_without_relevant_documents():
    run, qrels = _random_case(0)
    means = ranking_metrics(run, qrels, KS)
    per_query = [query_metrics(rank_documents(run[q]), r, KS) for q, r in qrels.items() if any(g > 0 for g in r.values())]
    assert means["ndcg@10"] == pytest.approx(np.mean([m["ndcg@10"] for m in per_query]))
    # A query missing from the run counts as a miss, not as skipped.
    small = {"a": {"x": 1}, "b": {"y": 1}}
    assert ranking_metrics({"a": {"x": 1.0}, "b": {"y": 1.0}}, small, [1])["accuracy@1"] == 1.0
    assert ranking_metrics({"a": {"x": 1.0}}, small, [1])["accuracy@1"] == 0.5


def test_ties_break_by_doc_id_descending():
    assert rank_documents({"a": 1.0, "c": 1.0, "b": 2.0, "d": 0.5}) == ["b", "c", "a", "d"]


def test_correlations_against_numpy_and_ranks():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = x + rng.normal(scale=0.5, size=50)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    # Spearman = Pearson of ranks; ties get average ranks.
    a, b = [1, 2, 2, 3, 4], [10, 20, 20, 25, 50]
    assert spearman(a, b) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_scored_list_metrics_against_scikit_learn():
    from sklearn.metrics import average_precision_score, f1_score, matthews_corrcoef, ndcg_score

    from raytrieve.evaluation import metrics as M

    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(2, 25))
        y = rng.integers(0, 3, size=n)
        s = np.round(rng.random(n), 1)  # ties
        if y.max() == 0:
            y[0] = 1
        for k in (3, 10, None):
            assert M.ndcg_with_ties(y, s, k) == pytest.approx(ndcg_score([y], [s], k=k))
        binary = (y > 0).astype(int)
        assert M.average_precision(binary, s) == pytest.approx(average_precision_score(binary, s))
        pred = (s > 0.5).astype(int)
        assert M.matthews_corrcoef(binary, pred) == pytest.approx(matthews_corrcoef(binary, pred))
        multi_pred = rng.integers(0, 3, size=n)
        got = M.f1_scores(y, multi_pred)
        for avg in ("macro", "micro", "weighted"):
            assert got[f"f1_{avg}"] == pytest.approx(f1_score(y, multi_pred, average=avg))
