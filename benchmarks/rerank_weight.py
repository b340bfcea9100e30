"""Does a share of the cross-encoder's score help where its order alone hurts? The demo's
dev and test splits of the pydocs data (docstrings; test packages never trained on), the
shipped pretrained all-MiniLM-L6-v2 retrieving and the MS MARCO MiniLM-L12 cross-encoder
reranking its top ``--depth`` (dense heads: the fit reranks its fitted fusion's), both at
the demo's models.max_seq_length (128; the reranker at ``--reranker-max-seq-length`` when given)
and at their default dtype, all in process (no Ray).

For each rerank weight w (serve/fusion.py ``interpolate``: w x the cross-encoder's z-score +
(1 - w) x the dense score's, over the head; w 1 is the cross-encoder's order alone), NDCG@10 on
dev and on test, and test's paired bootstrap 95% interval against dense alone.

    .venv/bin/python benchmarks/rerank_weight.py                 # 100 dev and 150 test queries, depth 10
    .venv/bin/python benchmarks/rerank_weight.py --reranker-max-seq-length 256

Prints one JSON line: dev and test NDCG@10 per weight, and test minus dense with its interval.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dev-queries", type=int, default=100)
    parser.add_argument("--test-queries", type=int, default=150)
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--reranker-max-seq-length", type=int, default=None, help="default: the demo's")
    parser.add_argument("--out", default=str(ROOT / "out" / "bench" / "rerank_weight"))
    args = parser.parse_args()

    import numpy as np
    from dense_heads import Head, dense_heads

    from raytrieve import CrossEncoder, DenseEncoder
    from raytrieve.demo.config import DemoConfig
    from raytrieve.demo.sample import ensure_pydocs, prepare
    from raytrieve.evaluate.scoring import paired_interval
    from raytrieve.model_ref import resolve_model
    from raytrieve.serve.tuning import RERANK_WEIGHTS

    cfg = DemoConfig()
    samples = prepare(cfg, ensure_pydocs(ROOT / cfg.pydocs_dir, print), Path(args.out))
    dense = DenseEncoder(str(resolve_model(cfg.models.dense)))
    cross = CrossEncoder(str(resolve_model(cfg.models.reranker)))
    dense.max_seq_length = cfg.models.max_seq_length
    cross.max_seq_length = args.reranker_max_seq_length or cfg.models.max_seq_length

    def heads(split, n: int) -> list[tuple[Head, list[float]]]:
        """Each query's dense top ``depth`` with its cross-encoder scores."""
        found = dense_heads(dense, split, n, args.depth)
        pairs = [(h.query, text) for h in found for text in h.texts(split.corpus)]
        ce = np.asarray(cross.predict(pairs)).reshape(len(found), args.depth)
        return list(zip(found, ce.tolist()))

    def ndcg(rows: list[tuple[Head, list[float]]], weight: float | None) -> list[float]:
        return [head.ndcg10() if weight is None else head.ndcg10(ce, weight) for head, ce in rows]

    dev, test = heads(samples.dev, args.dev_queries), heads(samples.test, args.test_queries)
    base = ndcg(test, None)
    result: dict = {
        "benchmark": "rerank_weight",
        "dense": cfg.models.dense,
        "reranker": cfg.models.reranker,
        "dtypes": {"dense": dense.dtype, "reranker": cross.dtype},
        "depth": args.depth,
        "max_seq_length": {"dense": dense.max_seq_length, "reranker": cross.max_seq_length},
        "queries": {"dev": len(dev), "test": len(test)},
        "dense_ndcg@10": {"dev": float(np.mean(ndcg(dev, None))), "test": float(np.mean(base))},
        "by_weight": {},
    }
    for w in RERANK_WEIGHTS:  # the weights the fit tries
        scores = ndcg(test, w)
        delta, low, high = paired_interval(base, scores)
        result["by_weight"][str(w)] = {
            "dev": round(float(np.mean(ndcg(dev, w))), 4),
            "test": round(float(np.mean(scores)), 4),
            "test_vs_dense": round(delta, 4),
            "ci95": [round(low, 4), round(high, 4)],
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
