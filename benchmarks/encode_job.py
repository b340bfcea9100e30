"""The corpus encoding job (Ray Data, embedded local Ray) end to end against
SentenceTransformer.encode in one process: same model (the shipped all-MiniLM-L6-v2), same
sentences, same torch threads.

    .venv/bin/python benchmarks/encode_job.py                  # 20,000 sentences, 5-120 words
    .venv/bin/python benchmarks/encode_job.py --n 2000

The job's time is everything ``run_encode`` does: reading and checking the corpus, loading
the model on the driver, starting the tokenizer and encoder actors (each loads the model),
encoding, writing and checksumming the shards and the manifest. Ray itself is started
before the clock (``ray_init_s`` is reported). SentenceTransformer's time is its encode call.
A second job run uses sentence-transformers' own batching (``st_batch_size`` rows sorted by
length, no token budget), so the data plane is compared at equal batching too
(``job_same_batching_sentences_per_s``, ``ratio_same_batching_vs_st``); order: job, ST, job.
Prints one JSON line with job_sentences_per_s, st_sentences_per_s and ratio_vs_st.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as _platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rows-per-shard", type=int, default=2000)
    parser.add_argument("--token-budget", type=int, default=2048)
    parser.add_argument("--st-batch-size", type=int, default=32)
    args = parser.parse_args()

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import torch
    from sentence_transformers import SentenceTransformer
    from texts import sentences

    from raytrieve.config import from_dict
    from raytrieve.inference.config import EncodeConfig
    from raytrieve.inference.encode import run_encode
    from raytrieve.inference.shards import read_vectors
    from raytrieve.model_ref import resolve_model

    texts = sentences(args.n)
    model = str(resolve_model("all-minilm-l6-v2"))
    gpu = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="encode-job-bench-"))
    pq.write_table(pa.table({"id": [f"s{i}" for i in range(len(texts))], "text": texts}), work / "corpus.parquet")

    t = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - t
    def job_run(name: str, token_budget: int, max_batch_size: int) -> tuple[float, Any, Any]:
        cfg = from_dict(EncodeConfig, {
            "corpus": {"path": str(work / "corpus.parquet")}, "output_dir": str(work / name),
            "rows_per_shard": args.rows_per_shard, "dense": {"model": model},
            # The encoder actor gets the same threads as sentence-transformers below; the tokenizer
            # actor runs beside it on the remaining half CPU of Ray's accounting.
            "compute": {"tokenize_actors": 1, "encode_actors": 1, "torch_threads": args.threads,
                        "cpus_per_encode_actor": max(0.5, os.cpu_count() - 0.5) if not gpu else 1.0,
                        "token_budget": token_budget, "max_batch_size": max_batch_size},
        })
        t = time.perf_counter()
        result = run_encode(cfg)
        return time.perf_counter() - t, result, read_vectors(cfg.output_dir).dense

    job_s, result, job = job_run("vectors", args.token_budget, 256)
    ray.shutdown()  # sentence-transformers runs with no Ray processes beside it

    torch.set_num_threads(args.threads)
    st = SentenceTransformer(model, device="cuda" if gpu else "cpu")
    t = time.perf_counter()
    ref = st.encode(texts, batch_size=args.st_batch_size, normalize_embeddings=True, show_progress_bar=False)
    st_s = time.perf_counter() - t
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    same_s, _, same = job_run("vectors-st-batching", 10**9, args.st_batch_size)
    ray.shutdown()

    out = {
        "benchmark": "encode_job", "model": "all-minilm-l6-v2", "n": args.n, "threads": args.threads,
        "device": torch.cuda.get_device_name() if gpu else "cpu", "rows_per_shard": args.rows_per_shard,
        "token_budget": args.token_budget, "st_batch_size": args.st_batch_size,
        "job_sentences_per_s": round(args.n / job_s, 1), "st_sentences_per_s": round(args.n / st_s, 1),
        "ratio_vs_st": round(st_s / job_s, 3), "job_s": round(job_s, 1), "st_s": round(st_s, 1),
        "ray_init_s": round(ray_init_s, 1), "shards": result.shards,
        "job_same_batching_sentences_per_s": round(args.n / same_s, 1),
        "ratio_same_batching_vs_st": round(st_s / same_s, 3),
        "max_abs_diff_vs_st": float(max(np.abs(job - ref).max(), np.abs(same - ref).max())),
        "cpu": _platform.processor() or _platform.machine(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
