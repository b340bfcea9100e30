"""One training step on a GPU: raytrieve's encoder, MultipleNegativesRankingLoss and Stepper,
as one process runs them, wrapped for DDP over NCCL, and sharded with FSDP (fully_shard),
against sentence-transformers' model and loss in the loop its trainer runs on one GPU
(forward and backward under autocast, clip at 1.0, fused AdamW: the Trainer's default
optimizer with torch >= 2.8). Same weights (the shipped all-MiniLM-L6-v2), pairs, batch,
max_seq_length and learning rate on every side; tokenization is outside the step on every
side (raytrieve tokenizes in its Ray Data stage, the Trainer in its data loader).

    python benchmarks/train_gpu.py                           # batch 64, 20 timed steps, fp32 and bf16
    python benchmarks/train_gpu.py --pairs pairs.json        # {"query": [...], "document": [...]}

World size 1: a machine with one GPU cannot run two NCCL ranks (NCCL refuses two ranks on one
device), so the DDP and FSDP sides measure what the wrappers and NCCL cost per step on one
GPU, not scaling. Sides run interleaved (A B C D, then D C B A), each round a fresh model and
optimizer after warm-up steps; a side's figure is its best round's median step time.
Prints one JSON line: ms_per_step and samples_per_s by side and precision, ratio_vs_st
(raytrieve's single-process step against sentence-transformers', same precision), and the
first step's loss on each side (same weights and batch; only dropout's draws differ).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

SIDES = ("raytrieve", "raytrieve_ddp", "raytrieve_fsdp", "st")


def load_pairs(path: str | None, n: int) -> dict[str, list[str]]:
    if path:
        data = json.loads(Path(path).read_text())
        return {"query": data["query"][:n], "document": data["document"][:n]}
    from train import pairs

    return pairs(n)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side and round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument(
        "--pairs", default=None, help="a JSON file of query/document lists (default: the pydocs train split)"
    )
    parser.add_argument("--precisions", default="float32,bfloat16")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument(
        "--device", default="cuda:0", help="cpu runs the same sides over gloo (a dry run of this script)"
    )
    args = parser.parse_args()

    import torch
    import torch.distributed as dist
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import losses as st_losses
    from st_onnx import versions

    from raytrieve.encoders import load_encoder
    from raytrieve.losses.ranking import MultipleNegativesRankingLoss
    from raytrieve.model_ref import resolve_model
    from raytrieve.train.config import OptimizerConfig
    from raytrieve.train.distributed import GradientSync, TrainModule, data_parallel
    from raytrieve.train.optim import build_optimizer
    from raytrieve.train.step import Stepper

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1, device_id=device if cuda else None)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    path = str(resolve_model("all-minilm-l6-v2"))
    steps = args.warmup + args.steps
    data = load_pairs(args.pairs, args.batch * steps)
    n_batches = len(data["query"]) // args.batch
    if n_batches < 1:
        raise SystemExit(f"--pairs holds {len(data['query'])} pairs, fewer than one batch of {args.batch}")
    lr = OptimizerConfig().learning_rate

    def batches(tokenize):
        out = []
        for b in range(n_batches):
            rows = slice(b * args.batch, (b + 1) * args.batch)
            feats = [tokenize(data[c][rows]) for c in ("query", "document")]
            out.append([{k: v.to(device) if torch.is_tensor(v) else v for k, v in f.items()} for f in feats])
        return out

    def raytrieve_side(strategy: str | None):
        encoder = load_encoder("dense", path, device=str(device), max_seq_length=args.max_seq_length)
        encoder.train()
        module = TrainModule(encoder, [MultipleNegativesRankingLoss(encoder)]).to(device)
        wrapped = data_parallel(module, strategy, device) if strategy else module
        stepper = Stepper(
            module, build_optimizer(encoder, OptimizerConfig()), None, 1, 1.0, GradientSync(wrapped, False)
        )
        feats = batches(encoder.tokenize)

        def step(i: int) -> float:
            result = stepper.micro_batch(lambda f, y: wrapped(0, f, y), feats[i % len(feats)], None)
            assert result is not None
            return result.loss

        return step

    def st_side():
        model = SentenceTransformer(path, device=str(device))
        model.max_seq_length = args.max_seq_length
        model.train()
        loss = st_losses.MultipleNegativesRankingLoss(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True if cuda else None)
        feats = batches(model.tokenize)

        def step(i: int) -> float:
            value = loss(feats[i % len(feats)], None)
            value.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(value.detach())

        return step

    builders = {
        "raytrieve": lambda: raytrieve_side(None),
        "raytrieve_ddp": lambda: raytrieve_side("ddp"),
        "raytrieve_fsdp": lambda: raytrieve_side("fsdp"),
        "st": st_side,
    }
    sides = [s for s in args.sides.split(",") if s]
    precisions = [p for p in args.precisions.split(",") if p]
    ms: dict[str, dict[str, list[float]]] = {p: {s: [] for s in sides} for p in precisions}
    first_loss: dict[str, dict[str, float]] = {p: {} for p in precisions}
    errors: dict[str, str] = {}

    def run_round(side: str, prec: str) -> None:
        torch.manual_seed(0)
        step = builders[side]()  # the precision is the autocast around the steps below
        times = []
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec == "bfloat16"):
            for i in range(steps):
                sync()
                t = time.perf_counter()
                loss = step(i)  # the loss's float() waits for the step's forward; sync for the rest
                sync()
                if i == 0:
                    first_loss[prec].setdefault(side, round(loss, 6))
                if i >= args.warmup:
                    times.append(1000 * (time.perf_counter() - t))
        ms[prec][side].append(statistics.median(times))

    for r in range(args.rounds):
        for prec in precisions:
            for side in sides if r % 2 == 0 else list(reversed(sides)):
                if f"{side}/{prec}" in errors:
                    continue
                try:
                    run_round(side, prec)
                except Exception as exc:  # report it with the rest; the other sides still run
                    errors[f"{side}/{prec}"] = f"{type(exc).__name__}: {exc}"[:500]
                if cuda:
                    torch.cuda.empty_cache()
    best = {p: {s: min(v) for s, v in by.items() if v} for p, by in ms.items()}
    result = {
        "benchmark": "train_gpu",
        "model": "all-minilm-l6-v2",
        "loss": "MultipleNegativesRankingLoss",
        "batch": args.batch,
        "max_seq_length": args.max_seq_length,
        "timed_steps": args.steps,
        "world_size": 1,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "backend": dist.get_backend(),
        "ms_per_step": {p: {s: round(v, 2) for s, v in by.items()} for p, by in best.items()},
        "samples_per_s": {p: {s: round(1000 * args.batch / v, 1) for s, v in by.items()} for p, by in best.items()},
        "ratio_vs_st": {
            p: round(by["st"] / by["raytrieve"], 3) for p, by in best.items() if "st" in by and "raytrieve" in by
        },
        "first_step_loss": first_loss,
        "rounds_ms": {p: {s: [round(x, 2) for x in v] for s, v in by.items()} for p, by in ms.items()},
        "errors": errors,
        "versions": versions(),
    }
    print(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
