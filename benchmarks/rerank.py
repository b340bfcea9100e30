"""CrossEncoder.predict at its dtype (default auto) against sentence-transformers'
CrossEncoder.predict in float32 and under torch.autocast(bfloat16): the shipped
ms-marco-MiniLM-L12-v2, the same (query, document) pairs, threads, batch size and
max_seq_length; runs interleaved A B C C B A ..., best of each.

    .venv/bin/python benchmarks/rerank.py                   # 20 queries x 20 candidates
    .venv/bin/python benchmarks/rerank.py --queries 10 --repeats 2

Pairs are real: docstring summaries (queries) and docstrings (documents) of installed packages,
each query with 20 documents (its own and 19 others), as a rerank@20 sees them. Prints one JSON
line: pairs_per_s (fixed batches of --batch-size), budget_pairs_per_s (batches of at most
--token-budget padded tokens, the same pairs), st_pairs_per_s, ratio_vs_st (goal >= 2.5), and
the ranking agreement with sentence-transformers' float32 scores (Spearman over all pairs,
top-1 kept per query).
"""

from __future__ import annotations

import argparse
import json
import os
import platform as _platform
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--token-budget", type=int, default=4096, help="the budget side: padded tokens per batch")
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--dtype", default="auto", help="raytrieve's compute format (auto: what a user gets)")
    args = parser.parse_args()

    import numpy as np
    import torch
    from sentence_transformers import CrossEncoder as STCrossEncoder

    from raytrieve import CrossEncoder
    from raytrieve.data.pydocs import deduplicate, package_pairs
    from raytrieve.encoders.precision import spearman
    from raytrieve.model_ref import resolve_model

    torch.set_num_threads(args.threads)
    found = deduplicate(package_pairs("requests") + package_pairs("packaging") + package_pairs("fsspec"))
    queries = [p.query for p in found[: args.queries]]
    docs = [p.document for p in found]
    pairs = [(q, docs[(i + j * 7) % len(docs)]) for i, q in enumerate(queries) for j in range(args.candidates)]

    path = str(resolve_model("ms-marco-minilm-l12-v2"))
    ours = CrossEncoder(path, dtype="float32")
    ours.max_seq_length = args.max_seq_length
    ours.set_dtype(args.dtype)  # after truncation, as the platform loads it
    ref = STCrossEncoder(path, device="cpu", max_length=args.max_seq_length)

    def st_bf16(batch, **kw):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ref.predict(batch, **kw)

    reference = ref.predict(pairs, batch_size=args.batch_size, show_progress_bar=False)
    ours_scores = ours.predict(pairs, batch_size=args.batch_size)
    budget_scores = np.asarray(ours.predict(pairs, batch_size=256, token_budget=args.token_budget))
    st_bf16(pairs[:64], batch_size=args.batch_size, show_progress_bar=False)

    def timed(name) -> float:
        t = time.perf_counter()
        if name == "raytrieve":
            ours.predict(pairs, batch_size=args.batch_size)
        elif name == "raytrieve_budget":  # rows capped as Serve's dense replica caps them (256)
            ours.predict(pairs, batch_size=256, token_budget=args.token_budget)
        elif name == "st":
            ref.predict(pairs, batch_size=args.batch_size, show_progress_bar=False)
        else:
            st_bf16(pairs, batch_size=args.batch_size, show_progress_bar=False)
        return len(pairs) / (time.perf_counter() - t)

    names = ["raytrieve", "raytrieve_budget", "st", "st_bf16_autocast"]
    runs: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else list(reversed(names)):
            runs[name].append(timed(name))
    best = {k: max(v) for k, v in runs.items()}
    per_query = np.asarray(reference).reshape(len(queries), -1), np.asarray(ours_scores).reshape(len(queries), -1)
    result = {
        "benchmark": "rerank",
        "model": "ms-marco-minilm-l12-v2",
        "pairs": len(pairs),
        "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length,
        "threads": args.threads,
        "dtype": ours.dtype,
        "pairs_per_s": round(best["raytrieve"], 1),
        "token_budget": args.token_budget,
        "budget_pairs_per_s": round(best["raytrieve_budget"], 1),
        "budget_max_abs_diff_vs_fixed": float(np.abs(budget_scores - np.asarray(ours_scores)).max()),
        "st_pairs_per_s": round(best["st"], 1),
        "st_bf16_autocast_pairs_per_s": round(best["st_bf16_autocast"], 1),
        "ratio_vs_st": round(best["raytrieve"] / best["st"], 3),
        "ratio_vs_st_best_backend": round(best["raytrieve"] / max(best["st"], best["st_bf16_autocast"]), 3),
        "rerank20_ms_per_query": round(1000 * args.candidates / best["raytrieve"], 1),
        "spearman_vs_st_float32": round(spearman(np.asarray(reference), np.asarray(ours_scores)), 5),
        "top1_kept": float(np.mean(per_query[0].argmax(1) == per_query[1].argmax(1))),
        "max_abs_diff_vs_st_float32": float(np.abs(np.asarray(reference) - np.asarray(ours_scores)).max()),
        "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "cpu": _platform.processor() or _platform.machine(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
