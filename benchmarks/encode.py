"""DenseEncoder.encode against SentenceTransformer.encode: same model (the shipped
all-MiniLM-L6-v2), same sentences, same threads, same batch size, interleaved runs.

    .venv/bin/python benchmarks/encode.py                 # 20,000 sentences, 5-120 words
    .venv/bin/python benchmarks/encode.py --n 2000 --repeats 1

Prints one JSON line: sentences_per_s, st_sentences_per_s, ratio_vs_st (best run of each).
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
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from raytrieve import DenseEncoder
    from raytrieve.model_ref import resolve_model
    from texts import sentences

    torch.set_num_threads(args.threads)
    texts = sentences(args.n)
    path = str(resolve_model("all-minilm-l6-v2"))
    ours = DenseEncoder(path, device=args.device)
    ref = SentenceTransformer(path, device=args.device)

    # Warm up both (allocator, kernels) and check they agree before timing anything.
    warm = texts[:256]
    diff = float(np.abs(ours.encode(warm, batch_size=args.batch_size) - ref.encode(warm, batch_size=args.batch_size)).max())

    def timed(fn) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn(texts, batch_size=args.batch_size, show_progress_bar=False)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return args.n / (time.perf_counter() - t)

    ours_runs, st_runs = [], []
    for _ in range(args.repeats):  # interleaved so drift (thermal, other load) hits both
        ours_runs.append(timed(ours.encode))
        st_runs.append(timed(ref.encode))
    result = {
        "benchmark": "encode",
        "model": "all-minilm-l6-v2",
        "n": args.n,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "device": args.device if args.device != "cuda" else torch.cuda.get_device_name(),
        "sentences_per_s": round(max(ours_runs), 1),
        "st_sentences_per_s": round(max(st_runs), 1),
        "ratio_vs_st": round(max(ours_runs) / max(st_runs), 3),
        "runs": {"raytrieve": [round(x, 1) for x in ours_runs], "st": [round(x, 1) for x in st_runs]},
        "max_abs_diff_warmup": diff,
        "cpu": _platform.processor() or _platform.machine(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
