"""DenseEncoder.encode at its dtype (default auto) against SentenceTransformer.encode in
float32 and under torch.autocast(bfloat16), the fastest sentence-transformers backend this
environment installs (its ONNX backend needs optimum and onnxruntime: not measured here).
Same model (the shipped all-MiniLM-L6-v2), sentences, threads and batch size; runs interleaved
A B C C B A ..., best of each.

    .venv/bin/python benchmarks/encode.py                 # 20,000 sentences, 5-120 words
    .venv/bin/python benchmarks/encode.py --n 2000 --repeats 2

Prints one JSON line: sentences_per_s, st_sentences_per_s, ratio_vs_st (goal >= 2.5),
ratio_vs_st_best_backend (goal >= 1.0), and the quality against sentence-transformers' float32.
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
    parser.add_argument("--dtype", default="auto", help="raytrieve's compute format (auto: what a user gets)")
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
    ours = DenseEncoder(path, device=args.device, dtype=args.dtype)
    ref = SentenceTransformer(path, device=args.device)
    device_type = torch.device(args.device).type

    def st_bf16(batch, **kw):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return ref.encode(batch, **kw)

    # Warm up every side (allocator, kernels) and measure agreement with ST's float32 first.
    warm = texts[:256]
    st_warm = ref.encode(warm, batch_size=args.batch_size)
    ours_warm = ours.encode(warm, batch_size=args.batch_size)
    st_bf16(warm, batch_size=args.batch_size)
    cos = (ours_warm * st_warm).sum(1) / (np.linalg.norm(ours_warm, axis=1) * np.linalg.norm(st_warm, axis=1))

    def timed(fn) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn(texts, batch_size=args.batch_size, show_progress_bar=False)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return args.n / (time.perf_counter() - t)

    sides = {"raytrieve": ours.encode, "st": ref.encode, "st_bf16_autocast": st_bf16}
    runs: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(args.repeats):  # interleaved, order reversed every repeat, so drift hits all
        for name in list(sides) if r % 2 == 0 else list(reversed(sides)):
            runs[name].append(timed(sides[name]))
    best = {k: max(v) for k, v in runs.items()}
    result = {
        "benchmark": "encode",
        "model": "all-minilm-l6-v2",
        "n": args.n,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "device": args.device if args.device != "cuda" else torch.cuda.get_device_name(),
        "dtype": ours.dtype,
        "dtype_reason": ours.dtype_reason,
        "sentences_per_s": round(best["raytrieve"], 1),
        "st_sentences_per_s": round(best["st"], 1),
        "st_bf16_autocast_sentences_per_s": round(best["st_bf16_autocast"], 1),
        "ratio_vs_st": round(best["raytrieve"] / best["st"], 3),
        "ratio_vs_st_best_backend": round(best["raytrieve"] / max(best["st"], best["st_bf16_autocast"]), 3),
        "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "min_cosine_to_st_float32_warmup": float(cos.min()),
        "cpu": _platform.processor() or _platform.machine(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
