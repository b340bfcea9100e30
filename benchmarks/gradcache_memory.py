"""Peak memory of one training step (forward + backward) of MultipleNegativesRankingLoss
against CachedMultipleNegativesRankingLoss (GradCache, mini-batch 32), on the shipped
all-MiniLM-L6-v2, for raytrieve and for sentence-transformers in the same run.

    .venv/bin/python benchmarks/gradcache_memory.py                 # max_seq_length 64
    .venv/bin/python benchmarks/gradcache_memory.py --max-seq-length 128

Each configuration runs in a fresh subprocess; a sampler thread reads the process's
resident memory every 2 ms during the step, and the figure is the peak minus the
resident memory just before the step (model, optimizer-free, inputs tokenized).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def one_step(lib: str, loss_name: str, batch: int, max_seq_length: int, threads: int, texts_file: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    with open(texts_file) as f:
        texts = json.load(f)
    anchors, positives = texts["anchors"][:batch], texts["positives"][:batch]
    from raytrieve.model_ref import resolve_model

    path = str(resolve_model("all-minilm-l6-v2"))
    if lib == "raytrieve":
        import raytrieve.losses as L
        from raytrieve import DenseEncoder

        model = DenseEncoder(path, device="cpu")
        model.max_seq_length = max_seq_length
        features = [model.tokenize(anchors), model.tokenize(positives)]
        loss_fn = (L.MultipleNegativesRankingLoss(model) if loss_name == "plain"
                   else L.CachedMultipleNegativesRankingLoss(model, mini_batch_size=32))
    else:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer import losses

        model = SentenceTransformer(path, device="cpu")
        model.max_seq_length = max_seq_length
        features = [model.preprocess(anchors), model.preprocess(positives)]
        loss_fn = (losses.MultipleNegativesRankingLoss(model) if loss_name == "plain"
                   else losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=32))
    model.train()
    base = rss_mb()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    loss = loss_fn(features, None)
    loss.backward()
    seconds = time.perf_counter() - t
    done.set()
    sampler.join()
    peak[0] = max(peak[0], rss_mb())
    return {"peak_mb": round(peak[0] - base, 1), "seconds": round(seconds, 2), "loss": float(loss.detach())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--child", nargs=4, metavar=("LIB", "LOSS", "BATCH", "TEXTS"))
    args = parser.parse_args()
    if args.child:
        lib, loss, batch, texts_file = args.child
        print(json.dumps(one_step(lib, loss, int(batch), args.max_seq_length, args.threads, texts_file)))
        return

    # Real text, made once: short queries and passage-length documents.
    import tempfile

    sys.path.insert(0, str(HERE))
    from texts import sentences

    texts_file = os.path.join(tempfile.mkdtemp(), "texts.json")
    with open(texts_file, "w") as f:
        json.dump({"anchors": sentences(1024, 8, 24, seed=1), "positives": sentences(1024, 30, 60, seed=2)}, f)

    def run(lib: str, loss: str, batch: int) -> dict:
        cmd = [sys.executable, __file__, "--child", lib, loss, str(batch), texts_file,
               "--max-seq-length", str(args.max_seq_length), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if out.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    results = {}
    for lib in ("raytrieve", "st"):
        for loss, batch in (("plain", 32), ("plain", 256), ("cached", 256), ("cached", 1024)):
            results[f"{lib}_{loss}_{batch}"] = run(lib, loss, batch)
    r = {k: v["peak_mb"] for k, v in results.items()}
    print(json.dumps({
        "benchmark": "gradcache_memory",
        "max_seq_length": args.max_seq_length,
        "plain_bs32_peak_mb": r["raytrieve_plain_32"],
        "plain_bs256_peak_mb": r["raytrieve_plain_256"],
        "cached_bs256_peak_mb": r["raytrieve_cached_256"],
        "cached_bs1024_peak_mb": r["raytrieve_cached_1024"],
        "ratio_cached1024_vs_plain32": round(r["raytrieve_cached_1024"] / r["raytrieve_plain_32"], 3),
        "st_plain_bs32_peak_mb": r["st_plain_32"],
        "st_plain_bs256_peak_mb": r["st_plain_256"],
        "st_cached_bs256_peak_mb": r["st_cached_256"],
        "st_cached_bs1024_peak_mb": r["st_cached_1024"],
        "st_ratio_cached1024_vs_plain32": round(r["st_cached_1024"] / r["st_plain_32"], 3),
        "seconds": {k: v["seconds"] for k, v in results.items()},
        "loss_raytrieve_vs_st_bs256": [results["raytrieve_plain_256"]["loss"], results["st_plain_256"]["loss"]],
    }))


if __name__ == "__main__":
    main()
