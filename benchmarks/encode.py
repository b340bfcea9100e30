"""DenseEncoder.encode at its dtype (default auto) against SentenceTransformer.encode in
float32, under torch.autocast(bfloat16), in float16 on a GPU (`--device cuda`), and on its
ONNX backend in float32 and int8 (dynamic quantization) where optimum-onnx and onnxruntime
are installed (the benchmark venv: `make bench-venv`; see st_onnx.py). Same model (the shipped
all-MiniLM-L6-v2), sentences, threads and batch size; runs interleaved A B C ... C B A, best of each.
``--kind sparse`` does the same for SparseEncoder.encode on the shipped SPLADE-tiny against
sentence-transformers' SparseEncoder.encode (no ONNX sides).

    .venv/bin/python benchmarks/encode.py                 # 20,000 sentences, 5-120 words
    .venv/bin/python benchmarks/encode.py --n 2000 --repeats 2
    .venv-bench/bin/python benchmarks/encode.py --n 1500 --repeats 2   # with the ONNX sides
    .venv/bin/python benchmarks/encode.py --kind sparse --dtype float32 --n 1000

Prints one JSON line: sentences_per_s, st_sentences_per_s, tokens_per_s, ratio_vs_st (goal >= 2.5),
ratio_vs_st_best_backend (goal >= 1.0) against best_st_backend, the fastest sentence-transformers
side whose min cosine to its float32 passes raytrieve's dense guard, and each side's quality.
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
    parser.add_argument("--texts", default=None, help="a JSON list of texts (default: --n docstring sentences)")
    parser.add_argument("--kind", choices=("dense", "sparse"), default="dense")
    args = parser.parse_args()

    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer, SparseEncoder
    from st_onnx import against_st, load, versions
    from texts import sentences

    from raytrieve import DenseEncoder
    from raytrieve import SparseEncoder as OurSparseEncoder
    from raytrieve.encoders.precision import DENSE_MIN_COSINE
    from raytrieve.model_ref import resolve_model

    torch.set_num_threads(args.threads)
    texts = json.loads(Path(args.texts).read_text())[: args.n] if args.texts else sentences(args.n)
    args.n = len(texts)
    model_name = "all-minilm-l6-v2" if args.kind == "dense" else "splade-tiny"
    path = str(resolve_model(model_name))
    if args.kind == "dense":
        ours = DenseEncoder(path, device=args.device, dtype=args.dtype)
        ref = SentenceTransformer(path, device=args.device)
        onnx, onnx_report = load(SentenceTransformer, path, model_name, args.threads, device=args.device)
    else:  # sparse: the same minimum cosine to sentence-transformers' float32 vectors qualifies a side
        ours = OurSparseEncoder(path, device=args.device, dtype=args.dtype)
        ref = SparseEncoder(path, device=args.device)
        onnx, onnx_report = {}, {"onnx_sides": "not measured for sparse models"}
    device_type = torch.device(args.device).type

    def st_bf16(batch, **kw):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return ref.encode(batch, **kw)

    sides = {"raytrieve": ours.encode, "st": ref.encode, "st_bf16_autocast": st_bf16}
    if device_type == "cuda":  # sentence-transformers' documented GPU speed-up: the model in float16
        sides["st_fp16"] = type(ref)(path, device=args.device).half().encode
    sides.update({name: model.encode for name, model in onnx.items()})

    # Warm up every side (allocator, kernels) and measure agreement with ST's float32 first.
    warm = texts[:256]

    def as_array(emb) -> np.ndarray:  # sparse tensors as dense rows, for the cosine
        emb = emb.to_dense() if getattr(emb, "is_sparse", False) else emb
        return np.asarray(emb.float().cpu() if hasattr(emb, "cpu") else emb)

    st_warm = as_array(ref.encode(warm, batch_size=args.batch_size))

    def min_cosine(emb) -> float:
        cos = (emb * st_warm).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(st_warm, axis=1))
        return float(cos.min())

    quality = {name: min_cosine(as_array(fn(warm, batch_size=args.batch_size))) for name, fn in sides.items()}

    def timed(fn) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn(texts, batch_size=args.batch_size, show_progress_bar=False)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return args.n / (time.perf_counter() - t)

    runs: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(args.repeats):  # interleaved, order reversed every repeat, so drift hits all
        for name in list(sides) if r % 2 == 0 else list(reversed(sides)):
            runs[name].append(timed(sides[name]))
    best = {k: max(v) for k, v in runs.items()}
    st_speed = {k: v for k, v in best.items() if k != "raytrieve"}
    lengths = ours.tokenize(texts)["attention_mask"].sum(1)  # truncated at max_seq_length, as encoded
    tokens_per_text = float(lengths.float().mean())
    result = {
        "benchmark": "encode",
        "model": model_name,
        "n": args.n,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "device": args.device if args.device != "cuda" else torch.cuda.get_device_name(),
        "dtype": ours.dtype,
        "dtype_reason": ours.dtype_reason,
        "sentences_per_s": round(best["raytrieve"], 1),
        "st_sentences_per_s": round(best["st"], 1),
        "tokens_per_text": round(tokens_per_text, 1),
        "tokens_per_s": round(best["raytrieve"] * tokens_per_text),
        "st_tokens_per_s": round(best["st"] * tokens_per_text),
        **{f"{k}_sentences_per_s": round(v, 1) for k, v in st_speed.items() if k != "st"},
        **against_st(best["raytrieve"], st_speed, {k: quality[k] for k in st_speed}, DENSE_MIN_COSINE),
        **onnx_report,
        "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "min_cosine_to_st_float32_warmup": quality["raytrieve"],
        "min_cosine_to_st_float32_by_side": {k: round(v, 6) for k, v in quality.items()},
        "cpu": _platform.processor() or _platform.machine(),
        "versions": versions(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
