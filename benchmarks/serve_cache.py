"""The replicas' output cache (``cache_entries``) on the demo's request pattern: each pydocs test
query sent three times over HTTP, as demo/client.py does (RRF + rerank@10 with every stage,
the app's convex `search:` defaults, those defaults + rerank@10 at weight 0.5), by 4 clients.
The app is deployed with the caches off and on in turn (off, on, off, on; the pretrained
MiniLM and SPLADE-tiny at 128 tokens, MS MARCO MiniLM-L12 at 256, dtype auto, 0.5 CPU and 2
threads each, as the demo serves them), over the demo's 1,000 test documents.

Reference: sentence-transformers' CrossEncoder.predict in this process (in the dtype the
reranker replica reported, the same threads, batches of 10 as the requests send them) on every
pair of the uncached run's rerank requests: the model's cost of those pairs with no server
around it. The pair counts are counted from the answers' rankings (each rerank request
rescores its top 10).

    .venv/bin/python benchmarks/serve_cache.py              # 60 queries, 2 rounds each way
    .venv/bin/python benchmarks/serve_cache.py --queries 150 --rounds 1

Prints one JSON line. The index is built once into out/bench/serve-cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parent.parent

# The demo's fine-tuned phase fitted these on dev (docs/demo-results.json, fitted_search).
SEARCH = {
    "recall": {"dense": 20, "sparse": 100},
    "fusion": {"method": "convex", "normalization": "zscore", "dense_weight": 0.7, "sparse_weight": 0.3},
    "rerank": False,
}
FITTED_RERANK = {"rerank": True, "rerank_depth": 10, "rerank_weight": 0.5}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2, help="deploys with the caches off, then on, this often")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per replica (the demo's)")
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()

    import ray
    import torch

    from raytrieve.config import from_dict
    from raytrieve.demo import sample as sampling
    from raytrieve.demo.client import run_queries
    from raytrieve.demo.config import DemoConfig
    from raytrieve.index.build import build_indices
    from raytrieve.inference.config import EncodeConfig
    from raytrieve.inference.encode import run_encode
    from raytrieve.ray_cluster import free_port
    from raytrieve.serve.client import get, post, wait_healthy
    from raytrieve.serve.config import ServeConfig
    from raytrieve.serve.launch import start

    work = ROOT / "out" / "bench" / "serve-cache"
    cfg = DemoConfig().check("demo")
    samples = sampling.prepare(cfg, sampling.ensure_pydocs(Path(cfg.pydocs_dir), print), work / "data")
    queries = dict(sorted(samples.test.queries.items())[: args.queries])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    if not (work / "index" / "documents").exists():  # (an index built before documents/ is built again)  # built once
        run_encode(from_dict(EncodeConfig, {
            "corpus": {"path": str(samples.test_corpus_path), "text_column": "document"}, "output_dir": str(work / "vectors"),
            "dense": {"model": "all-minilm-l6-v2", "max_seq_length": 128},
            "sparse": {"model": "splade-tiny", "max_seq_length": 128}}))
        build_indices(work / "vectors", work / "index")

    port = free_port(pair=True)  # every deploy answers here: the proxy Serve starts first stays on port + 1

    dtypes: list[str] = []

    def deploy(cache: bool) -> tuple[str, str]:
        model = {"num_cpus": 0.5, "torch_threads": args.threads}
        cfg = from_dict(ServeConfig, {
            "dense": {"model": "all-minilm-l6-v2", "max_seq_length": 128, "cache_entries": 10000 if cache else 0,
                      **model},
            "sparse": {"model": "splade-tiny", "max_seq_length": 128, "cache_entries": 10000 if cache else 0, **model},
            "reranker": {"model": "ms-marco-minilm-l12-v2", "max_seq_length": 256, "max_batch_tokens": 16384,
                         "cache_entries": 50000 if cache else 0, **model},
            "index": str(work / "index"), "port": port, "direct_ingress": True, "search": SEARCH,
            "limits": {"max_top_k": 100, "max_recall": 100, "max_queued_requests": args.clients}})
        url = start(cfg, ray_address=None)
        wait_healthy(url)
        # Warm every deployment with a query the measured ones do not hold.
        post(f"{url}/search", {"query": "warm up", "rerank": True, "top_k": 10})
        dtypes.append(next(m["dtype"] for m in get(f"{url}/v1/models")["data"] if m["kind"] == "reranker"))
        return url, cfg.app_name

    from ray import serve

    seconds: dict[str, list[float]] = {"off": [], "on": []}
    rankings: dict[str, list] = {"off": [], "on": []}
    for _ in range(args.rounds):
        for mode in ("off", "on"):
            url, app = deploy(mode == "on")
            t = time.perf_counter()
            answers = run_queries(url, queries, 100, 10, args.clients, fitted_rerank=FITTED_RERANK)
            seconds[mode].append(round(time.perf_counter() - t, 1))
            rankings[mode].append(answers["rankings"])
            serve.delete(app)
    serve.shutdown()
    ray.shutdown()

    # The pairs the uncached reranker scored: each query's RRF top 10 and its fitted top 10.
    off = rankings["off"][0]
    pairs = [(queries[q], samples.test.corpus[d]) for stage in ("hybrid+rerank", "fitted+rerank")
             for q in sorted(queries) for d in off[stage][q][:10]]
    unique = len(set(pairs))
    from sentence_transformers import CrossEncoder

    from raytrieve.model_ref import resolve_model

    torch.set_num_threads(args.threads)
    st = CrossEncoder(str(resolve_model("ms-marco-minilm-l12-v2")), max_length=256,
                      model_kwargs={"torch_dtype": getattr(torch, dtypes[0])})
    st.predict(pairs[:10], batch_size=10)
    t = time.perf_counter()
    for i in range(0, len(pairs), 10):
        st.predict(pairs[i: i + 10], batch_size=10, show_progress_bar=False)
    st_seconds = time.perf_counter() - t
    # The rankings with the caches on are the rankings without (bf16 scores may tie differently).
    same = statistics.mean(
        rankings["on"][0][s][q][:10] == off[s][q][:10] for s in ("hybrid+rerank", "fitted+rerank") for q in queries)
    print(json.dumps({
        "queries": len(queries), "requests": 3 * len(queries), "clients": args.clients, "threads": args.threads,
        "reranker_dtype": dtypes[0],
        "seconds_cache_off": seconds["off"], "seconds_cache_on": seconds["on"],
        "speedup": round(statistics.mean(seconds["off"]) / statistics.mean(seconds["on"]), 2),
        "reranked_pairs": len(pairs), "unique_pairs": unique,
        "st_predict_seconds_all_pairs": round(st_seconds, 1),
        "st_pairs_per_s": round(len(pairs) / st_seconds, 1),
        "served_pairs_per_s_cache_off": round(len(pairs) / statistics.mean(seconds["off"]), 1),
        "top10_same_share_on_vs_off": round(same, 3),
    }))


if __name__ == "__main__":
    sys.exit(main())
