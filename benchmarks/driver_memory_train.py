"""Peak resident memory of the training driver's planning path (``raytrieve.train.run.prepare``:
dataset checks, per-row keys, the batch plan of every epoch) on n (query, document) pairs.

    .venv/bin/python benchmarks/driver_memory_train.py               # 100,000 and 1,000,000 pairs
    .venv/bin/python benchmarks/driver_memory_train.py --pairs 100000 400000
    .venv/bin/python benchmarks/driver_memory_train.py --code /path/to/other/checkout   # its raytrieve

Each size runs in a fresh subprocess (no Ray workers start), so its ru_maxrss is the driver's
peak alone. The model is a tiny random BERT built here (2 layers x 32 over the MiniLM
vocabulary): loading it is a constant, the growth with rows is what the figure is about.
Prints one JSON line: peak MB and the seconds ``prepare`` took per size, and the growth per
million rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, resource, sys, time
from raytrieve.config import from_dict
from raytrieve.train.config import TrainConfig, check_values
from raytrieve.train.run import prepare

cfg = check_values(from_dict(TrainConfig, json.loads(sys.argv[1])))
started = time.perf_counter()
p = prepare(cfg)
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "prepare_s": time.perf_counter() - started, "optimizer_steps": p.plan.optimizer_steps}))
"""


def tiny_model(workdir: Path) -> Path:
    """A tiny random dense model (mean pooling), built once per workdir."""
    target = workdir / "tiny-dense"
    if (target / "modules.json").exists():
        return target
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from raytrieve import DenseEncoder
    from raytrieve.model_ref import resolve_model
    from raytrieve.modules import Pooling, Transformer

    torch.manual_seed(0)
    base = workdir / "tiny-base"
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(base)
    AutoTokenizer.from_pretrained(resolve_model("all-minilm-l6-v2")).save_pretrained(base)
    DenseEncoder([Transformer.from_pretrained(base, max_seq_length=32), Pooling(32, "mean")], device="cpu").save(target)
    return target


def write_pairs(n_pairs: int, path: Path) -> Path:
    """n distinct short (query, document) pairs (~40 and ~70 characters), in row groups of 100k."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.exists():
        return path
    with pq.ParquetWriter(path, pa.schema([("query", pa.string()), ("document", pa.string())])) as writer:
        for start in range(0, n_pairs, 100_000):
            ids = range(start, min(start + 100_000, n_pairs))
            writer.write_table(pa.table({
                "query": [f"question {i}: how does item {i % 977} work?" for i in ids],
                "document": [f"Answer {i}. Item {i % 977} works by turning the crank {i % 13} times." for i in ids],
            }))
    return path


def train_planning_peak(n_pairs: int, workdir, code: Path = ROOT) -> dict:
    """Peak RSS (MB) of a fresh process that runs the training driver's planning on n pairs."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = tiny_model(workdir)
    data = write_pairs(n_pairs, workdir / f"pairs-{n_pairs}.parquet")
    config = {
        "model": {"name_or_path": str(model), "kind": "dense", "max_seq_length": 32},
        "datasets": [{"name": "pairs", "path": str(data), "columns": ["query", "document"],
                      "loss": {"name": "MultipleNegativesRankingLoss"}}],
        "output_dir": str(workdir / "out"),
        "training": {"batch_size": 64, "epochs": 1, "batch_sampler": "no_duplicates"},
        "scaling": {"num_workers": 2},
        "mlflow": {"tracking_uri": (workdir / "mlruns").as_uri()},
    }
    env = {**os.environ, "PYTHONPATH": str(code / "platform") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(config)], env=env, capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"planning subprocess failed:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"pairs": n_pairs, "peak_mb": round(result["peak_mb"], 1), "prepare_s": round(result["prepare_s"], 2),
            "optimizer_steps": result["optimizer_steps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--workdir", default=None, help="where data and the tiny model go (default: a temp dir)")
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose platform/raytrieve runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        runs = [train_planning_peak(n, workdir, args.code.resolve()) for n in args.pairs]
    small, large = runs[0], runs[-1]
    growth = (large["peak_mb"] - small["peak_mb"]) / max((large["pairs"] - small["pairs"]) / 1e6, 1e-9)
    print(json.dumps({"train_planning": runs, "train_driver_growth_mb_per_1m_rows": round(growth, 1)}))


if __name__ == "__main__":
    main()
