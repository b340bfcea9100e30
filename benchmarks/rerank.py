"""CrossEncoder.predict at its dtype (default auto) against sentence-transformers'
CrossEncoder.predict in float32, under torch.autocast(bfloat16), and on its ONNX backend in
float32 and int8 (dynamic quantization) where optimum-onnx and onnxruntime are installed (the
benchmark venv: `make bench-venv`; see st_onnx.py): the shipped ms-marco-MiniLM-L12-v2, the same
(query, document) pairs, threads, batch size and max_seq_length; runs interleaved
A B C ... C B A, best of each.

    .venv/bin/python benchmarks/rerank.py                   # 20 queries x 20 candidates
    .venv/bin/python benchmarks/rerank.py --queries 10 --repeats 2
    .venv-bench/bin/python benchmarks/rerank.py --queries 10 --repeats 2   # with the ONNX sides

Pairs are real: docstring summaries (queries) and docstrings (documents) of installed packages,
each query with 20 documents (its own and 19 others), as a rerank@20 sees them. Prints one JSON
line: pairs_per_s (fixed batches of --batch-size), budget_pairs_per_s (batches of at most
--token-budget padded tokens, the same pairs), st_pairs_per_s, ratio_vs_st (goal >= 2.5),
ratio_vs_st_best_backend against best_st_backend (the fastest sentence-transformers side whose
score Spearman to its float32 passes raytrieve's cross-encoder guard), and each side's ranking
agreement with sentence-transformers' float32 scores (Spearman over all pairs, top-1 kept per query).
"""

from __future__ import annotations

import argparse
import json
import os
import platform as _platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


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
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import numpy as np
    import torch
    from sentence_transformers import CrossEncoder as STCrossEncoder
    from st_onnx import against_st, load, versions

    from raytrieve import CrossEncoder
    from raytrieve.data.pydocs import deduplicate, package_pairs
    from raytrieve.encoders.precision import CROSS_MIN_SPEARMAN, spearman
    from raytrieve.model_ref import resolve_model

    torch.set_num_threads(args.threads)
    found = deduplicate(package_pairs("requests") + package_pairs("packaging") + package_pairs("fsspec"))
    queries = [p.query for p in found[: args.queries]]
    docs = [p.document for p in found]
    pairs = [(q, docs[(i + j * 7) % len(docs)]) for i, q in enumerate(queries) for j in range(args.candidates)]

    path = str(resolve_model("ms-marco-minilm-l12-v2"))
    ours = CrossEncoder(path, dtype="float32", device=args.device)
    ours.max_seq_length = args.max_seq_length
    ours.set_dtype(args.dtype)  # after truncation, as the platform loads it
    st_kw = {"device": args.device, "max_length": args.max_seq_length}
    device_type = torch.device(args.device).type
    ref = STCrossEncoder(path, **st_kw)
    onnx, onnx_report = load(STCrossEncoder, path, "ms-marco-minilm-l12-v2", args.threads, **st_kw)

    def st_bf16(batch):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return ref.predict(batch, batch_size=args.batch_size, show_progress_bar=False)

    def st_side(model):
        return lambda batch: model.predict(batch, batch_size=args.batch_size, show_progress_bar=False)

    sides = {"raytrieve": lambda batch: ours.predict(batch, batch_size=args.batch_size), "st": st_side(ref)}
    # Rows capped as Serve's dense replica caps them (256); the budget bounds the padded tokens.
    sides["raytrieve_budget"] = lambda batch: ours.predict(batch, batch_size=256, token_budget=args.token_budget)
    sides["st_bf16_autocast"] = st_bf16
    sides.update({name: st_side(model) for name, model in onnx.items()})
    if device_type == "cuda":  # sentence-transformers' documented GPU speed-up: the model in float16
        sides["st_fp16"] = st_side(STCrossEncoder(path, **st_kw).half())

    # The scores double as every side's warm-up.
    reference = np.asarray(sides["st"](pairs))
    scores = {name: np.asarray(fn(pairs)) for name, fn in sides.items()}
    ours_scores, budget_scores = scores["raytrieve"], scores["raytrieve_budget"]
    quality = {name: spearman(reference, s) for name, s in scores.items()}

    def top1_kept(s) -> float:
        return float(np.mean(reference.reshape(len(queries), -1).argmax(1) == s.reshape(len(queries), -1).argmax(1)))

    def timed(name) -> float:
        t = time.perf_counter()
        sides[name](pairs)
        return len(pairs) / (time.perf_counter() - t)

    names = list(sides)
    runs: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else list(reversed(names)):
            runs[name].append(timed(name))
    best = {k: max(v) for k, v in runs.items()}
    # Tokens per pair as the model reads them: truncated at max_seq_length, no padding.
    tokens_per_pair = float(ours.tokenize(pairs)["attention_mask"].sum(1).float().mean())
    st_speed = {k: v for k, v in best.items() if k.startswith("st")}
    result = {
        "benchmark": "rerank",
        "model": "ms-marco-minilm-l12-v2",
        "pairs": len(pairs),
        "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length,
        "threads": args.threads,
        "dtype": ours.dtype,
        "device": torch.cuda.get_device_name() if device_type == "cuda" else "cpu",
        "pairs_per_s": round(best["raytrieve"], 1),
        "tokens_per_pair": round(tokens_per_pair, 1),
        "tokens_per_s": round(best["raytrieve"] * tokens_per_pair),
        "st_tokens_per_s": round(best["st"] * tokens_per_pair),
        "token_budget": args.token_budget,
        "budget_pairs_per_s": round(best["raytrieve_budget"], 1),
        "budget_max_abs_diff_vs_fixed": float(np.abs(budget_scores - np.asarray(ours_scores)).max()),
        "st_pairs_per_s": round(best["st"], 1),
        **{f"{k}_pairs_per_s": round(v, 1) for k, v in st_speed.items() if k != "st"},
        **against_st(best["raytrieve"], st_speed, {k: quality[k] for k in st_speed}, CROSS_MIN_SPEARMAN),
        **onnx_report,
        "rerank20_ms_per_query": round(1000 * args.candidates / best["raytrieve"], 1),
        "spearman_vs_st_float32": round(quality["raytrieve"], 5),
        "top1_kept": top1_kept(ours_scores),
        "max_abs_diff_vs_st_float32": float(np.abs(reference - ours_scores).max()),
        "spearman_vs_st_float32_by_side": {k: round(v, 5) for k, v in quality.items()},
        "top1_kept_by_side": {k: top1_kept(s) for k, s in scores.items()},
        "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "cpu": _platform.processor() or _platform.machine(),
        "versions": versions(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
