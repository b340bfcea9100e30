"""Training throughput: raytrieve (1 Ray Train worker, the whole Ray Data + TorchTrainer
path) against SentenceTransformerTrainer, same model (the shipped all-MiniLM-L6-v2), same
(query, document) pairs, MultipleNegativesRankingLoss, batch 32, no-duplicates batches,
same torch threads, in the same run, interleaved (``--rounds``, default 2: A B, then B A).

    .venv/bin/python benchmarks/train.py                   # 40 steps each, max_seq_length 128
    .venv/bin/python benchmarks/train.py --steps 20
    .venv/bin/python benchmarks/train.py --bf16          # raytrieve with training.bf16, ST in float32
    .venv/bin/python benchmarks/train.py --kind sparse   # SPLADE-tiny, SpladeLoss over SparseMNRL, both sides
    .venv/bin/python benchmarks/train.py --kind cross --batch-size 16 --steps 12 --warmup 3 --bf16
    .venv/bin/python benchmarks/train.py --compare-kernels  # + raytrieve with training.cpu_kernels false
    .venv/bin/python benchmarks/train.py --rounds 3      # three runs per side, interleaved

Throughput is steady state: samples over the steps after the first ``--warmup`` ones,
timed by each step's end (raytrieve: the step's MLflow metric timestamp; sentence-transformers:
a trainer callback). End-to-end wall times (start-up included) are printed too.
Each side runs ``--rounds`` times, the order reversed every round (A B C, C B A, ...), so a
machine whose speed drifts hits every side alike. Prints one JSON line: the median samples/s of
each side, the ratio of the medians (ratio_vs_st), each round's ratio, every run's figure and
wall time (each round's runs are minutes apart; their spread is the noise to read them against).
"""

from __future__ import annotations

import argparse
import json
import os
import platform as _platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
# --kind: the shipped model and the loss of its shipped config (jobs/configs/dense_mnrl.yaml, splade.yaml)
MODELS = {"dense": "all-minilm-l6-v2", "sparse": "splade-tiny", "cross": "ms-marco-minilm-l12-v2"}
SPLADE_WEIGHTS = {"document_regularizer_weight": 3.0e-5, "query_regularizer_weight": 5.0e-5}
LOSSES = {
    "dense": {"name": "MultipleNegativesRankingLoss"},
    "sparse": {"name": "SpladeLoss", "args": SPLADE_WEIGHTS, "inner": {"name": "SparseMultipleNegativesRankingLoss"}},
    # each query against its document and 3 other queries' documents (4 pairs per row)
    "cross": {"name": "MultipleNegativesRankingLoss", "args": {"num_negatives": 3}},
}


def pairs(n: int, seed: int | None = None) -> dict[str, list[str]]:
    """The first ``n`` train pairs, or with ``seed`` a seeded sample over every train package."""
    import pyarrow.parquet as pq

    path = ROOT / "data" / "pydocs" / "train.parquet"
    if not path.exists():
        from raytrieve.data.pydocs import build

        build(path.parent)
    table = pq.read_table(path)
    if seed is None:
        table = table.slice(0, n)
    else:
        import numpy as np

        table = table.take(np.random.default_rng(seed).permutation(table.num_rows)[:n])
    return {"query": table.column("query").to_pylist(), "document": table.column("document").to_pylist()}


def steady(times: list[float], batch: int, warmup: int) -> float:
    """Samples per second between the end of step ``warmup`` and the end of the last step."""
    return (len(times) - warmup) * batch / (times[-1] - times[warmup - 1])


def run_raytrieve(
    data: dict[str, list[str]],
    tmp: Path,
    args,
    seed: int = 42,
    lr: float = 2e-5,
    warmup_ratio: float = 0.0,
    cpu_kernels: bool = True,
) -> tuple[float, float]:
    """Trains into ``tmp``/raytrieve-model; returns (steady samples/s, wall seconds)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from mlflow.tracking import MlflowClient

    from raytrieve.config import from_dict
    from raytrieve.train.config import TrainConfig, check_values
    from raytrieve.train.run import run_training

    pq.write_table(pa.table(data), tmp / "pairs.parquet")
    cfg = check_values(from_dict(TrainConfig, {
        "model": {"name_or_path": MODELS[args.kind], "kind": args.kind, "max_seq_length": args.max_seq_length},
        "datasets": [{"name": "pairs", "path": str(tmp / "pairs.parquet"), "columns": ["query", "document"],
                      "loss": LOSSES[args.kind]}],
        "output_dir": str(tmp / "raytrieve-model"),
        "training": {"batch_size": args.batch_size, "max_steps": args.steps, "batch_sampler": "no_duplicates",
                     "bf16": args.bf16, "seed": seed, "cpu_kernels": cpu_kernels},
        "optimizer": {"learning_rate": lr},
        "schedule": {"name": "linear", "warmup_ratio": warmup_ratio},
        "checkpoint": {"max_failures": 0},
        # The defaults a user gets (one worker: torch threads sized from the cluster, the whole
        # machine on this embedded Ray); --threads overrides them and is stated with the figure.
        "scaling": {"num_workers": 1, "torch_threads": args.threads},
        "mlflow": {"tracking_uri": (tmp / "mlruns").as_uri(), "experiment": "bench"},
    }))
    start = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)  # all of this machine's CPUs
    result = run_training(cfg)
    wall = time.perf_counter() - start
    ray.shutdown()
    history = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri).get_metric_history(result.run_id, "loss")
    times = [m.timestamp / 1000 for m in sorted(history, key=lambda m: m.step)]
    return steady(times, args.batch_size, args.warmup), wall


def run_sentence_transformers(
    data: dict[str, list[str]], tmp: Path, args, seed: int = 42, lr: float = 2e-5, warmup_ratio: float = 0.0
) -> tuple[float, float]:
    """Trains into ``tmp``/st-model; returns (steady samples/s, wall seconds)."""
    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import MultipleNegativesRankingLoss as CrossMNRL
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sparse_encoder import (
        SparseEncoder,
        SparseEncoderTrainer,
        SparseEncoderTrainingArguments,
    )
    from sentence_transformers.sparse_encoder.losses import SparseMultipleNegativesRankingLoss, SpladeLoss
    from sentence_transformers.training_args import BatchSamplers
    from transformers import TrainerCallback

    from raytrieve.model_ref import resolve_model

    # the threads raytrieve's worker ran with (its default: the machine's CPUs for one worker)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    start = time.perf_counter()
    sparse, cross = args.kind == "sparse", args.kind == "cross"
    path = str(resolve_model(MODELS[args.kind]))
    if cross:
        model = CrossEncoder(path, device="cpu", max_length=args.max_seq_length)
        Trainer, TrainingArguments = CrossEncoderTrainer, CrossEncoderTrainingArguments
        loss = CrossMNRL(model, **LOSSES["cross"]["args"])
    else:
        Model = SparseEncoder if sparse else SentenceTransformer
        Trainer = SparseEncoderTrainer if sparse else SentenceTransformerTrainer
        TrainingArguments = SparseEncoderTrainingArguments if sparse else SentenceTransformerTrainingArguments
        model = Model(path, device="cpu")
        model.max_seq_length = args.max_seq_length
        loss = (
            SpladeLoss(model, SparseMultipleNegativesRankingLoss(model), **SPLADE_WEIGHTS)
            if sparse
            else MultipleNegativesRankingLoss(model)
        )
    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(tmp / "st"), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
            learning_rate=lr, batch_sampler=BatchSamplers.NO_DUPLICATES, save_strategy="no", report_to="none",
            logging_steps=10_000, dataloader_num_workers=0, use_cpu=True, seed=seed, data_seed=seed,
            # raytrieve's warm-up is int(steps * ratio) steps (HF rounds up); weight decay: its default
            warmup_steps=int(args.steps * warmup_ratio), lr_scheduler_type="linear", weight_decay=0.01,
        ),
        train_dataset=Dataset.from_dict({"anchor": data["query"], "positive": data["document"]}),
        loss=loss,
        callbacks=[StepTimes()],
    )
    trainer.train()
    wall = time.perf_counter() - start
    model.save(str(tmp / "st-model"))
    return steady(times, args.batch_size, args.warmup), wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="override both sides' torch threads")
    parser.add_argument("--bf16", action="store_true", help="raytrieve with training.bf16 (ST stays float32)")
    parser.add_argument("--kind", choices=tuple(MODELS), default="dense")
    parser.add_argument(
        "--compare-kernels", action="store_true",
        help="also raytrieve with training.cpu_kernels false (torch's dropout and attention)",
    )
    parser.add_argument(
        "--rounds", type=int, default=2,
        help="runs per side, interleaved (A B C, then C B A, ...); medians and per-round ratios reported",
    )
    args = parser.parse_args()
    data = pairs(args.steps * args.batch_size)
    sides = ["raytrieve", "sentence-transformers"] + (["torch-kernels"] if args.compare_kernels else [])
    rates: dict[str, list[float]] = {side: [] for side in sides}
    walls: dict[str, list[float]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            # Order reversed every round: a machine whose speed drifts (a shared VM) hits every side.
            for side in sides if r % 2 == 0 else sides[::-1]:
                folder = Path(tmp) / f"{side}-{r}"
                folder.mkdir()
                if side == "sentence-transformers":
                    rate, wall = run_sentence_transformers(data, folder, args)
                else:
                    rate, wall = run_raytrieve(data, folder, args, cpu_kernels=side == "raytrieve")
                rates[side].append(rate)
                walls[side].append(wall)
                print(f"round {r + 1}/{args.rounds} {side}: {rate:.2f} samples/s, {wall:.1f} s", file=sys.stderr)
    ours, theirs = statistics.median(rates["raytrieve"]), statistics.median(rates["sentence-transformers"])
    extra = {}
    if args.compare_kernels:
        off = statistics.median(rates["torch-kernels"])
        extra = {
            "samples_per_s_torch_kernels": round(off, 2), "cpu_kernels_speedup": round(ours / off, 3),
            "ratio_vs_st_torch_kernels": round(off / theirs, 3),
            "cpu_kernels_speedup_per_round": [round(a / b, 3) for a, b in zip(rates["raytrieve"], rates["torch-kernels"])],
        }
    print(json.dumps({
        "samples_per_s": round(ours, 2), "st_samples_per_s": round(theirs, 2), "ratio_vs_st": round(ours / theirs, 3),
        "ratio_vs_st_per_round": [round(a / b, 3) for a, b in zip(rates["raytrieve"], rates["sentence-transformers"])],
        **extra,
        "samples_per_s_runs": {side: [round(v, 2) for v in values] for side, values in rates.items()},
        "wall_s_runs": {side: [round(v, 1) for v in values] for side, values in walls.items()},
        "rounds": args.rounds, "steps": args.steps,
        "batch_size": args.batch_size, "max_seq_length": args.max_seq_length, "threads": args.threads or f"default ({os.cpu_count()})",
        "raytrieve_bf16": args.bf16, "model": MODELS[args.kind],
        "machine": f"{_platform.machine()} {os.cpu_count()} cpus",
    }))


if __name__ == "__main__":
    sys.exit(main())
