"""Training quality against sentence-transformers: the same (query, document) pairs and the
same settings in both trainers (all-MiniLM-L6-v2, MultipleNegativesRankingLoss, batch 32,
no-duplicates batches, AdamW with weight decay 0.01 off biases and LayerNorm weights, linear
schedule with int(10% of the steps) warm-up steps, float32), over several seeds each; then every trained model and the
pretrained one ranks the same held-out queries (packages never trained on).

    .venv/bin/python benchmarks/train_quality.py                       # 3 seeds, 1,024 pairs, lr 1e-4
    .venv/bin/python benchmarks/train_quality.py --seeds 1 2 3 4 5 --pairs 1536

raytrieve trains through the platform (Ray Train, one worker: benchmarks/train.py's
run_raytrieve), sentence-transformers with its SentenceTransformerTrainer; the two interleave
seed by seed. Held-out: queries of the pydocs test split (numpy, scipy) over a corpus drawn
from it, NDCG@10 with one relevant document each, scored by raytrieve's encoder in float32
(an encoder difference would show on the pretrained row too). Prints one JSON line with each
run's NDCG@10, each side's mean and sample standard deviation, and ndcg_gap_vs_st (raytrieve
mean - sentence-transformers mean).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import ROOT, pairs, run_raytrieve, run_sentence_transformers


def held_out(queries: int, corpus: int, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """(query texts, document ids, document texts) from the test split; query i's document is document i."""
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(ROOT / "data" / "pydocs" / "test.parquet").to_pydict()
    order = np.random.default_rng(seed).permutation(len(table["id"]))[:corpus]
    return [table["query"][i] for i in order[:queries]], [table["id"][i] for i in order], [
        table["document"][i] for i in order
    ]


def ndcg_at_10(model_dir: str, data: tuple[list[str], list[str], list[str]], max_seq_length: int) -> float:
    import numpy as np

    from raytrieve.encoders import DenseEncoder
    from raytrieve.evaluation.metrics import query_metrics

    queries, ids, docs = data
    encoder = DenseEncoder(model_dir, dtype="float32")
    encoder.max_seq_length = max_seq_length
    q = encoder.encode_query(queries, normalize_embeddings=True, batch_size=64)
    d = encoder.encode_document(docs, normalize_embeddings=True, batch_size=64)
    scores = q @ d.T
    values = [
        query_metrics([ids[j] for j in np.argsort(-scores[i], kind="stable")[:10]], {ids[i]: 1.0}, (10,))["ndcg@10"]
        for i in range(len(queries))
    ]
    return float(np.mean(values))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--pairs", type=int, default=1024, help="training pairs (one epoch: pairs / batch steps)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--corpus", type=int, default=1500)
    args = parser.parse_args()
    args.steps, args.warmup, args.threads, args.bf16 = args.pairs // args.batch_size, 2, None, False
    data = pairs(args.steps * args.batch_size, seed=0)  # from every train package, the same for both trainers
    test = held_out(args.queries, args.corpus)
    from raytrieve.model_ref import resolve_model

    started = time.perf_counter()
    pretrained = ndcg_at_10(str(resolve_model("all-minilm-l6-v2")), test, args.max_seq_length)
    ours: list[float] = []
    theirs: list[float] = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            run_raytrieve(data, Path(tmp), args, seed=seed, lr=args.lr, warmup_ratio=args.warmup_ratio)
            ours.append(ndcg_at_10(str(Path(tmp) / "raytrieve-model"), test, args.max_seq_length))
            run_sentence_transformers(data, Path(tmp), args, seed=seed, lr=args.lr, warmup_ratio=args.warmup_ratio)
            theirs.append(ndcg_at_10(str(Path(tmp) / "st-model"), test, args.max_seq_length))
        print(f"seed {seed}: raytrieve {ours[-1]:.4f}, sentence-transformers {theirs[-1]:.4f}", file=sys.stderr)

    def spread(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0

    print(json.dumps({
        "pretrained_ndcg@10": round(pretrained, 4),
        "ndcg@10": [round(v, 4) for v in ours], "st_ndcg@10": [round(v, 4) for v in theirs],
        "mean": round(statistics.mean(ours), 4), "st_mean": round(statistics.mean(theirs), 4),
        "std": round(spread(ours), 4), "st_std": round(spread(theirs), 4),
        "ndcg_gap_vs_st": round(statistics.mean(ours) - statistics.mean(theirs), 4),
        "seeds": args.seeds, "pairs": args.steps * args.batch_size, "steps": args.steps, "lr": args.lr,
        "held_out": {"queries": args.queries, "corpus": args.corpus}, "seconds": round(time.perf_counter() - started),
        "machine": f"{os.uname().machine} {os.cpu_count()} cpus",
    }))


if __name__ == "__main__":
    sys.exit(main())
