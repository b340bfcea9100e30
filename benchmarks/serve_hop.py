"""Ray Serve's request path with and without two settings of Ray's throughput-optimized mode
(``FAST_PATH``: proxy -> replica over gRPC, endpoints on the replica's own event loop), A-B-A in
one run: Ray is started afresh for each phase with them on (fast), off (Ray's defaults), on again.
This measures what they do for raytrieve's app (BENCHMARKS.md, 2026-12-01: nothing
measurable, so raytrieve does not set them).

``--direct``: instead, the app deployed with ``direct_ingress: true`` (the ingress replica answers
the configured port itself, Serve's proxy listens on the next one; raytrieve.serve.launch), and
measured through both ports, request by request in turn; the two answers of one query must agree.

Each phase deploys the app in the layout BENCHMARKS.md recommends for a CPU (the ingress
encodes queries itself in ONNX Runtime, recall_in_ingress; the model deployments in torch) over
the index benchmarks/serve.py builds, then measures with one client, sequentially:
- ``health_p50_ms``: TEI's /health (an empty answer: the HTTP hop and the ingress's own handling;
  since 2026-12-06 it also pings every deployment, at most once a second (app.HEALTH_CACHE_S),
  which the p50 of calls this close together does not see);
- ``search_p50_ms``: /search without rerank, top 10 of 100 + 100 recalled (as serve.py's);
- the /search stage timings the ingress reports (``search_stage_p50_ms``).

    .venv/bin/python benchmarks/serve.py --docs 2000 ...   # builds out/bench/serve-2000 first
    .venv/bin/python benchmarks/serve_hop.py --docs 2000

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parent.parent
FAST_PATH = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


BODY = {"top_k": 10, "recall": {"dense": 100, "sparse": 100}}  # /search as serve.py sends it


@contextlib.contextmanager
def deployed(keys: dict, queries: list[str], env: dict[str, str | None]) -> Iterator[str]:
    """A fresh local Ray started with ``env`` (None: unset; Ray's processes inherit it), the app
    deployed and warmed up; yields its URL, then shuts both down."""
    import ray
    from serve import _port

    from raytrieve.config import from_dict
    from raytrieve.serve.client import wait_healthy
    from raytrieve.serve.config import ServeConfig
    from raytrieve.serve.launch import start

    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        url = start(from_dict(ServeConfig, {**keys, "port": _port()}), ray_address=None)
        wait_healthy(url)
        for q in queries[:20]:
            requests.post(f"{url}/search", json={"query": q, **BODY}, timeout=60).raise_for_status()
        yield url
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()


def timed(session: requests.Session, method: str, url: str, **kwargs: object) -> tuple[float, requests.Response]:
    """One request's milliseconds, and its (checked) response."""
    started = time.perf_counter()
    response = session.request(method, url, timeout=60, **kwargs)  # type: ignore[arg-type]
    response.raise_for_status()
    return (time.perf_counter() - started) * 1000, response


def p50s(times: dict[str, list[float]]) -> dict[str, float]:
    """``{"health": [...], "search": [...]}`` -> the JSON's p50 (and /search's p99) keys."""
    from serve import _percentile

    return {"health_p50_ms": round(_percentile(times["health"], 50), 1),
            "search_p50_ms": round(_percentile(times["search"], 50), 1),
            "search_p99_ms": round(_percentile(times["search"], 99), 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=2000, help="the serve.py index to use (out/bench/serve-DOCS)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--direct", action="store_true", help="through the proxy against Ray's direct ingress")
    args = parser.parse_args()

    from texts import sentences

    index = ROOT / "out" / "bench" / f"serve-{args.docs}" / "index"
    if not (index / "documents").exists():
        sys.exit(f"{index}: no index; run benchmarks/serve.py --docs {args.docs} first")
    queries = sentences(args.queries, min_words=4, max_words=12, seed=2)
    model = {"max_seq_length": 256, "torch_threads": 1, "backend": "torch"}
    keys = {
        "dense": {"model": "all-minilm-l6-v2", "num_cpus": 0.5, **model},
        "sparse": {"model": "splade-tiny", "num_cpus": 0.3, **model},
        "index": str(index), "colocate_index": True, "recall_in_ingress": True, "ingress_backend": "onnx",
    }
    run = {"benchmark": "serve_hop", "docs": args.docs, "queries": len(queries), "cpu_count": os.cpu_count(),
           "layout": "ingress", "ingress_backend": "onnx"}
    if args.direct:
        print(json.dumps({**run, "direct_ingress": direct(keys, queries)}))
    else:
        print(json.dumps({**run, "phases": [phase(keys, queries, fast) for fast in (True, False, True)]}))


def phase(keys: dict, queries: list[str], fast: bool) -> dict[str, object]:
    """The app on a Ray started with FAST_PATH (``fast``) or without it."""
    from serve import _percentile

    session = requests.Session()
    times: dict[str, list[float]] = {"health": [], "search": []}
    stages: dict[str, list[float]] = {}
    with deployed(keys, queries, {k: v if fast else None for k, v in FAST_PATH.items()}) as url:
        times["health"] = [timed(session, "GET", f"{url}/health")[0] for _ in queries]
        for q in queries:
            ms, r = timed(session, "POST", f"{url}/search", json={"query": q, **BODY})
            times["search"].append(ms)
            for name, stage_ms in r.json()["timings_ms"].items():
                stages.setdefault(name, []).append(stage_ms)
    return {"fast_path": fast, **p50s(times),
            "search_stage_p50_ms": {k: round(_percentile(v, 50), 1) for k, v in stages.items()}}


def direct(keys: dict, queries: list[str]) -> dict[str, dict[str, float]]:
    """The app through Serve's proxy and through its ingress replica's own HTTP server, in turn."""
    session = requests.Session()
    with deployed({**keys, "direct_ingress": True}, queries, {}) as url:
        host, port = url.rsplit(":", 1)
        urls = {"proxy": f"{host}:{int(port) + 1}", "direct": url}
        for q in queries[:20]:  # deployed() warmed up the direct path only
            session.post(f"{urls['proxy']}/search", json={"query": q, **BODY}, timeout=60).raise_for_status()
        times: dict[str, dict[str, list[float]]] = {name: {"health": [], "search": []} for name in urls}
        for q in queries:
            hits = []
            for name, url in urls.items():
                times[name]["health"].append(timed(session, "GET", f"{url}/health")[0])
                ms, r = timed(session, "POST", f"{url}/search", json={"query": q, **BODY})
                times[name]["search"].append(ms)
                hits.append([h["id"] for h in r.json()["hits"]])
            assert hits[0] == hits[1], f"{q!r}: the proxy and the replica answered differently"
    return {name: p50s(t) for name, t in times.items()}


if __name__ == "__main__":
    main()
