"""Tiny real-text training data and the shipped configs pointed at tiny models, for the
end-to-end training tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from raytrieve.config import from_dict
from raytrieve.train.config import TrainConfig, check_values

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["sorting lists", "the capital of germany", "photosynthesis in plants", "boiling an egg", "python decorators",
          "the french revolution", "black holes", "baking bread", "learning to swim", "tax returns", "jazz music",
          "volcano eruptions", "training a puppy", "solar panels", "chess openings", "growing tomatoes"]


def pairs(n: int) -> dict[str, list[Any]]:
    queries = [f"question {i}: what should I know about {TOPICS[i % len(TOPICS)]}?" for i in range(n)]
    docs = [f"Answer {i}. A short note on {TOPICS[i % len(TOPICS)]}, written for reader number {i}." for i in range(n)]
    return {"query": queries, "document": docs}


def write_data(root: Path, n: int = 24) -> dict[str, Path]:
    """The four files the shipped configs read, in the same layout as `raytrieve data build-pydocs`."""
    root.mkdir(parents=True, exist_ok=True)
    p = pairs(n)
    files = {"train": root / "train.parquet", "test": root / "test.parquet",
             "labeled": root / "train_labeled.parquet", "listwise": root / "train_listwise.parquet"}
    pq.write_table(pa.table(p), files["train"])
    pq.write_table(pa.table(pairs(n + 8)).slice(n), files["test"])
    docs = p["document"]
    pq.write_table(pa.table({"query": [q for q in p["query"] for _ in range(2)],
                             "document": [d for i, d in enumerate(docs) for d in (d, docs[(i + 5) % n])],
                             "label": [1.0, 0.0] * n}), files["labeled"])
    pq.write_table(pa.table({"query": p["query"], "documents": [[d, docs[(i + 3) % n], docs[(i + 7) % n]]
                                                                for i, d in enumerate(docs)],
                             "labels": [[1.0, 0.0, 0.0]] * n}), files["listwise"])
    return files


def shipped_config(name: str, tmp: Path, models: dict[str, Path], data: dict[str, Path], **changes: Any) -> TrainConfig:
    """jobs/configs/<name>.yaml with tiny models, tiny data, a tmp MLflow store and half-CPU workers."""
    raw = yaml.safe_load((ROOT / "jobs" / "configs" / f"{name}.yaml").read_text())
    kind = raw["model"]["kind"]
    raw["model"]["name_or_path"] = str(models["sparse" if kind == "sparse" else kind])
    raw["model"]["max_seq_length"] = 24
    for d in raw["datasets"]:
        d["path"] = str(data[{"train.parquet": "train", "train_labeled.parquet": "labeled",
                              "train_listwise.parquet": "listwise"}[Path(d["path"]).name]])
        if "mini_batch_size" in d["loss"].get("args", {}):
            d["loss"]["args"]["mini_batch_size"] = 2
        if d["loss"].get("matryoshka_dims"):
            d["loss"]["matryoshka_dims"] = [32, 16]
    if raw.get("eval", {}).get("path"):
        raw["eval"]["path"] = str(data["test"])
        raw["eval"]["every_n_steps"] = 2
    raw["output_dir"] = str(tmp / "out" / name)
    raw["training"] = {**raw.get("training", {}), "batch_size": 4, "epochs": 1}
    raw["checkpoint"] = {**raw.get("checkpoint", {}), "every_n_steps": 2}
    raw["scaling"] = {**raw.get("scaling", {}), "num_workers": 1, "resources_per_worker": {"CPU": 0.5},
                      "torch_threads": 1}
    raw["mlflow"] = {**raw.get("mlflow", {}), "tracking_uri": (tmp / "mlruns").as_uri()}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        raw[section] = {**raw.get(section, {}), field: value} if field else value
    return check_values(from_dict(TrainConfig, raw))
