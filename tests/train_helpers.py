"""Tiny real-text training data and configs for the end-to-end training tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raytrieve.config import from_dict
from raytrieve.train.config import TrainConfig, check_values

TOPICS = ["sorting lists", "the capital of germany", "photosynthesis in plants", "boiling an egg", "python decorators",
          "the french revolution", "black holes", "baking bread", "learning to swim", "tax returns", "jazz music",
          "volcano eruptions", "training a puppy", "solar panels", "chess openings", "growing tomatoes"]


def pairs(n: int) -> dict[str, list[Any]]:
    queries = [f"question {i}: what should I know about {TOPICS[i % len(TOPICS)]}?" for i in range(n)]
    docs = [f"Answer {i}. A short note on {TOPICS[i % len(TOPICS)]}, written for reader number {i}." for i in range(n)]
    return {"query": queries, "answer": docs}


def write_pairs(path: Path, n: int, **extra: list[Any]) -> Path:
    pq.write_table(pa.table({**pairs(n), **extra}), path)
    return path


def train_config(tmp: Path, model: Path, kind: str, datasets: list[dict[str, Any]], **sections: Any) -> TrainConfig:
    data: dict[str, Any] = {
        "model": {"name_or_path": str(model), "kind": kind},
        "datasets": datasets,
        "output_dir": str(tmp / "out" / "model"),
        "training": {"batch_size": 4, "epochs": 1},
        "mlflow": {"tracking_uri": (tmp / "mlruns").as_uri(), "experiment": "test"},
        "scaling": {"num_workers": 1, "resources_per_worker": {"CPU": 0.5}, "torch_threads": 1},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return check_values(from_dict(TrainConfig, data))
