"""Would a longer fine-tuning make the demo's reranker beat the dense model on held-out packages?
The demo trains the MS MARCO MiniLM-L12 cross-encoder for 24 steps (its 15-minute budget) and
its order then stays below dense alone on test (docs/demo-results.md). This measures the curve
past that budget, in process (no Ray): the demo's samples of the pydocs data, hard negatives
mined by the pretrained all-MiniLM-L6-v2 from the train pairs' documents with the shipped mining
selection (jobs/configs/mine_pydocs.yaml: top 30, 10% below the positive's score, 3 negatives),
then the demo's recipe (jobs/configs/cross_mined.yaml: MNRL with one in-batch negative, batch 16,
the demo's rate, bf16 autocast, max_seq_length 128) with a constant rate, one pass over the
mined rows. At each ``--eval-at`` step, the cross-encoder's order of the dense top 10 (NDCG@10)
on dev and test, and test's paired bootstrap 95% interval against dense alone.

    .venv/bin/python benchmarks/rerank_steps.py                  # steps 0, 24, 48, 94 (or the pass's end)
    .venv/bin/python benchmarks/rerank_steps.py --eval-at 0,24 --eval-max-seq-length 256   # trained at 128

``--train-max-seq-length`` / ``--eval-max-seq-length``: the cross-encoder's truncation while it
trains and while it scores (default: the demo's models.max_seq_length). Each score also gives the
NDCG@10 of the dense top 10 reranked with each share of the cross-encoder's score (``*_by_weight``).

Prints one JSON line. The demo mines with its fine-tuned dense model and trains under Ray Train
with a linear schedule: the figures here are this recipe's, not the demo run's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--eval-at", default="0,24,48,94", help="steps after which to score (0: before training)")
    parser.add_argument("--dev-queries", type=int, default=100)
    parser.add_argument("--test-queries", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-max-seq-length", type=int, default=None, help="default: the demo's")
    parser.add_argument("--eval-max-seq-length", type=int, default=None, help="default: the demo's")
    parser.add_argument("--out", default=str(ROOT / "out" / "bench" / "rerank_steps"))
    args = parser.parse_args()
    eval_at = sorted({int(s) for s in args.eval_at.split(",")})

    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from dense_heads import dense_heads

    from raytrieve import CrossEncoder, DenseEncoder
    from raytrieve.config import load_yaml
    from raytrieve.demo.config import DemoConfig
    from raytrieve.demo.sample import ensure_pydocs, prepare
    from raytrieve.evaluate.scoring import paired_interval
    from raytrieve.evaluation.metrics import query_metrics
    from raytrieve.inference.config import MineConfig
    from raytrieve.inference.mine import select_negatives
    from raytrieve.losses.cross import MultipleNegativesRankingLoss
    from raytrieve.model_ref import resolve_model
    from raytrieve.serve.tuning import RERANK_WEIGHTS

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    cfg = DemoConfig()
    samples = prepare(cfg, ensure_pydocs(ROOT / cfg.pydocs_dir, print), Path(args.out))
    selection = load_yaml(MineConfig, ROOT / "jobs" / "configs" / "mine_pydocs.yaml").selection
    dense = DenseEncoder(str(resolve_model(cfg.models.dense)))
    cross = CrossEncoder(str(resolve_model(cfg.models.reranker)))
    dense.max_seq_length = cross.max_seq_length = cfg.models.max_seq_length
    lengths = {
        "train": args.train_max_seq_length or cfg.models.max_seq_length,
        "eval": args.eval_max_seq_length or cfg.models.max_seq_length,
    }

    # Hard negatives for the train pairs, as `raytrieve mine` selects them (its retriever's scores).
    train = pq.read_table(samples.train_path).to_pydict()
    docs = list(dict.fromkeys(train["document"]))
    position = {d: j for j, d in enumerate(docs)}
    doc_vectors = dense.encode_document(docs, normalize_embeddings=True)
    query_vectors = dense.encode_query(train["query"], normalize_embeddings=True)
    rows = []
    for q, positive, scores in zip(train["query"], train["document"], query_vectors @ doc_vectors.T):
        order = [int(j) for j in np.argsort(-scores, kind="stable") if docs[j] != positive][: selection.range_max]
        chosen = select_negatives(order, scores[order], float(scores[position[positive]]), selection, rng)
        if len(chosen) == selection.num_negatives:
            rows.append([q, positive, *(docs[j] for j in chosen)])
    rng.shuffle(rows)

    def ndcg(order: list[str], relevant: dict[str, float]) -> float:
        return query_metrics(order, relevant, (10,))["ndcg@10"]

    splits = {
        name: [(h, [d for d, _ in h.hits], h.texts(split.corpus)) for h in dense_heads(dense, split, n, 10)]
        for name, split, n in (("dev", samples.dev, args.dev_queries), ("test", samples.test, args.test_queries))
    }
    dense_ndcg = {name: [ndcg(order, h.relevant) for h, order, _ in hs] for name, hs in splits.items()}

    def score(step: int, seconds: float) -> dict:
        cross.eval()
        cross.max_seq_length = lengths["eval"]
        out: dict = {"step": step, "train_seconds": round(seconds, 1)}
        for name, hs in splits.items():
            pairs = [(h.query, text) for h, _, texts in hs for text in texts]
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                ce = np.asarray(cross.predict(pairs, batch_size=32)).reshape(len(hs), 10)
            got = [
                ndcg([order[k] for k in np.argsort(-ce[i], kind="stable")], h.relevant)
                for i, (h, order, _) in enumerate(hs)
            ]
            out[name] = round(float(np.mean(got)), 4)
            # A share w of the cross-encoder's score (serve/fusion.py interpolate), as /search serves it.
            out[f"{name}_by_weight"] = {
                str(w): round(float(np.mean([h.ndcg10(ce[i].tolist(), w) for i, (h, _, _) in enumerate(hs)])), 4)
                for w in RERANK_WEIGHTS
            }
            if name == "test":
                delta, low, high = paired_interval(dense_ndcg["test"], got)
                out["test_vs_dense"], out["ci95"] = round(delta, 4), [round(low, 4), round(high, 4)]
        cross.train()
        cross.max_seq_length = lengths["train"]
        print(json.dumps(out), flush=True)
        return out

    t = cfg.reranker_training
    loss_fn = MultipleNegativesRankingLoss(cross, num_negatives=1)
    optimizer = torch.optim.AdamW(cross.parameters(), lr=t.learning_rate)
    curve, step, trained = [], 0, 0.0
    if 0 in eval_at:
        curve.append(score(0, 0.0))
    cross.train()
    cross.max_seq_length = lengths["train"]
    for start in range(0, len(rows) - t.batch_size + 1, t.batch_size):
        if step >= eval_at[-1]:
            break
        batch = rows[start : start + t.batch_size]
        columns = [[r[c] for r in batch] for c in range(len(batch[0]))]
        began = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(columns)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        trained += time.perf_counter() - began
        step += 1
        if step in eval_at:
            curve.append(score(step, trained))
    if step < eval_at[-1] and (not curve or curve[-1]["step"] != step):
        curve.append(score(step, trained))  # the mined rows ran out first: the whole pass
    print(
        json.dumps(
            {
                "benchmark": "rerank_steps",
                "dense": cfg.models.dense,
                "reranker": cfg.models.reranker,
                "max_seq_length": {"dense": cfg.models.max_seq_length, "reranker": lengths},
                "batch_size": t.batch_size,
                "learning_rate": t.learning_rate,
                "mined_rows": len(rows),
                "demo_steps": t.max_steps,
                "queries": {name: len(hs) for name, hs in splits.items()},
                "dense_ndcg@10": {name: round(float(np.mean(v)), 4) for name, v in dense_ndcg.items()},
                "curve": curve,
                "machine": f"{os.uname().machine} {os.cpu_count()} cpus",
            }
        )
    )


if __name__ == "__main__":
    main()
