"""The demo's two ways of scoring a pair of models: in process (the dev split, and Lee), and
through the platform (the encoding job, indices, Serve answering the test queries over HTTP)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raytrieve.demo import sample as sampling
from raytrieve.demo import scoring
from raytrieve.demo.config import DemoConfig
from raytrieve.demo.phase_configs import PhaseConfig
from raytrieve.demo.progress import Progress

# -- in process (the dev split; Lee) ------------------------------------------------------------


def evaluate_in_process(
    kind: str, model: str, split: sampling.Split, recall_k: int, max_seq_length: int, lee: bool
) -> dict[str, Any]:
    from raytrieve.encoders import load_encoder
    from raytrieve.evaluation import InformationRetrievalEvaluator, SparseInformationRetrievalEvaluator

    encoder = load_encoder(kind, model, device="cpu", max_seq_length=max_seq_length)
    cls = InformationRetrievalEvaluator if kind == "dense" else SparseInformationRetrievalEvaluator
    evaluator = cls(
        split.queries,
        split.corpus,
        {q: {d for d, grade in judged.items() if grade > 0} for q, judged in split.qrels.items()},
        ndcg_at_k=(10,),
        mrr_at_k=(10,),
        accuracy_at_k=(1,),
        precision_recall_at_k=(recall_k,),
        map_at_k=(recall_k,),
        write_csv=False,
    )
    hits = next(iter(evaluator.retrieve(encoder).values()))
    # Each query's top recall_k with scores: what the dev fit of /search's settings replays.
    candidates = {
        qid: [[evaluator.corpus_ids[i], float(score)] for score, i in ranked]
        for qid, ranked in zip(evaluator.query_ids, hits)
    }
    rankings = {qid: [d for d, _ in ranked] for qid, ranked in candidates.items()}
    out: dict[str, Any] = {"per_query": scoring.per_query(rankings, split.qrels, recall_k), "candidates": candidates}
    if lee:
        from raytrieve.evaluation.lee import lee_evaluator

        scores = lee_evaluator(write_csv=False)(encoder)
        out["lee_spearman"] = next(v for k, v in scores.items() if "spearman" in k)
    return out


# -- the platform path: encoding job, indices, Serve over HTTP ----------------------------------


SERVED_MODEL_FIELDS = ("kind", "dtype", "backend", "max_seq_length", "torch_threads", "num_cpus", "cache_entries")


def encode_and_index(encode: PhaseConfig[Any], folder: Path) -> dict:
    """Run the encoding job ``encode`` describes, then build the indices in ``folder``/index."""
    from raytrieve.index.build import build_indices
    from raytrieve.inference.encode import run_encode

    result = run_encode(encode.config, where="demo encode")
    vectors = Path(encode.config.output_dir)
    built = build_indices(vectors, folder / "index")
    return {
        "rows": result.rows,
        "rows_per_s": round(result.rows_per_s, 1),
        "seconds": round(result.seconds, 1),
        "index": str(folder / "index"),
        "built": built,
    }


def serve_and_query(
    cfg: DemoConfig,
    samples: sampling.Samples,
    served: PhaseConfig[Any],
    progress: Progress,
    serve_running: bool = False,
    fitted_rerank: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Deploy the app ``served`` describes, query it over HTTP, delete the app. ``serve_running``:
    this run already started Serve (its proxy holds the port); the app is deployed on it.
    ``fitted_rerank``: the rerank fields of the "fitted+rerank" requests (client.run_queries)."""
    from ray import serve

    from raytrieve.demo.client import run_queries
    from raytrieve.serve.client import get, wait_healthy
    from raytrieve.serve.launch import check_ports_free, start

    s, serve_cfg = cfg.serving, served.config
    if not serve_running:
        check_ports_free(serve_cfg, "serving")  # the proxy's too, on port + 1 with direct_ingress
    base = start(serve_cfg, where="demo serve", ray_address=None)
    try:
        wait_healthy(base)
        # What each replica runs (a config's dtype auto resolved there, its threads and CPUs):
        # the report's timings read against it, phase by phase.
        served_models = {m["id"]: {k: m.get(k) for k in SERVED_MODEL_FIELDS} for m in get(f"{base}/v1/models")["data"]}
        progress(f"  Serve is up at {base}; sending {len(samples.test.queries)} test queries to /search over HTTP")
        answers = run_queries(
            base,
            samples.test.queries,
            s.recall,
            s.rerank_depth,
            s.clients,
            progress=lambda line: progress(f"  {line}"),
            fitted_rerank=fitted_rerank,
        )
    finally:
        # Frees the replicas' CPUs for training; Serve's controller and proxy stay up for the
        # next phase (restarting them cost about 10 s) and stop at the end of the run (run.py).
        serve.delete(serve_cfg.app_name)
    return {
        "per_stage": {
            mode: scoring.per_query(r, samples.test.qrels, s.recall) for mode, r in answers["rankings"].items()
        },
        # Each stage's top 10 per query, as answered: what the metrics above were computed from,
        # for a look at single queries (and the reduced demo's test of the rerank stage's order).
        "top10": {mode: {q: ids[:10] for q, ids in r.items()} for mode, r in answers["rankings"].items()},
        "timings_p50_ms": answers["timings_p50_ms"],
        "served_models": served_models,
        "url": base,
    }
