"""The demo asks its questions the way a user's retrieval pipeline would, over real HTTP to
/search, and scores what comes back."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from raytrieve.serve.client import post

STAGES = ("dense", "sparse", "hybrid", "hybrid+rerank", "fitted", "fitted+rerank")


def run_queries(
    base: str,
    queries: Mapping[str, str],
    recall: int,
    rerank_depth: int,
    clients: int,
    progress: Callable[[str], None] | None = None,
    fitted_rerank: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every query two or three times: once through the untuned pipeline (dense + sparse recall,
    RRF k=60, rerank), with ``return_stages`` so one answer scores every stage; once with nothing
    but the query, answered by the app's ``search:`` defaults ("fitted": fitted on the dev split
    when the demo fits them); and, unless ``fitted_rerank`` is None (the defaults rerank already),
    with those defaults and the rerank fields ``fitted_rerank`` ("fitted+rerank"). Returns per
    stage: query id -> ranked ids; and the median of each server-side timing of the untuned
    request.

    The reranker rescores only the top ``rerank_depth`` fused candidates; below them the
    ranking continues in fused order, so Recall@k of "hybrid+rerank" counts the same pool.
    """
    body = {
        "top_k": rerank_depth,
        "recall": {"dense": recall, "sparse": recall},
        # Every field the untuned rows stand for, so the app's fitted search: defaults fill none.
        "fusion": {"method": "rrf", "k": 60.0},
        "rerank": True,
        "rerank_depth": rerank_depth,
        "rerank_weight": 1.0,
        "return_text": False,
        "return_stages": True,
    }
    rankings: dict[str, dict[str, list[str]]] = {m: {} for m in STAGES}
    timings: dict[str, list[float]] = {"http_ms": []}
    qids = sorted(queries)

    def ask(qid: str) -> None:
        t = time.perf_counter()
        answer = post(f"{base}/search", {"query": queries[qid], **body})
        timings["http_ms"].append((time.perf_counter() - t) * 1000)
        for name, value in answer["timings_ms"].items():
            timings.setdefault(name, []).append(value)
        stages = answer["stages"]
        fused = [d for d, _ in stages["fused"]][:recall]
        head = [hit["id"] for hit in answer["hits"]]
        rankings["dense"][qid] = [d for d, _ in stages["dense"]]
        rankings["sparse"][qid] = [d for d, _ in stages["sparse"]]
        rankings["hybrid"][qid] = fused
        reranked = set(head)
        rankings["hybrid+rerank"][qid] = head + [d for d in fused if d not in reranked]
        served = post(f"{base}/search", {"query": queries[qid], "top_k": recall, "return_text": False})
        rankings["fitted"][qid] = [hit["id"] for hit in served["hits"]]
        if fitted_rerank is not None:
            served = post(
                f"{base}/search", {"query": queries[qid], "top_k": recall, "return_text": False, **fitted_rerank}
            )
        rankings["fitted+rerank"][qid] = [hit["id"] for hit in served["hits"]]

    done = 0
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        for _ in pool.map(ask, qids):
            done += 1
            if progress and (done % max(1, len(qids) // 5) == 0 or done == len(qids)):
                progress(f"{done}/{len(qids)} queries ({time.monotonic() - started:.0f}s)")
    return {"rankings": rankings, "timings_p50_ms": {k: round(statistics.median(v), 1) for k, v in timings.items()}}
