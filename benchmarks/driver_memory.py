"""Peak resident memory of the driver process of the encoding job and of training planning,
at two corpus sizes: the growth per million rows says whether the driver holds the data.

    .venv/bin/python benchmarks/driver_memory.py                         # 100,000 and 1,000,000 rows
    .venv/bin/python benchmarks/driver_memory.py --rows 100000 400000 --skip-train
    .venv/bin/python benchmarks/driver_memory.py --code /path/to/old/checkout --skip-train   # "before"
    .venv/bin/python benchmarks/driver_memory.py --skip-train --repeat-ids 2   # half the rows duplicates
    .venv/bin/python benchmarks/driver_memory.py --check-only --repeat-ids 2 --rows 1000000 4000000

Each run is a fresh driver process (its own ru_maxrss) on an embedded Ray of 2 CPUs; the
model is a tiny random BERT built here (2 layers x 32), so that encoding a million rows is
cheap and the figure is about the data plane, not the model. Texts are ~100 characters.
``--repeat-ids K`` gives each id to K consecutive rows, so (K-1)/K of the rows are duplicates
the job leaves out: the figure then also says whether the duplicate table reaches the driver.
``--check-only`` runs the duplicate-id check alone (no model, no encoding), so larger corpora
are cheap to measure: the driver's peak before and after it.
Prints one JSON line with peak MB per size and ``*_growth_mb_per_1m_rows``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from driver_memory_train import tiny_model, train_planning_peak  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, logging, resource, sys
logging.disable(logging.INFO)
import ray
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
from raytrieve.config import from_dict
from raytrieve.inference.config import EncodeConfig
from raytrieve.inference.encode import run_encode

result = run_encode(from_dict(EncodeConfig, json.loads(sys.argv[1])))
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rows": result.rows,
                  "seconds": result.seconds, "check_seconds": getattr(result, "check_seconds", None),
                  "duplicate_ids": getattr(result, "duplicate_ids", None), "bad_rows": result.bad_rows}))
"""


_CHECK_CHILD = r"""
import inspect, json, logging, resource, sys
logging.disable(logging.INFO)
import ray
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
from types import SimpleNamespace
from raytrieve.data.sources import open_source, plan_shards
from raytrieve.inference import checks
from raytrieve.inference.config import CorpusConfig

path = sys.argv[1]
cfg = SimpleNamespace(corpus=CorpusConfig(path=path), rows_per_shard=10_000)
specs = plan_shards(open_source(path, None, field="corpus.path"), cfg.rows_per_shard)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
# The code before the duplicate table stayed on the cluster took no examples count.
if len(inspect.signature(checks.duplicate_ids).parameters) == 3:
    found = checks.duplicate_ids(cfg, specs, 5).ids
else:
    found = len(checks.duplicate_ids(cfg, specs))
print(json.dumps({"before_mb": before, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "duplicate_ids": found}))
"""


def check_peak(n: int, workdir: Path, code: Path, repeat_ids: int) -> dict:
    corpus = write_corpus(n, workdir / f"corpus-{n}-{repeat_ids}.parquet", repeat_ids)
    env = {**os.environ, "PYTHONPATH": str(code / "platform")}
    run = subprocess.run([sys.executable, "-c", _CHECK_CHILD, str(corpus)], env=env, capture_output=True, text=True,
                         cwd=code)
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-3000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def write_corpus(n: int, path: Path, repeat_ids: int = 1) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.exists():
        return path
    with pq.ParquetWriter(path, pa.schema([("id", pa.string()), ("text", pa.string())])) as writer:
        for start in range(0, n, 100_000):
            ids = range(start, min(start + 100_000, n))
            writer.write_table(pa.table({
                "id": [f"doc-{i // repeat_ids}" for i in ids],
                "text": [f"Document {i} explains how part {i % 977} of the machine turns {i % 13} times a day." for i in ids],
            }))
    return path


def encode_peak(n: int, workdir: Path, code: Path, repeat_ids: int = 1) -> dict:
    corpus = write_corpus(n, workdir / f"corpus-{n}-{repeat_ids}.parquet", repeat_ids)
    out = workdir / f"vectors-{n}-{time.time_ns()}"
    config = {"corpus": {"path": str(corpus)}, "output_dir": str(out), "rows_per_shard": 10_000,
              "dense": {"model": str(tiny_model(workdir)), "max_seq_length": 32},
              "compute": {"cpus_per_encode_actor": 1.0, "torch_threads": 1, "token_budget": 4096,
                          "max_batch_size": 512}}
    env = {**os.environ, "PYTHONPATH": str(code / "platform")}
    run = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(config)], env=env, capture_output=True, text=True,
                         cwd=code)
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-3000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def growth(peaks: dict[int, float]) -> float:
    (a, pa_), (b, pb) = sorted(peaks.items())[0], sorted(peaks.items())[-1]
    return round((pb - pa_) / ((b - a) / 1e6), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs=2, default=[100_000, 1_000_000])
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout whose platform/ is measured")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-encode", action="store_true")
    parser.add_argument("--repeat-ids", type=int, default=1, help="rows per id in the encoding corpus")
    parser.add_argument("--check-only", action="store_true", help="the duplicate-id check alone (implies --skip-train)")
    args = parser.parse_args()
    out: dict[str, object] = {"code": str(args.code), "repeat_ids": args.repeat_ids}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.check_only:
            checked = {n: check_peak(n, workdir, args.code, args.repeat_ids) for n in args.rows}
            out["check_driver_mb_before_after"] = {n: [round(r["before_mb"], 1), round(r["peak_mb"], 1)]
                                                   for n, r in checked.items()}
            out["check_duplicate_ids"] = {n: r["duplicate_ids"] for n, r in checked.items()}
            print(json.dumps(out))
            return
        if not args.skip_encode:
            runs = {n: encode_peak(n, workdir, args.code, args.repeat_ids) for n in args.rows}
            out["encode_driver_peak_mb"] = {n: round(r["peak_mb"], 1) for n, r in runs.items()}
            out["encode_seconds"] = {n: r["seconds"] for n, r in runs.items()}
            out["encode_check_seconds"] = {n: r["check_seconds"] for n, r in runs.items()}
            out["encode_duplicate_ids"] = {n: r["duplicate_ids"] for n, r in runs.items()}
            out["encode_driver_growth_mb_per_1m_rows"] = growth({n: r["peak_mb"] for n, r in runs.items()})
        if not args.skip_train:
            train = {n: train_planning_peak(n, workdir) for n in args.rows}
            out["train_driver_peak_mb"] = {n: round(r["peak_mb"], 1) for n, r in train.items()}
            out["train_driver_growth_mb_per_1m_rows"] = growth({n: r["peak_mb"] for n, r in train.items()})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
