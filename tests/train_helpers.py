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
    # build-pydocs' split layout: an id and a package beside the pair (text columns a config
    # must leave out by naming its columns: the evaluator once took the ids as its queries).
    for split, table in (("train", pa.table(p)), ("test", pa.table(pairs(n + 8)).slice(n))):
        ids = pa.array([f"{split}-{i:06d}" for i in range(table.num_rows)])
        table = table.add_column(0, "id", ids).append_column("package", pa.array(["pkg"] * table.num_rows))
        pq.write_table(table, files[split])
    docs = p["document"]
    # Negatives are another topic's note in another wording: a signal that even a random tiny
    # cross-encoder learns within one epoch (so training visibly lowers its loss).
    negatives = [f"Off-topic remark {i}, about {TOPICS[(i + 5) % len(TOPICS)]} instead." for i in range(n)]
    pq.write_table(pa.table({"query": [q for q in p["query"] for _ in range(2)],
                             "document": [d for i, d in enumerate(docs) for d in (d, negatives[i])],
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
    # Only the final checkpoint unless a test is about checkpoints (each one costs a save and a report).
    raw["checkpoint"] = {**raw.get("checkpoint", {}), "every_n_steps": None}
    raw["scaling"] = {**raw.get("scaling", {}), "num_workers": 1, "resources_per_worker": {"CPU": 0.5},
                      "torch_threads": 1}
    raw["mlflow"] = {**raw.get("mlflow", {}), "tracking_uri": (tmp / "mlruns").as_uri()}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        raw[section] = {**raw.get(section, {}), field: value} if field else value
    return check_values(from_dict(TrainConfig, raw))


def loss_on_data(cfg: TrainConfig, model_path: str, component: str | None = None) -> float:
    """The mean loss of ``cfg``'s losses over all of its training rows, with the model at
    ``model_path`` in eval mode (no dropout), in fixed order and without Ray: an independent
    measure of what training was meant to lower. Rows become features through the same pure
    functions the workers use (stream_rows, decode_*), so padding, prompts and routes match.
    ``component``: one part of a dict loss (SpladeLoss: base_loss, document_regularizer_loss, ...)."""
    import numpy as np
    import torch

    from raytrieve.data.pipeline import decode_features, decode_labels, decode_texts, stream_rows
    from raytrieve.encoders import load_encoder
    from raytrieve.train.loop import build_losses
    from raytrieve.train.run import prepare

    prepared = prepare(cfg)
    cfg = prepared.spec.config  # its datasets' columns and prompts filled in, as the workers get it
    encoder = load_encoder(cfg.model.kind, model_path)
    encoder.eval()
    losses = build_losses(cfg, encoder, 1)
    for loss in losses:
        loss.eval()
    total, batches = 0.0, 0
    for i, (d, stream) in enumerate(zip(cfg.datasets, prepared.stream.datasets)):
        table = pq.read_table(d.path)
        rows = stream_rows(table, np.arange(table.num_rows), i, prepared.stream)
        for lo in range(0, rows.num_rows, cfg.training.batch_size):
            batch = rows.slice(lo, cfg.training.batch_size)
            labels = decode_labels(batch, stream.label_kind)
            if cfg.model.kind == "cross":
                features = decode_texts(batch, stream)
            else:
                modules = [encoder.input_module(r) for r in (stream.routes or [None] * len(stream.columns))]
                features = decode_features(batch, stream, modules)
            value = losses[i](features, labels)
            if isinstance(value, dict):  # SpladeLoss: base loss + regularizers
                value = value[component] if component else sum(value.values())
            total += float(value.detach())
            batches += 1
    return total / batches


def check_shipped_run(cfg: TrainConfig, initial: str, steps: int, run_id: str, model_version: str | None) -> None:
    """What a finished run of a shipped config must show (``initial``: the model it started from):
    every row trained on, its MLflow run complete, weights moved and the config's own loss on its
    data lowered (measured here, not by the trainer), and a model sentence-transformers loads
    with raytrieve's outputs."""
    import sentence_transformers as st
    import torch

    from raytrieve.tracking import mlflow_run
    from raytrieve.encoders import load_encoder
    from tests.conftest import SENTENCES

    rows = sum(pq.read_metadata(d.path).num_rows for d in cfg.datasets)
    assert steps == -(-rows // cfg.training.batch_size)  # every row trained on, the last batch smaller
    client = mlflow_run.client(cfg.mlflow.tracking_uri)  # a file store, which MLflow now wants opted into
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["training.batch_size"] == str(cfg.training.batch_size)
    assert run.data.params["datasets.0.loss.name"] == cfg.datasets[0].loss.name
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == list(range(1, steps + 1))
    assert all(m.value == m.value for m in history)  # no NaN
    assert {"learning_rate", "samples_per_s"} <= set(run.data.metrics)
    if cfg.datasets[0].loss.name == "SpladeLoss":  # dict loss: each component logged too
        assert {"loss_base_loss", "loss_document_regularizer_loss", "splade_document_regularizer_weight"} <= set(
            run.data.metrics), sorted(run.data.metrics)
    if cfg.eval.path:
        assert any(k.startswith("eval_") and "_at_" in k for k in run.data.metrics), sorted(run.data.metrics)
    assert "model/modules.json" in {a.path for a in client.list_artifacts(run_id, "model")}
    if cfg.mlflow.register_model_as:
        assert model_version == "1"
        # Through registry(): a file registry reads a version through MLflow's default store,
        # which would create mlflow.db in the working directory (the checkout).
        with mlflow_run.registry(cfg.mlflow.tracking_uri) as registry:
            assert registry.get_model_version(cfg.mlflow.register_model_as, "1").run_id == run_id
    check_model_card(cfg, steps, run_id, model_version)

    # Training did something, measured outside the trainer: most weight tensors moved, and the
    # config's own loss over its data went down.
    ours = load_encoder(cfg.model.kind, cfg.output_dir)
    before = load_encoder(cfg.model.kind, initial).state_dict()
    moved = [k for k, v in ours.state_dict().items() if not torch.equal(v, before[k])]
    assert len(moved) > len(before) // 2, sorted(set(before) - set(moved))
    start, end = loss_on_data(cfg, initial), loss_on_data(cfg, cfg.output_dir)
    assert end < start, (start, end)

    # The final model: sentence-transformers loads it and gives the same outputs as raytrieve.
    cls = {"dense": st.SentenceTransformer, "sparse": st.SparseEncoder, "cross": st.CrossEncoder}[cfg.model.kind]
    theirs = cls(cfg.output_dir, device="cpu")
    if cfg.model.kind == "cross":
        pairs = list(zip(SENTENCES[:4], SENTENCES[4:8]))
        torch.testing.assert_close(torch.as_tensor(ours.predict(pairs)), torch.as_tensor(theirs.predict(pairs)),
                                   atol=1e-5, rtol=1e-4)
    else:
        a = ours.encode_document(SENTENCES[:4], convert_to_tensor=True)
        b = theirs.encode_document(SENTENCES[:4], convert_to_tensor=True)
        torch.testing.assert_close(a.to_dense() if a.is_sparse else a, b.to_dense() if b.is_sparse else b,
                                   atol=1e-5, rtol=1e-4)


def card_front_matter(text: str) -> dict[str, Any]:
    """A model card's YAML front matter, parsed."""
    assert text.startswith("---\n"), text[:200]
    head, sep, _ = text[4:].partition("\n---\n")
    assert sep, "the front matter is not closed"
    meta = yaml.safe_load(head)
    assert isinstance(meta, dict)
    return meta


def check_model_card(cfg: TrainConfig, steps: int, run_id: str, model_version: str | None) -> None:
    """The trained model's card (README.md) states the run's real facts; MLflow holds it inside
    the logged model and as the run's model_card.md; a registered version is described by its
    summary line; the saved config loads back as the run's config."""
    import re
    import tempfile

    import torch

    from raytrieve.encoders.precision import cpu_has_fast_bf16
    from raytrieve.tracking import mlflow_run
    from raytrieve.train.config import load_train_config
    from raytrieve.train.model_card import CONFIG_FILE, loss_name, number

    out = Path(cfg.output_dir)
    card = (out / "README.md").read_text(encoding="utf-8")
    meta = card_front_matter(card)
    assert meta["library_name"] == "sentence-transformers" and meta["base_model"] == cfg.model.name_or_path
    rows = sum(pq.read_metadata(d.path).num_rows for d in cfg.datasets)
    for d in cfg.datasets:
        name = loss_name(d.loss.model_dump())
        assert f"loss:{name}" in meta["tags"] and f"- Loss: `{name}`" in card
        assert f"- File: `{d.path}` (parquet), {pq.read_metadata(d.path).num_rows} rows" in card
    assert f"dataset_size:{rows}" in meta["tags"]
    assert f"| Batch size (per worker) | {cfg.training.batch_size} |" in card
    assert f"| Optimizer steps | {steps} |" in card
    assert f"torch {torch.__version__}" in card and f"{cfg.scaling.num_workers} CPU worker(s)" in card
    bf16 = cfg.training.bf16 and cpu_has_fast_bf16()
    assert ("- Precision: bfloat16 autocast" if bf16 else "- Precision: float32") in card
    wall = re.search(r"Wall time: (?:(\d+) min )?([\d.]+) s", card)
    assert wall and 60 * int(wall.group(1) or 0) + float(wall.group(2)) > 0, card
    assert load_train_config(out / CONFIG_FILE).model_dump() == cfg.model_dump()

    client = mlflow_run.client(cfg.mlflow.tracking_uri)
    if cfg.eval.path:  # the card's figure is the last one the run logged
        primary = re.search(r"^\| \*\*(\S+)\*\* \| \*\*(\S+)\*\* \|$", card, re.M)
        assert primary, card
        history = client.get_metric_history(run_id, mlflow_run.metric_name(primary.group(1)))
        assert number(history[-1].value) == primary.group(2) and f"at step {steps} " in card
    else:
        assert "The run evaluated nothing" in card
    logged = {a.path for a in client.list_artifacts(run_id, "model")}
    assert {"model/README.md", f"model/{CONFIG_FILE}"} <= logged
    with tempfile.TemporaryDirectory() as tmp:
        inside = Path(client.download_artifacts(run_id, "model/README.md", tmp)).read_text(encoding="utf-8")
        alone = Path(client.download_artifacts(run_id, mlflow_run.MODEL_CARD_ARTIFACT, tmp)).read_text(encoding="utf-8")
    assert inside == card and alone == card
    summary = card.split("\n---\n", 1)[1].lstrip().split("\n\n")[1]
    assert client.get_run(run_id).data.tags[mlflow_run.CARD_SUMMARY_TAG] == summary
    if cfg.mlflow.register_model_as:
        with mlflow_run.registry(cfg.mlflow.tracking_uri) as registry:  # see check_shipped_run
            assert registry.get_model_version(cfg.mlflow.register_model_as, str(model_version)).description == summary
