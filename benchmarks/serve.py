"""The Serve application over HTTP on 127.0.0.1: /search latency and QPS over a 10,000-document
index (dense MiniLM + sparse SPLADE-tiny, RRF), with and without cross-encoder rerank of the
top 20, and /v1/embeddings throughput against SentenceTransformer.encode in one process.

    .venv/bin/python benchmarks/serve.py              # builds out/bench/serve-10k once, then reuses it
    .venv/bin/python benchmarks/serve.py --docs 2000 --seconds 10

Latency: one client, sequential requests (p50 / p99). QPS: --clients concurrent clients for
--seconds. Embeddings: batches of 32 texts, 2 concurrent clients, against ST.encode of the
same texts with batch size 32 and the same threads. Mixed load: one client searching with
rerank@20 beside --clients - 1 searching without, for --seconds. Then each stage alone in this
process (in_process_floor_p50_ms: the replicas' dtype and threads, no Serve), so that the rest
of the HTTP p50 reads as hops and the cores' sharing. Layouts (search_p50_ms_by_layout): the
app redeployed in each other layout of the index (replica: the query models' replicas hold it,
the default; retriever: a deployment of its own, colocate_index false; ingress: the ingress
encodes and searches itself, recall_in_ingress), then in --layout again, the one-client p50 of
each. Backends
(search_p50_ms_by_backend): the app redeployed with the query encoders in the other backend
(torch / onnx: ONNX Runtime), then in --backend again. --direct-ingress: every deploy with
direct_ingress (the ingress replica answers the port, no proxy hop). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parent.parent


# Where /search encodes a query and searches its index: the serve config keys of each layout.
LAYOUTS = {
    "replica": {"colocate_index": True, "recall_in_ingress": False},
    "retriever": {"colocate_index": False, "recall_in_ingress": False},
    "ingress": {"colocate_index": True, "recall_in_ingress": True},
}


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--embed-texts", type=int, default=1024)
    parser.add_argument("--rerank-threads", type=int, default=None,
                        help="the reranker replica's torch_threads (default: the serve config's default)")
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                        help="the query encoders' backend (dense and sparse) for every measurement but the A-B-A")
    parser.add_argument("--no-backends", action="store_true",
                        help="skip redeploying with the other backend and back (search_p50_ms_by_backend)")
    parser.add_argument("--layout", choices=list(LAYOUTS), default="replica",
                        help="where /search encodes queries and searches the index, for every measurement but "
                             "the layouts': replica (the query models' replicas hold it: the default), "
                             "retriever (a deployment of its own), ingress (recall_in_ingress)")
    parser.add_argument("--ingress-backend", choices=["torch", "onnx"], default=None,
                        help="the ingress's query models' backend in the ingress layout (default: --backend)")
    parser.add_argument("--direct-ingress", action="store_true",
                        help="direct_ingress: true (the ingress replica answers the port itself, Serve's proxy on the "
                             "next one); every deploy of the run")
    parser.add_argument("--no-layouts", action="store_true",
                        help="skip redeploying in each other layout and again in --layout, to compare /search "
                             "p50 of the layouts in one run")
    args = parser.parse_args()
    if args.ingress_backend and not args.no_backends:
        parser.error("--ingress-backend: the backends' A-B-A switches the deployments' backend only, while /search "
                     "runs in the ingress's; add --no-backends")

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import requests
    import torch
    from texts import sentences

    from raytrieve.config import from_dict
    from raytrieve.index.build import build_indices
    from raytrieve.inference.config import EncodeConfig
    from raytrieve.inference.encode import run_encode
    from raytrieve.ray_cluster import free_port
    from raytrieve.serve.launch import start
    from raytrieve.serve.client import wait_healthy
    from raytrieve.serve.config import ServeConfig

    work = ROOT / "out" / "bench" / f"serve-{args.docs}"
    work.mkdir(parents=True, exist_ok=True)
    docs = sentences(args.docs, min_words=20, max_words=120, seed=1)
    queries = sentences(args.queries, min_words=4, max_words=12, seed=2)
    if not (work / "corpus.parquet").exists():
        pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(docs))], "text": docs}), work / "corpus.parquet")
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    if not (work / "index" / "documents").exists():  # (an index built before documents/ is built again)  # built once (the encode resumes if stopped)
        run_encode(from_dict(EncodeConfig, {
            "corpus": {"path": str(work / "corpus.parquet")}, "output_dir": str(work / "vectors"), "rows_per_shard": 2000,
            "dense": {"model": "all-minilm-l6-v2", "max_seq_length": 256},
            "sparse": {"model": "splade-tiny", "max_seq_length": 256},
            "compute": {"cpus_per_encode_actor": 1.5, "torch_threads": os.cpu_count()}}))
        build_indices(work / "vectors", work / "index")

    threads = max(1, os.cpu_count() // 2)
    serve_keys = {
        "dense": {"model": "all-minilm-l6-v2", "max_seq_length": 256, "num_cpus": 0.5, "torch_threads": threads,
                  "backend": args.backend},
        "sparse": {"model": "splade-tiny", "max_seq_length": 256, "num_cpus": 0.3, "torch_threads": 1,
                   "backend": args.backend},
        "reranker": {"model": "ms-marco-minilm-l12-v2", "max_seq_length": 256, "num_cpus": 0.5,
                     "max_batch_tokens": 16384, **({"torch_threads": args.rerank_threads} if args.rerank_threads else {})},
        "index": str(work / "index"), "port": free_port(pair=True), "limits": {"max_queued_requests": 256},
        "direct_ingress": args.direct_ingress}
    layout_keys = {name: dict(keys) for name, keys in LAYOUTS.items()}
    if args.ingress_backend:
        layout_keys["ingress"]["ingress_backend"] = args.ingress_backend
    serve_keys = {**serve_keys, **layout_keys[args.layout]}
    cfg = from_dict(ServeConfig, serve_keys)
    url = start(cfg, ray_address=None)
    wait_healthy(url)
    session = requests.Session()
    rerank_threads = next(m for m in session.get(f"{url}/v1/models").json()["data"]
                          if m["id"] == "ms-marco-minilm-l12-v2")["torch_threads"]

    stages: dict[str, list[float]] = {}

    def search(query: str, rerank: bool, record: bool = True) -> float:
        t = time.perf_counter()
        r = session.post(f"{url}/search", json={"query": query, "top_k": 10, "rerank": rerank, "rerank_depth": 20,
                                                 "recall": {"dense": 100, "sparse": 100}}, timeout=60)
        assert r.status_code == 200, r.text
        elapsed = (time.perf_counter() - t) * 1000
        if record and not rerank:  # where the time goes, as the ingress measured it
            for name, ms in r.json()["timings_ms"].items():
                stages.setdefault(name, []).append(ms)
        return elapsed

    for q in queries[:10]:  # warm up every deployment
        search(q, True)
    plain = [search(q, False) for q in queries]
    reranked = [search(q, True) for q in queries[: max(20, len(queries) // 4)]]

    def client(i: int) -> int:
        s, n, stop = requests.Session(), 0, time.time() + args.seconds
        while time.time() < stop:
            q = queries[(i * 7919 + n) % len(queries)]
            assert s.post(f"{url}/search", json={"query": q, "top_k": 10}, timeout=60).status_code == 200
            n += 1
        return n

    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        qps = sum(pool.map(client, range(args.clients))) / args.seconds

    # Mixed load: one client searching with rerank@20 while the others search without, so that a
    # reranker with more threads than its CPU share shows what it costs the plain searches.
    mixed: dict[str, list[float]] = {"plain": [], "rerank": []}

    def mixed_client(i: int) -> None:
        s, n, stop = requests.Session(), 0, time.time() + args.seconds
        rerank = i == 0
        while time.time() < stop:
            t = time.perf_counter()
            r = s.post(f"{url}/search", json={"query": queries[(i * 7919 + n) % len(queries)], "top_k": 10,
                                              "rerank": rerank, "rerank_depth": 20}, timeout=60)
            assert r.status_code == 200, r.text
            mixed["rerank" if rerank else "plain"].append((time.perf_counter() - t) * 1000)
            n += 1

    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(mixed_client, range(args.clients)))

    texts = sentences(args.embed_texts, min_words=5, max_words=120, seed=3)
    batches = [texts[i: i + 32] for i in range(0, len(texts), 32)]

    def embed(batch: list[str]) -> int:
        r = requests.post(f"{url}/v1/embeddings", json={"input": batch}, timeout=120)
        assert r.status_code == 200, r.text
        return len(batch)

    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        served = sum(pool.map(embed, batches)) / (time.perf_counter() - t)

    # The layouts, in this run: --layout (measured above), each other one, then --layout again.
    layouts: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    layouts[args.layout].append(round(_percentile(plain, 50), 1))
    others = [name for name in LAYOUTS if name != args.layout]
    for layout in ([] if args.no_layouts else [*others, args.layout]):
        keys = {k: v for k, v in serve_keys.items() if k != "ingress_backend"}
        start(from_dict(ServeConfig, {**keys, **layout_keys[layout]}), ray_address=None)
        wait_healthy(url)
        for q in queries[:10]:
            search(q, False, record=False)
        layouts[layout].append(round(_percentile([search(q, False, record=False) for q in queries], 50), 1))
    # The query encoders' backends, A-B-A in this run: --backend (measured above), the other, --backend again.
    other = "onnx" if args.backend == "torch" else "torch"
    backends: dict[str, list[float]] = {args.backend: [round(_percentile(plain, 50), 1)], other: []}
    for backend in ([] if args.no_backends else [other, args.backend]):
        keys = {**serve_keys, **{k: {**serve_keys[k], "backend": backend} for k in ("dense", "sparse")}}
        start(from_dict(ServeConfig, keys), ray_address=None)
        wait_healthy(url)
        for q in queries[:10]:
            search(q, False, record=False)
        backends[backend].append(round(_percentile([search(q, False, record=False) for q in queries], 50), 1))
    from ray import serve

    serve.shutdown()
    ray.shutdown()

    # The floor in the backend /search's query encodes ran in (the ingress's when it has its own).
    searched_in = args.ingress_backend if args.layout == "ingress" and args.ingress_backend else args.backend
    floor = in_process_floor(work / "index", queries, docs, threads, rerank_threads, searched_in)
    other_floor = {} if args.no_backends else encode_floor(queries, threads, other)

    from raytrieve.model_ref import resolve_model
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    st = SentenceTransformer(str(resolve_model("all-minilm-l6-v2")), device="cpu")
    st.encode(texts[:64], batch_size=32)
    t = time.perf_counter()
    st.encode(texts, batch_size=32, show_progress_bar=False)
    st_rate = len(texts) / (time.perf_counter() - t)
    print(json.dumps({
        "benchmark": "serve", "docs": args.docs, "queries": len(queries), "clients": args.clients,
        "search_p50_ms": round(_percentile(plain, 50), 1), "search_p99_ms": round(_percentile(plain, 99), 1),
        "search_qps": round(qps, 1), "search_rerank_p50_ms": round(_percentile(reranked, 50), 1),
        "search_rerank_p99_ms": round(_percentile(reranked, 99), 1),
        "embeddings_texts_per_s": round(served, 1), "st_texts_per_s": round(st_rate, 1),
        "embeddings_ratio_vs_st": round(served / st_rate, 3), "replica_threads": threads,
        "rerank_threads": rerank_threads,
        "mixed_search_p50_ms": round(_percentile(mixed["plain"], 50), 1),
        "mixed_search_rerank_p50_ms": round(_percentile(mixed["rerank"], 50), 1),
        "cpu_count": os.cpu_count(), "mean_search_ms": round(float(np.mean(plain)), 1),
        "search_stage_p50_ms": {k: round(_percentile(v, 50), 1) for k, v in stages.items()},
        "search_lookup_share": round(len(stages.get("lookup_ms", [])) / len(plain), 3),  # searches that looked texts up
        "in_process_floor_p50_ms": floor,
        "direct_ingress": args.direct_ingress,
        "layout": args.layout, "ingress_backend": args.ingress_backend, "search_p50_ms_by_layout": layouts,  # the runs in order, per layout
        "backend": args.backend, "search_p50_ms_by_backend": backends,  # the runs in order, per backend
        "in_process_encode_p50_ms_by_backend": {searched_in: {k: v for k, v in floor.items() if k.startswith("encode")},
                                                **({other: other_floor} if other_floor else {})},
    }))


def _encode_p50(model, queries: list[str]) -> float:
    for q in queries[:5]:
        model.encode_query([q], show_progress_bar=False)
    ts = []
    for q in queries:
        t = time.perf_counter()
        model.encode_query([q], show_progress_bar=False)
        ts.append((time.perf_counter() - t) * 1000)
    return round(_percentile(ts, 50), 1)


def encode_floor(queries: list[str], threads: int, backend: str) -> dict[str, float]:
    """One query's encode alone in this process, per query model, in ``backend``."""
    import torch

    from raytrieve.encoders import load_encoder

    out = {}
    for kind, name in (("dense", "all-minilm-l6-v2"), ("sparse", "splade-tiny")):
        torch.set_num_threads(threads if kind == "dense" else 1)
        model = load_encoder(kind, name, device="cpu", max_seq_length=256, dtype="auto", backend=backend)
        out[f"encode_{kind}_ms"] = _encode_p50(model, queries)
    return out


def in_process_floor(index: Path, queries: list[str], docs: list[str], threads: int,
                     rerank_threads: int, backend: str = "torch") -> dict[str, float]:
    """Each /search stage alone in this process, no Serve (p50 ms over the queries): what the
    replicas compute, with their dtype (auto) and threads, so that the rest of the
    HTTP p50 is hops, queueing and the cores' sharing."""
    import random

    import torch

    from raytrieve.encoders import load_encoder
    from raytrieve.index.build import load_indices

    torch.set_num_threads(1)  # as the benchmark's query encoders (sparse always 1; dense cpu_count // 2)
    ix = load_indices(index)
    out: dict[str, float] = {}

    def p50(fn, items) -> float:
        for x in items[:5]:
            fn(x)
        ts = []
        for x in items:
            t = time.perf_counter()
            fn(x)
            ts.append((time.perf_counter() - t) * 1000)
        return round(_percentile(ts, 50), 1)

    for kind, name in (("dense", "all-minilm-l6-v2"), ("sparse", "splade-tiny")):
        torch.set_num_threads(threads if kind == "dense" else 1)  # before the load: ONNX Runtime sizes its pool then
        model = load_encoder(kind, name, device="cpu", max_seq_length=256, dtype="auto", backend=backend)
        vectors = [model.encode_query([q], show_progress_bar=False, **({} if kind == "dense" else {"as_dicts": True}))[0]
                   for q in queries]
        out[f"encode_{kind}_ms"] = _encode_p50(model, queries)
        index_of = getattr(ix, kind)
        if kind == "dense":
            out["recall_dense_ms"] = p50(lambda v: index_of.search(v[None, :], top_k=100), vectors)
        else:
            out["recall_sparse_ms"] = p50(lambda v: index_of.search([v], top_k=100), vectors)
    cross = load_encoder("cross", "ms-marco-minilm-l12-v2", device="cpu", max_seq_length=256, dtype="auto")
    torch.set_num_threads(rerank_threads)
    rng = random.Random(0)
    sets = [[(q, d) for d in rng.sample(docs, 20)] for q in queries[:12]]
    out["rerank20_ms"] = p50(lambda s: cross.predict(s, batch_size=64, token_budget=16384, show_progress_bar=False), sets)
    return out


if __name__ == "__main__":
    main()
