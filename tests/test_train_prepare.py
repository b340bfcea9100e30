"""Bad configs and bad data fail in the driver's checks, before any Ray work, with the
problem named; the batch plan gives every rank the same number of steps."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytrieve import DenseEncoder
from raytrieve.errors import ConfigError, DataError
from raytrieve.train.config import LossSpec
from raytrieve.train.run import prepare
from tests.train_helpers import shipped_config, write_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


def test_missing_column(tiny_models, data, tmp_path):
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data)
    cfg.datasets[0].columns = ["query", "passage"]
    with pytest.raises(DataError, match=r"\['passage'\] not in .*train.parquet"):
        prepare(cfg)


def test_empty_file(tiny_models, data, tmp_path):
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data)
    (tmp_path / "empty.jsonl").write_text("")
    cfg.datasets[0].path = str(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="has no rows"):
        prepare(cfg)


def test_unknown_loss(tiny_models, data, tmp_path):
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data)
    cfg.datasets[0].loss.name = "MultipleNegativeRankingLoss"
    with pytest.raises(ConfigError, match=r"^config.datasets\[0\].loss.name: unknown dense loss 'MultipleNegativeRankingLoss'; "
                                          r"did you mean 'MultipleNegativesRankingLoss'\? choose from \["):
        prepare(cfg)
    # A loss of another kind is named as such, at its own key, the wrapping loss first (a sparse
    # base under SpladeLoss on a dense model was "unknown", named at the outer loss).
    cfg.datasets[0].loss = LossSpec("SpladeLoss", {"document_regularizer_weight": 3e-5},
                                    inner=LossSpec("SparseMultipleNegativesRankingLoss"))
    with pytest.raises(ConfigError, match=r"^config.datasets\[0\].loss.name: SpladeLoss is a sparse loss, and "
                                          r"model.kind is dense; choose a dense loss \[.*\], or set model.kind: sparse"):
        prepare(cfg)
    cfg.datasets[0].loss = LossSpec("MatryoshkaLoss", {"matryoshka_dims": [32, 16]},
                                    inner=LossSpec("SparseMultipleNegativesRankingLoss"))
    with pytest.raises(ConfigError, match=r"^config.datasets\[0\].loss.inner.name: SparseMultipleNegativesRankingLoss "
                                          r"is a sparse loss, and model.kind is dense; did you mean "
                                          r"'MultipleNegativesRankingLoss'\?"):
        prepare(cfg)
    cfg.datasets[0].loss = LossSpec("MultipleNegativesRankingLoss")
    cfg.datasets[0].loss.name = "MultipleNegativesRankingLoss"
    cfg.datasets[0].loss.args = {"similarity_fct": "euclid"}
    with pytest.raises(ConfigError, match=r"^config.datasets\[0\].loss.args.similarity_fct: 'euclid'; "
                                          r"MultipleNegativesRankingLoss takes 'cosine' or 'dot'$"):
        prepare(cfg)


def test_wrong_label_type(tiny_models, data, tmp_path):
    cfg = shipped_config("cross_bce", tmp_path, tiny_models, data)
    t = pq.read_table(data["labeled"])
    pq.write_table(t.set_column(2, "label", pa.array(["yes"] * t.num_rows)), tmp_path / "bad.parquet")
    cfg.datasets[0].path = str(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="label column 'label' must be numeric"):
        prepare(cfg)


def test_bad_values_inside_rows_are_refused_before_training(tiny_models, data, tmp_path):
    """Null counts miss them: a NaN label trained NaN weights (saved and registered); a listwise row
    with more labels than documents, or a null document inside a list, failed on a worker."""
    cfg = shipped_config("cross_bce", tmp_path, tiny_models, data)
    t = pq.read_table(data["labeled"])
    labels = t.column("label").to_pylist()
    for value in (float("nan"), float("inf")):
        pq.write_table(t.set_column(2, "label", pa.array(labels[:3] + [value] + labels[4:])), tmp_path / "nan.parquet")
        cfg.datasets[0].path = str(tmp_path / "nan.parquet")
        with pytest.raises(DataError, match=r"\(pydocs-labeled\): 1 row\(s\) of .*nan.parquet have a NaN or infinite label in "
                                            r"'label' \(the loss, then every weight, would be NaN\); drop or fix those "
                                            rf"rows; the first is row 3 \(from 0\) in .*nan.parquet: .*label={value!r}"):
            prepare(cfg)
    # In a folder of files, the row is counted in the file the error names.
    (tmp_path / "parts").mkdir()
    pq.write_table(t, tmp_path / "parts" / "part-0.parquet")
    pq.write_table(t.set_column(2, "label", pa.array(labels[:2] + [float("nan")] + labels[3:])),
                   tmp_path / "parts" / "part-1.parquet")
    cfg.datasets[0].path = str(tmp_path / "parts")
    with pytest.raises(DataError, match=r"the first is row 2 \(from 0\) in .*part-1.parquet: "):
        prepare(cfg)
    # A file large enough to be read in several pieces (train_source.PIECE_ROWS rows each).
    big = pa.concat_tables([t] * (200_000 // t.num_rows + 1))
    big = big.set_column(2, "label", pa.array([1.0] * 150_001 + [float("nan")] + [0.0] * (big.num_rows - 150_002)))
    pq.write_table(big, tmp_path / "big.parquet", row_group_size=50_000)
    cfg.datasets[0].path = str(tmp_path / "big.parquet")
    with pytest.raises(DataError, match=r"the first is row 150001 \(from 0\) in .*big.parquet: "):
        prepare(cfg)
    cfg = shipped_config("cross_lambda", tmp_path, tiny_models, data)
    t = pq.read_table(data["listwise"])
    docs, scores = t.column("documents").to_pylist(), t.column("labels").to_pylist()
    # Each: the rows with the problem, then the first of them, which the error shows.
    cases = {
        "another number of labels than documents": (
            docs, scores[:2] + [scores[2] + [0.0]] + [[1.0]] + scores[4:], 2, 2),
        "a null inside a list": (docs[:1] + [docs[1][:1] + [None] + docs[1][2:]] + docs[2:], scores, 1, 1),
        "a NaN or infinite label": (docs, scores[:4] + [[1.0, float("nan"), 0.0]] + scores[5:], 1, 4),
    }
    for message, (d, y, rows, first) in cases.items():
        pq.write_table(pa.table({"query": t.column("query"), "documents": d, "labels": y}), tmp_path / "list.parquet")
        cfg.datasets[0].path = str(tmp_path / "list.parquet")
        query = re.escape(repr(t.column("query")[first].as_py()))
        with pytest.raises(DataError, match=rf"{rows} row\(s\) of .*list.parquet have {message}.*; the first is row "
                                            rf"{first} \(from 0\) in .*list.parquet: query={query}, documents="):
            prepare(cfg)


def test_a_folders_files_are_checked_each_not_by_the_first_alone(tiny_models, data, tmp_path):
    """A jsonl folder's schema is its first file's: float labels of a later file were read as that
    file's integers (0.7 became 0); a later file without a column, or with text for numbers, was a
    KeyError or an ArrowInvalid traceback from the read, naming no file."""

    from raytrieve.data.validate import validate_dataset

    cfg = shipped_config("cross_bce", tmp_path, tiny_models, data)
    rows = pq.read_table(data["labeled"]).to_pylist()
    folder = tmp_path / "pairs"
    folder.mkdir()

    def write(name, part, **change):
        (folder / name).write_text("".join(json.dumps({**r, **change}) + "\n" for r in part))

    write("a.jsonl", rows[:8], label=1)
    write("b.jsonl", rows[8:], label=0.7)
    cfg.datasets[0].path, cfg.datasets[0].format = str(folder), "jsonl"
    report = validate_dataset(cfg.datasets[0], "cross", "config", keys=None)
    assert report.types["label"] == pa.float64()
    p = prepare(cfg)
    assert p.stream.datasets[0].label_kind == "float"
    write("b.jsonl", [{k: v for k, v in r.items() if k != "document"} for r in rows[8:]])
    with pytest.raises(DataError, match=r"b.jsonl: has no column\(s\) \['document'\] \(its columns: \['query', "
                                        r"'label'\]\); every file of the folder needs the same columns"):
        prepare(cfg)
    write("b.jsonl", rows[8:], label="relevant")
    with pytest.raises(DataError, match=r"b.jsonl: column 'label' holds text, the folder's first file holds number; "):
        prepare(cfg)
    # A parquet folder with a file that is not parquet: the file is named, not only the folder.
    cfg.datasets[0].path, cfg.datasets[0].format = str(tmp_path / "parquet_pairs"), "parquet"
    (tmp_path / "parquet_pairs").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "parquet_pairs" / "a.parquet")
    (tmp_path / "parquet_pairs" / "b.parquet").write_bytes(b"not parquet " * 8)
    with pytest.raises(DataError, match=r"parquet_pairs/b.parquet: cannot read it as parquet \(Parquet magic bytes"):
        prepare(cfg)


def test_each_dataset_is_listed_once_and_a_listing_handed_on_plans_the_same(tiny_models, data, tmp_path,
                                                                            monkeypatch):
    """Listing a folder on an object store costs a request per file. ``raytrieve train`` checks
    paths and columns before torch loads, then prepare checks the schema and scans the rows: each
    listed the dataset again (three listings). Now the early listing is handed on: one in all,
    and prepare alone lists once; the plan is the same either way."""
    from raytrieve.data import train_source
    from raytrieve.data.validate import check_dataset_columns

    calls = []
    real = train_source.list_pieces

    def counted(location, fmt):
        calls.append(str(location))
        return real(location, fmt)

    monkeypatch.setattr(train_source, "list_pieces", counted)
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data)
    cfg.datasets.append(shipped_config("dense_mnrl", tmp_path, tiny_models, data).datasets[0])
    cfg.datasets[1].name = "second"
    paths = [d.path for d in cfg.datasets]
    alone = prepare(cfg)
    assert calls == paths
    calls.clear()
    listed = [check_dataset_columns(d, f"config.datasets[{i}]") for i, d in enumerate(cfg.datasets)]
    handed = prepare(cfg, listed=listed)
    assert calls == paths
    assert handed.pieces == alone.pieces
    for f in dataclasses.fields(alone.plan):
        a, b = getattr(alone.plan, f.name), getattr(handed.plan, f.name)
        assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b, f.name


def test_the_inference_free_start_follows_the_configured_model_and_output_never_replaces_it(tiny_models, data,
                                                                                           tmp_path):
    """The inference-free Router built from model.name_or_path was reused while its folder
    existed: a run stopped before its first checkpoint, rerun with another model, trained the first
    model's Router under the second's name. And an output_dir that is the model's folder (a
    fine-tune in place) replaced the base model with the result."""
    import torch

    from raytrieve import SparseEncoder
    from raytrieve.train.checkpoint import checkpoint_dir

    def document_side(folder):
        router = SparseEncoder(str(folder), device="cpu").first_module
        return next(iter(router.sub_modules["document"][0].state_dict().values()))

    cfg = shipped_config("router_inference_free_splade", tmp_path, tiny_models, data)
    first = Path(prepare(cfg).spec.model_path)
    assert str(first.parent) == checkpoint_dir(cfg)
    torch.testing.assert_close(document_side(first), next(iter(
        SparseEncoder(str(tiny_models["sparse"]), device="cpu").first_module.state_dict().values())))
    other = SparseEncoder(str(tiny_models["sparse"]), device="cpu")
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.5)
    other.save(tmp_path / "other-splade")
    cfg.model.name_or_path = str(tmp_path / "other-splade")
    built = Path(prepare(cfg).spec.model_path)
    torch.testing.assert_close(document_side(built), next(iter(other.first_module.state_dict().values())))
    torch.testing.assert_close(document_side(first), next(iter(  # the first run's start is untouched
        SparseEncoder(str(tiny_models["sparse"]), device="cpu").first_module.state_dict().values())))
    mtime = (built / "modules.json").stat().st_mtime_ns
    assert Path(prepare(cfg).spec.model_path) == built  # the same model again: its Router is reused
    assert (built / "modules.json").stat().st_mtime_ns == mtime

    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data)
    cfg.output_dir = str(tiny_models["dense"])  # a model folder: an earlier output would be replaced
    with pytest.raises(ConfigError, match=r"job.yaml.output_dir .*: holds the model being trained "
                                          r"\(job.yaml.model.name_or_path .*\), which the trained model would "
                                          r"replace whole; name another folder"):
        prepare(cfg, "job.yaml")


def test_bad_loss_argument_is_caught_against_the_model(tiny_models, data, tmp_path):
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data)
    cfg.datasets[0].loss.args = {"scael": 20}
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) \['scael'\]"):
        prepare(cfg)
    # The wrong type failed inside the loss: "'<=' not supported between 'str' and 'int'", unnamed.
    for args, message in (({"scale": "twenty"}, r"args.scale: expected a number \(default 20.0\), got 'twenty'"),
                          ({"scale": True}, r"args.scale: expected a number"),
                          ({"gather_across_devices": "yes"}, r"args.gather_across_devices: expected true or false")):
        cfg.datasets[0].loss.args = args
        with pytest.raises(ConfigError, match=r"^config.datasets\[0\].loss." + message):
            prepare(cfg)


def test_cached_loss_with_fsdp_is_refused(tiny_models, data, tmp_path):
    cfg = shipped_config("dense_cached_mnrl_matryoshka", tmp_path, tiny_models, data, scaling__strategy="fsdp")
    with pytest.raises(ConfigError, match="strategy: ddp"):
        prepare(cfg)


def test_plan_is_equal_across_ranks_and_reports_what_it_leaves_out(tiny_models, data, tmp_path):
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, scaling__num_workers=3)
    p = prepare(cfg)
    plan = p.plan
    table = pq.read_table(data["train"]).to_pydict()
    # 24 rows, global batches of 12: nothing left out; batches share rows equally per rank.
    assert plan.micro_batches == 2 and plan.rank_sizes.tolist() == [4, 4]
    for m in range(plan.micro_batches):
        slices = [plan.rank_rows(r, m) for r in range(3)]
        assert len({len(s) for s in slices}) == 1
        texts = [t for s in slices for i in s.tolist() for t in (table["query"][i], table["document"][i])]
        assert len(texts) == len(set(texts))  # no duplicates across the ranks of one global batch
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, scaling__num_workers=5)
    p = prepare(cfg)
    assert p.plan.dropped and "multiple of 5 workers" in p.plan.dropped[0]
    # training.max_steps stops mid-epoch: the rows it never reached are named too (24 rows in
    # batches of 4 are 6 steps an epoch; 4 steps read 16 rows, 8 read 24 + 8).
    for steps, want in ((4, ["8 row(s) of pydocs in epoch 0: training.max_steps=4 reached first"]), (6, []),
                        (8, ["16 row(s) of pydocs in epoch 1: training.max_steps=8 reached first"])):
        plan = prepare(shipped_config("dense_mnrl", tmp_path, tiny_models, data, training__max_steps=steps)).plan
        assert plan.dropped == want and len(plan.rows) == 4 * steps
        assert len(set(plan.rows[plan.epoch.repeat(4) == 0].tolist())) == 24 - (8 if steps == 4 else 0)


def test_the_driver_plans_on_keys_not_texts(tiny_models, data, tmp_path):
    """What the planner holds per row is a row index (int32) and, for no-duplicates, one uint64
    hash per text value; the plan and what ships to workers carry no text."""
    import numpy as np

    from raytrieve.data.validate import validate_dataset

    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, eval={})  # eval sets do ship, small
    report = validate_dataset(cfg.datasets[0], "dense", "config", keys="texts")
    assert report.text_keys.dtype == np.uint64 and report.text_keys.shape == (24, 2)
    p = prepare(cfg)
    assert p.plan.rows.dtype == np.int32 and sorted(p.plan.rows.tolist()) == list(range(24))
    for value in (p.plan.offsets, p.plan.epoch, p.plan.dataset, p.spec.micro_batch_rows, p.spec.micro_batch_epoch):
        assert isinstance(value, np.ndarray)
    import pickle

    shipped = pickle.dumps((p.spec, p.stream, p.pieces, p.plan))
    assert b"question 3" not in shipped and b"Answer 3" not in shipped  # not a text on the way to the workers


def test_prompts_run_wide_and_per_dataset(tiny_models, data, tmp_path, caplog):
    datasets = [
        {"name": "a", "path": str(data["train"]), "columns": ["query", "document"],
         "loss": {"name": "MultipleNegativesRankingLoss"}},
        {"name": "b", "path": str(data["train"]), "columns": ["query", "document"],
         "loss": {"name": "MultipleNegativesRankingLoss"}, "prompts": "passage: "},
    ]
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, datasets=datasets,
                         prompts={"query": "query: ", "title": "unused: "})
    # A run-wide prompt for a column no dataset has is a misspelt name: it silently did nothing.
    with pytest.raises(ConfigError, match=r"config.prompts: \['title'\] are no text column of any dataset "
                                          r"\(\['document', 'query'\]\); fix the names"):
        prepare(cfg)
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, datasets=datasets, prompts={"query": "query: "})
    with caplog.at_level(logging.WARNING, logger="raytrieve.train"):
        p = prepare(cfg)
    assert p.prompts == [["query: ", None], ["passage: ", "passage: "]]
    # Each role trained with two prompts here: the model keeps none of them, and says so.
    assert p.spec.model_prompts == {}
    assert ("config.prompts, config.datasets[1].prompts: the query columns trained with different prompts "
            "('passage: ', 'query: ')") in caplog.text
    assert "the document columns trained with different prompts ('passage: ', none)" in caplog.text
    # The caller's config is left as given (prepare fills in a copy, the one the workers get):
    # run-wide prompts changed after a run reach the datasets without their own on the next.
    assert cfg.datasets[0].prompts is None and cfg.datasets[0].columns == ["query", "document"]
    assert p.spec.config.datasets[0].prompts == {"query": "query: "}
    cfg.prompts = {"query": "q: "}
    assert prepare(cfg).prompts == [["q: ", None], ["passage: ", "passage: "]]
    # A dataset's own prompts and routes must name its text columns; routes need a Router model.
    cfg.datasets[1].prompts = {"quer": "query: "}
    with pytest.raises(DataError, match=r"config.datasets\[1\] \(b\): prompts names column 'quer', not one of"):
        prepare(cfg)
    cfg.datasets[1].prompts, cfg.datasets[1].router_mapping = None, {"query": "query"}
    with pytest.raises(ConfigError, match=r"config.datasets\[1\].router_mapping: the model has no Router"):
        prepare(cfg)


def test_the_trained_model_keeps_the_prompts_its_data_trained_with(tiny_models, data, tmp_path, caplog):
    """dense_cached_mnrl_matryoshka.yaml trains on "query: ..." and "document: ...", and the saved
    model had no prompts: its evaluation during training, the encoding job and Serve encoded
    without them (helper-85). The prompts go to the model by role (router_mapping's, else the
    first column is the query); the worker sets them before it evaluates and saves."""
    cfg = shipped_config("dense_cached_mnrl_matryoshka", tmp_path, tiny_models, data)
    assert cfg.datasets[0].prompts == {"query": "query: ", "document": "document: "}
    assert prepare(cfg).spec.model_prompts == {"query": "query: ", "document": "document: "}
    cfg.datasets[0].prompts = "passage: "  # one prompt for every column: both roles
    assert prepare(cfg).spec.model_prompts == {"query": "passage: ", "document": "passage: "}
    cfg.datasets[0].prompts, cfg.datasets[0].columns = {"document": "doc: "}, ["document", "query"]
    assert prepare(cfg).spec.model_prompts == {"query": "doc: "}  # the first column is the query side
    cfg.datasets[0].prompts = None
    assert prepare(cfg).spec.model_prompts == {}
    # A one-column dataset's texts are encoded as both (ContrastiveTension over single texts).
    cfg.datasets[0].columns, cfg.datasets[0].prompts = ["document"], "text: "
    cfg.datasets[0].loss = LossSpec(name="ContrastiveTensionLossInBatchNegatives")
    assert prepare(cfg).spec.model_prompts == {"query": "text: ", "document": "text: "}
    # A model whose own prompt the data did not train with keeps it, and the run says so.
    model = DenseEncoder(cfg.model.name_or_path, prompts={"query": "q: "})
    model.save(tmp_path / "prompted")
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, model__name_or_path=str(tmp_path / "prompted"))
    with caplog.at_level(logging.WARNING, logger="raytrieve.train"):
        assert prepare(cfg).spec.model_prompts == {}
    assert ("config.prompts: the query columns trained without a prompt, but the model adds its 'query' prompt "
            "'q: ' to every query it encodes") in caplog.text


def test_cross_encoder_prompt_goes_before_each_query(tiny_models, data, tmp_path, caplog):
    """A cross-encoder's config with prompts was refused (sentence-transformers 6.2 trains with
    one: before each pair's first text). Its one prompt goes to the first column only, and the
    trained model keeps it as its default prompt, so that predict, the evaluator, mining and
    /rerank score as training did. tests/test_losses_sparse_cross.py checks the texts the loss
    gets against sentence-transformers' loss given the prompt."""
    from raytrieve import CrossEncoder

    cross = shipped_config("cross_bce", tmp_path, tiny_models, data)
    p = prepare(cross)
    assert (p.prompts, p.spec.model_prompts, p.spec.model_default_prompt) == ([[None, None]], {}, None)
    p = prepare(shipped_config("cross_bce", tmp_path, tiny_models, data, prompts="question: "))
    assert p.prompts == [["question: ", None]] and p.stream.datasets[0].prompts == ["question: ", None]
    assert (p.spec.model_prompts, p.spec.model_default_prompt) == ({"query": "question: "}, "query")
    # A model with a default prompt of its own keeps its name for the trained one ...
    CrossEncoder(cross.model.name_or_path, prompts={"rerank": "r: "}, default_prompt_name="rerank").save(
        tmp_path / "prompted")
    own = dict(model__name_or_path=str(tmp_path / "prompted"))
    p = prepare(shipped_config("cross_bce", tmp_path, tiny_models, data, prompts="question: ", **own))
    assert (p.spec.model_prompts, p.spec.model_default_prompt) == ({"rerank": "question: "}, "rerank")
    # ... and trained without one, it keeps its own, and the run says the data did not train so.
    with caplog.at_level(logging.WARNING, logger="raytrieve.train"):
        p = prepare(shipped_config("cross_bce", tmp_path, tiny_models, data, **own))
    assert (p.spec.model_prompts, p.spec.model_default_prompt) == ({}, None)
    assert ("config.prompts: the pairs trained without a prompt, but the model puts its default prompt 'rerank' "
            "('r: ') before every query it scores") in caplog.text
    # Two datasets, two prompts: the model keeps none of them, and says so.
    two = shipped_config("cross_bce", tmp_path, tiny_models, data, prompts="question: ")
    two.datasets.append(two.datasets[0].model_copy(update={"name": "other", "prompts": "q: "}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="raytrieve.train"):
        p = prepare(two)
    assert p.prompts == [["question: ", None], ["q: ", None]] and p.spec.model_prompts == {}
    assert ("config.prompts, config.datasets[1].prompts: the datasets trained with different prompts "
            "('q: ', 'question: ')") in caplog.text
    # Per-column prompts mean nothing once columns are joined into pairs.
    with pytest.raises(ConfigError, match=r"config.prompts: a cross-encoder takes one prompt string, put before "
                                          r"each pair's first text \(the query\)"):
        shipped_config("cross_bce", tmp_path, tiny_models, data, prompts={"query": "q: "})


def test_wrapped_loss_gathers_across_workers_by_default(tiny_models, data, tmp_path):
    """A MatryoshkaLoss around MNRL, data-parallel: the base loss gets the other ranks' candidates
    (gather_across_devices), as a bare MNRL does; a config's explicit false still wins."""
    import torch

    from raytrieve.train.config import LossSpec
    from raytrieve.encoders import load_encoder
    from raytrieve.train.loop import build_losses

    encoder = load_encoder("dense", str(tiny_models["dense"]))
    for given, want in ((None, True), (False, False)):
        args = {} if given is None else {"gather_across_devices": given}
        # The base loss under inner, or as sentence-transformers names it (args.loss, a dict from YAML).
        for spec in (LossSpec("MatryoshkaLoss", {"matryoshka_dims": [32, 16]},
                              inner=LossSpec("MultipleNegativesRankingLoss", dict(args))),
                     LossSpec("MatryoshkaLoss", {"matryoshka_dims": [32, 16],
                                                 "loss": {"name": "MultipleNegativesRankingLoss", "args": dict(args)}})):
            cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data)
            cfg.datasets[0].loss = spec
            (loss,) = build_losses(cfg, encoder, world_size=2)
            assert loss.loss.gather_across_devices is want, spec
    # A wrapper's default base (CSRLoss: SparseMultipleNegativesRankingLoss) is written out, so
    # what the trainer sets on it is what build_loss builds.
    csr = LossSpec("CSRLoss")
    assert csr.base is csr.inner and csr.inner.name == "SparseMultipleNegativesRankingLoss"
    # Matryoshka replays one model run per dimension; AdaptiveLayerLoss samples layers per run.
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data)
    cfg.datasets[0].loss = LossSpec("AdaptiveLayerLoss", inner=LossSpec("MultipleNegativesRankingLoss"),
                                    matryoshka_dims=[32, 16])
    with pytest.raises(ConfigError, match="use name: Matryoshka2dLoss"):
        build_losses(cfg, encoder, world_size=1)


def test_an_output_dir_the_final_save_would_destroy_is_refused(tiny_models, data, tmp_path, monkeypatch):
    """The trained model replaces output_dir whole: a folder of other files, the working folder
    and checkpoints inside it were deleted at the end of a run; an earlier model is replaced."""
    kept = tmp_path / "notes"
    kept.mkdir()
    (kept / "precious.txt").write_text("mine")
    (tmp_path / "afile").write_text("mine")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cases = {
        str(kept): (DataError, r"output_dir .*notes: the folder holds other files \(precious.txt\).*new or empty"),
        str(tmp_path / "afile"): (DataError, r"output_dir .*afile: is a file"),
        ".": (ConfigError, r"job.yaml.output_dir .*work: the working folder or one above it"),
        str(tmp_path): (ConfigError, r"the working folder or one above it"),
    }
    for out, (error, message) in cases.items():
        cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, output_dir=out)
        with pytest.raises(error, match=message):
            prepare(cfg, "job.yaml")
    for inside in (str(tmp_path / "model" / "checkpoints"), f"file://{tmp_path}/model/checkpoints"):  # a URI too
        cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, output_dir=str(tmp_path / "model"),
                             checkpoint__dir=inside)
        with pytest.raises(ConfigError, match=r"job.yaml.checkpoint.dir .*model/checkpoints: inside output_dir"):
            prepare(cfg, "job.yaml")
    assert (kept / "precious.txt").read_text() == (tmp_path / "afile").read_text() == "mine"
    # An earlier model in output_dir (its modules.json) is what a rerun replaces.
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "modules.json").write_text("[]")
    prepare(shipped_config("dense_mnrl", tmp_path, tiny_models, data, output_dir=str(earlier)), "job.yaml")


def test_a_model_of_another_kind_or_a_length_past_its_positions_is_refused(tiny_models, data, tmp_path):
    """A cross-encoder trained as kind: dense failed in every worker with KeyError
    'sentence_embedding'; a max_seq_length past the model's positions failed there too."""
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data,
                         model={"name_or_path": str(tiny_models["cross"]), "kind": "dense"})
    with pytest.raises(ConfigError, match=r"job.yaml.model.name_or_path: .* is a cross model \(CrossEncoder, by the "
                                          r"files in .*\); set model.kind: cross, or name a dense model"):
        prepare(cfg, "job.yaml")
    cfg = shipped_config("cross_bce", tmp_path, tiny_models, data,
                         model={"name_or_path": str(tiny_models["dense"]), "kind": "cross"})
    with pytest.raises(ConfigError, match=r"is a dense model .*; set model.kind: dense, or name a cross model"):
        prepare(cfg, "job.yaml")
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data)
    cfg.model.max_seq_length = 100_000
    with pytest.raises(ConfigError, match=r"job.yaml.model.max_seq_length: 100000 is more than the \d+ positions"):
        prepare(cfg, "job.yaml")


def test_an_eval_file_that_does_not_read_gets_advice_for_eval_path(tiny_models, data, tmp_path):
    """eval.path has no format: key, yet its errors advised to 'set format:'."""
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data)
    (tmp_path / "eval.txt").write_text("query,document\n")
    (tmp_path / "eval.parquet").write_text("not parquet")
    for name, message in (("eval.txt", "cannot tell the format from the name"), ("eval.parquet", "cannot read it as parquet")):
        cfg.eval.path = str(tmp_path / name)
        with pytest.raises(DataError, match=rf"{message}.*; check the file; job.yaml.eval.path is read by its name's "
                                            r"suffix \(.parquet, .jsonl, .csv, ...\)$") as e:
            prepare(cfg, "job.yaml")
        assert "format:" not in str(e.value)


def test_an_eval_file_may_lie_at_a_uri_in_any_format(tiny_models, data, tmp_path):
    """eval.path was read as a local path only: an eval set in a bucket could not be named where
    the datasets could. It reads any location and format the datasets do, to the same columns."""
    import pyarrow.csv as pcsv

    local = prepare(shipped_config("dense_mnrl", tmp_path, tiny_models, data)).spec.eval_columns
    table = pq.read_table(data["test"])
    (tmp_path / "e").mkdir()
    pq.write_table(table, tmp_path / "e" / "test.parquet")
    pcsv.write_csv(table, tmp_path / "e" / "test.csv")
    (tmp_path / "e" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data)
    for name in ("test.parquet", "test.csv", "test.jsonl"):
        cfg.eval.path = f"file://{tmp_path}/e/{name}"
        p = prepare(cfg, "job.yaml")
        assert p.spec.eval_columns == local and len(local["query"]) == table.num_rows
    cfg.eval.path = f"file://{tmp_path}/e/missing.parquet"
    with pytest.raises(DataError, match=r"job.yaml.eval.path: file://.*/e/missing.parquet does not exist"):
        prepare(cfg, "job.yaml")


def test_the_evaluator_reads_the_columns_of_its_roles(tiny_models, data, tmp_path):
    """build-pydocs' test split is id, query, document, package: by position the evaluator took
    the ids as its queries and the query texts as its corpus, and logged those metrics. The
    shipped configs name eval.columns; without it, more text columns than roles are refused."""
    import pyarrow as pa

    from raytrieve.train.evaluate import build_evaluator

    test = pq.read_table(data["test"]).to_pydict()
    assert list(test) == ["id", "query", "document", "package"]  # the layout build-pydocs writes
    p = prepare(shipped_config("dense_mnrl", tmp_path, tiny_models, data))
    assert list(p.spec.eval_columns) == ["query", "document"]  # only these ship to the workers
    evaluator = build_evaluator(p.spec.eval_columns, "information_retrieval", "dense")
    assert sorted(evaluator.queries) == sorted(test["query"])  # sentence-transformers' attributes: lists
    assert sorted(evaluator.corpus) == sorted(test["document"])
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data)
    cfg.eval.columns = None
    with pytest.raises(ConfigError, match=r"information_retrieval takes query, document; the file has the text "
                                          r"columns \['id', 'query', 'document', 'package'\]: set job.yaml.eval.columns "
                                          r"to the columns in that order \(e.g. \[query, document\]\)"):
        prepare(cfg, "job.yaml")  # the example was the first two columns, [id, query]
    cfg.eval.columns = ["query", "answer"]
    with pytest.raises(ConfigError, match=r"job.yaml.eval.columns: \['answer'\] not in the file, whose columns are"):
        prepare(cfg, "job.yaml")
    cfg.eval.columns = ["query", "document", "package"]
    with pytest.raises(ConfigError, match=r"information_retrieval takes query, document; got \['query', 'document', "):
        prepare(cfg, "job.yaml")
    cfg.eval.columns = ["query", "query"]
    with pytest.raises(ConfigError, match=r"job.yaml.eval.columns: \['query'\] named more than once"):
        prepare(cfg, "job.yaml")
    # reranking takes query, positive and any number of negatives: an id among 4 text columns
    # would be its query, so more than 3 need eval.columns.
    cfg.eval.columns, cfg.eval.evaluator = None, "reranking"
    with pytest.raises(ConfigError, match=r"reranking takes query, positive, negative... .*; the file has the text "
                                          r"columns \['id', 'query', 'document', 'package'\], .* \(e.g. "
                                          r"\[<query column>, <positive column>, <negative column>\]\)"):
        prepare(cfg, "job.yaml")
    from raytrieve.train.evaluate import _example

    assert _example("information_retrieval", ["question_id", "question", "doc_id", "document"]) == ["question", "document"]
    assert _example("reranking", ["query", "positive", "negative_1", "negative_2"]) == [
        "query", "positive", "negative_1", "negative_2"]
    # A listwise file (query, a list of documents, their labels): information_retrieval names its lists
    # (reranking reads it: test_reranking_eval_reads_listwise_and_list_files).
    pq.write_table(pa.table({"query": ["q1"], "docs": [["a", "b"]], "labels": [[1.0, 0.0]]}), tmp_path / "lists.parquet")
    cfg.eval.path, cfg.eval.evaluator = str(tmp_path / "lists.parquet"), "information_retrieval"
    with pytest.raises(ConfigError, match=r"the file has the text columns \['query'\] \(\['docs'\] hold lists of "
                                          r"texts: information_retrieval takes one text per column\)"):
        prepare(cfg, "job.yaml")
    cfg.eval.path = str(data["test"])
    # Two text columns alone need no eval.columns; a null is named, not read as a missing column.
    pq.write_table(pa.table({"q": test["query"], "d": [None] + test["document"][1:]}), tmp_path / "two.parquet")
    cfg.eval.columns, cfg.eval.path = None, str(tmp_path / "two.parquet")
    with pytest.raises(DataError, match=r"column 'd' has 1 null value\(s\); fill or drop those rows"):
        prepare(cfg, "job.yaml")
    # embedding_similarity: two texts and the score, found by type without eval.columns.
    pq.write_table(pa.table({"s1": test["query"], "s2": test["document"], "score": [0.5] * len(test["id"])}),
                   tmp_path / "sts.parquet")
    cfg.eval.path, cfg.eval.evaluator = str(tmp_path / "sts.parquet"), "embedding_similarity"
    assert list(prepare(cfg, "job.yaml").spec.eval_columns) == ["s1", "s2", "score"]


def test_reranking_eval_reads_listwise_and_list_files(tiny_models, tmp_path):
    """reranking read one text per column only, so the listwise files cross-encoders train on
    (query, documents, labels) and files of positive and negative lists were refused. Each layout
    is checked against sentence-transformers' own evaluator given the samples written out by hand."""
    import pyarrow as pa
    import sentence_transformers as st
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator
    from sentence_transformers.evaluation import RerankingEvaluator

    from raytrieve import CrossEncoder
    from raytrieve.train.evaluate import build_evaluator, select_eval_columns

    queries = ["how to sort a list", "capital of france", "what is a prime", "boiling point of water"]
    docs = [["sorted() returns a new list", "paris is in france", "list.sort sorts in place"],
            ["paris is the capital of france", "lyon is a city"], ["a prime has two divisors", "sort a list"],
            ["water boils at 100 degrees", "ice melts"]]
    labels = [[2.0, 0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 3.0]]  # the third query has no relevant document
    by_hand = [{"query": queries[0], "positive": [docs[0][0], docs[0][2]], "negative": [docs[0][1]]},
               {"query": queries[1], "positive": [docs[1][0]], "negative": [docs[1][1]]},
               {"query": queries[2], "positive": [], "negative": docs[2]},
               {"query": queries[3], "positive": [docs[3][1]], "negative": [docs[3][0]]}]
    listwise = {"id": ["1", "2", "3", "4"], "query": queries, "docs": docs, "labels": labels}
    # The id is a second text column: the roles must be named.
    with pytest.raises(ConfigError, match=re.escape(
            "cfg.eval: reranking takes query, positive, negative... (a text each, or lists of texts for positive and "
            "negative); query, documents, labels (a list of texts and a list of labels per row); or query, document, "
            "label (one row per pair, grouped by query); the file has the text columns ['id', 'query'], the "
            "text-list columns ['docs'], the label-list columns ['labels'] and the number columns []: set "
            "eval.columns to the columns in one of those orders (e.g. [query, docs, labels])")):
        select_eval_columns(listwise, "reranking", None, "cfg.eval", "eval.columns")
    del listwise["id"]
    columns = select_eval_columns(listwise, "reranking", None, "cfg.eval", "eval.columns")
    assert list(columns) == ["query", "docs", "labels"]
    path = str(tiny_models["cross"])
    ours = build_evaluator(columns, "reranking", "cross")(CrossEncoder(path, device="cpu"))
    theirs = CrossEncoderRerankingEvaluator(by_hand, name="eval")(st.CrossEncoder(path, device="cpu"))
    assert ours == pytest.approx(theirs, abs=1e-6)
    # Positives and negatives as lists (the first query's two positives in one cell), texts or lists.
    lists = {"query": queries, "positive": [s["positive"] or ["-"] for s in by_hand],
             "negative": [s["negative"] for s in by_hand]}
    columns = select_eval_columns(lists, "reranking", None, "cfg.eval", "eval.columns")
    dense = str(tiny_models["dense"])
    ours = build_evaluator(columns, "reranking", "dense")(DenseEncoder(dense, device="cpu"))
    samples = [{**s, "positive": s["positive"] or ["-"]} for s in by_hand]
    theirs = RerankingEvaluator(samples, name="eval")(st.SentenceTransformer(dense, device="cpu"))
    assert {k: v for k, v in theirs.items() if k in ours} == pytest.approx(ours, abs=1e-6) and len(ours) == 3
    # A sparse model's reranking failed at the run's last evaluation, after every step (helper-96).
    from sentence_transformers.sparse_encoder.evaluation import SparseRerankingEvaluator

    from raytrieve import SparseEncoder

    sparse = str(tiny_models["sparse"])
    ours = build_evaluator(columns, "reranking", "sparse")(SparseEncoder(sparse, device="cpu"))
    theirs = SparseRerankingEvaluator(samples, name="eval")(st.SparseEncoder(sparse, device="cpu"))
    assert {k: v for k, v in theirs.items() if k in ours} == pytest.approx(ours, abs=1e-6) and len(ours) == 3
    # Refused before Ray: a label per document, no nulls in the labels, columns of the roles' types.
    bad = {**listwise, "labels": [[2.0, 0.0], *labels[1:]]}
    with pytest.raises(DataError, match=re.escape(
            "cfg.eval: 1 row(s) have another number of labels in 'labels' than documents in 'docs' (the first: row 0, "
            "counting from 0, with 3 document(s) and 2 label(s)); give one label per document")):
        select_eval_columns(bad, "reranking", None, "cfg.eval", "eval.columns")
    with pytest.raises(ConfigError, match=r"label-list columns \[\]"):  # a null label is no label
        select_eval_columns({**listwise, "labels": [[2.0, None, 1.0], *labels[1:]]}, "reranking", None, "cfg.eval",
                            "eval.columns")
    with pytest.raises(ConfigError, match=r"eval.columns: reranking takes .*; got \['docs', 'query', 'labels'\] \(the "
                                          r"query: one text per row\)"):
        select_eval_columns(listwise, "reranking", ["docs", "query", "labels"], "cfg.eval", "eval.columns")
    named = select_eval_columns({**lists, "n": queries}, "reranking", ["query", "positive", "negative", "n"],
                                "cfg.eval", "eval.columns")
    assert build_evaluator(named, "reranking", "dense").samples[0][2] == [docs[0][1], queries[0]]
    # One row per (query, document, label) pair: grouped by query (a trial's pointwise file was refused,
    # told to name a negative column it did not have). Labels may be booleans; ids are not taken as labels.
    pairs = {"query": [q for q, d in zip(queries, docs) for _ in d], "document": [t for d in docs for t in d],
             "is_selected": [y > 0 for ys in labels for y in ys]}
    columns = select_eval_columns(pairs, "reranking", None, "cfg.eval", "eval.columns")
    assert list(columns) == ["query", "document", "is_selected"]
    ours = build_evaluator(columns, "reranking", "cross")(CrossEncoder(path, device="cpu"))
    theirs = CrossEncoderRerankingEvaluator(by_hand, name="eval")(st.CrossEncoder(path, device="cpu"))
    assert ours == pytest.approx(theirs, abs=1e-6)
    # Never guessed (helper-96): a label stored as text would be a negative document, a text id the
    # query; scores are no grades (every document would be relevant).
    for guess in ({**pairs, "is_selected": [str(int(y)) for y in pairs["is_selected"]]},
                  {"qid": [str(len(q)) for q in pairs["query"]], **pairs}):
        with pytest.raises(ConfigError, match=r"set eval.columns to the columns in one of those orders"):
            select_eval_columns(guess, "reranking", None, "cfg.eval", "eval.columns")
    with pytest.raises(DataError, match=r"column 'score' holds 0.93, no relevance grade"):
        select_eval_columns({"query": pairs["query"], "document": pairs["document"],
                             "score": [0.93] * len(pairs["query"])}, "reranking", None, "cfg.eval", "eval.columns")
    # A listwise row without candidates counts 0 (it was refused: its empty labels read as no labels).
    empty = {"query": queries, "docs": [*docs[:2], [], docs[3]], "labels": [*labels[:2], [], labels[3]]}
    assert list(select_eval_columns(empty, "reranking", None, "cfg.eval", "eval.columns")) == list(empty)
    ids = {"query": pairs["query"], "document": pairs["document"], "doc_id": list(range(len(pairs["query"])))}
    with pytest.raises(ConfigError, match=r"the number columns \['doc_id'\]: set eval.columns .* \(e.g. "
                                          r"\[query, document, <label column>\]\)"):
        select_eval_columns(ids, "reranking", None, "cfg.eval", "eval.columns")


def test_a_finished_run_is_not_trained_logged_or_registered_again(tiny_models, data, tmp_path, monkeypatch):
    """A new user's trial: rerunning a finished config resumed at its last step, trained nothing,
    and logged an empty MLflow run and a second registry version of the same weights."""
    from raytrieve import ray_cluster
    from raytrieve.tracking import mlflow_run
    from raytrieve.train.checkpoint import claim_checkpoint_dir, record_finished
    from raytrieve.train.run import input_files, run_training, training_data

    class Started(Exception):
        pass

    def start(*_a, **_k):
        raise Started

    monkeypatch.setattr(ray_cluster, "connect", start)
    monkeypatch.setattr(mlflow_run, "start_run", lambda *a, **k: pytest.fail("an MLflow run was opened"))
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data)
    p = prepare(cfg)  # as the finished run claimed its folder, and recorded at its end
    cfg = p.spec.config
    root = claim_checkpoint_dir(cfg, p.plan, "config", training_data(cfg, p), lambda: input_files(p.pieces))
    record_finished(root, {"output_dir": cfg.output_dir, "steps": 6, "run_id": "r1", "model_version": "1",
                           "checkpoint": None, "dropped": [], "tracking_uri": "file:///x", "already_complete": False})
    Path(cfg.output_dir).mkdir(parents=True)
    (Path(cfg.output_dir) / "modules.json").write_text("[]")
    again = run_training(shipped_config("dense_mnrl", tmp_path, tiny_models, data))
    assert again.already_complete and (again.run_id, again.model_version, again.steps) == ("r1", "1", 6)
    # Other settings, or the model gone from output_dir: it trains (here: Ray is started).
    for change in ("settings", "model gone"):
        cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data)
        if change == "settings":
            cfg.optimizer.learning_rate = 1e-3
        else:
            (Path(cfg.output_dir) / "modules.json").unlink()
        with pytest.raises(Started):
            run_training(cfg)


def test_checkpoints_resume_on_the_same_data_copied_or_moved_and_earlier_stamps_too(tiny_models, data, tmp_path):
    """The data key was each input file's size and modification time: the same data synced again
    (a new cluster, a restored bucket) refused the run's checkpoints. Now it is the values' digest;
    a folder an earlier raytrieve stamped resumes while its files are unchanged."""
    import os
    import shutil

    from raytrieve.train.checkpoint import RUN_STAMP, _fingerprint, claim_checkpoint_dir, older_run_identity
    from raytrieve.train.run import input_files, training_data

    train = tmp_path / "in" / "train.parquet"
    train.parent.mkdir()
    shutil.copy(data["train"], train)

    listed = []  # the files are stat'ed (a request each in a bucket) only for an earlier stamp

    def claim(path: Path = train):
        cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, {**data, "train": path})
        p = prepare(cfg)
        cfg = p.spec.config  # as the run claims with it
        files = lambda: listed.append(path) or input_files(p.pieces)  # noqa: E731
        return Path(claim_checkpoint_dir(cfg, p.plan, "config", training_data(cfg, p), files)), cfg, p

    root, cfg, p = claim()
    (root / "run" / "step-00000002").mkdir(parents=True)  # as Ray Train leaves a checkpoint
    kept = json.loads((root / RUN_STAMP).read_text())
    os.utime(train, ns=(10**18, 10**18))  # copied again: other times, the same values
    assert claim()[0] == root
    moved = tmp_path / "elsewhere.parquet"
    shutil.copy(train, moved)
    assert claim(moved)[0] == root
    assert json.loads((root / RUN_STAMP).read_text()) == kept and listed == []

    # The stamp as an earlier raytrieve wrote it (checked against b0d37c6's run_identity): the
    # datasets' paths among the settings, each file's [size, mtime_ns] as the data.
    files = input_files(p.pieces)
    older = older_run_identity(cfg, p.plan, files)
    assert older["data"] == {str(train): [train.stat().st_size, train.stat().st_mtime_ns]}
    settings = json.loads(json.dumps(older))
    assert settings["datasets"][0].pop("path") == str(train)
    settings["datasets"][0].pop("format")  # the stamps of the digest's first versions kept it too
    assert {**settings, "data": kept["identity"]["data"]} == kept["identity"]
    earlier = {"fingerprint": _fingerprint(older), "identity": older, "output_dir": cfg.output_dir,
               "mlflow": {"uri": "file:///x", "run_id": "r1"}}
    (root / RUN_STAMP).write_text(json.dumps(earlier))
    assert claim()[0] == root  # resumed, and stamped by the digest from now on
    restamped = json.loads((root / RUN_STAMP).read_text())
    assert restamped["fingerprint"] == kept["fingerprint"] and restamped["mlflow"] == earlier["mlflow"]
    assert listed == [train]
    (root / RUN_STAMP).write_text(json.dumps(earlier))
    os.utime(train, ns=(2 * 10**18, 2 * 10**18))
    with pytest.raises(ConfigError, match=r"holds checkpoints of a run with other settings or data \(data\..*train"
                       r"\.parquet: \[.*\] -> \[.*\]; that run keyed its data by each file's size and modification "
                       r"time \(an earlier raytrieve\), so a file written again since, even with the same content, "
                       r"counts as a change there\)"):
        claim()
    (root / RUN_STAMP).write_text(json.dumps(kept))  # the digest's stamp: a changed text is refused by name
    table = pq.read_table(train).to_pydict()
    table["document"][3] += "!"
    pq.write_table(pa.table(table), train)
    with pytest.raises(ConfigError, match=r"\(data\.pydocs\.sha256: '.*' -> '.*'\)"):
        claim()


def test_a_rerun_that_resumes_checkpoints_logs_on_into_their_mlflow_run(tiny_models, data, tmp_path):
    """A rerun after a stop resumed the checkpoints but opened a new MLflow run, so one training's
    history was split in two and the registered version pointed at the second half. The stamp
    records the run; a rerun that resumes its checkpoints reopens it (a real local store)."""
    from raytrieve.tracking import mlflow_run
    from raytrieve.train.checkpoint import RUN_STAMP, claim_checkpoint_dir
    from raytrieve.train.run import input_files, open_run, training_data

    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data)
    uri = mlflow_run.tracking_uri(f"file://{tmp_path}/mlruns")
    p = prepare(cfg)
    cfg = p.spec.config  # as the run claims with it

    def claim():
        return claim_checkpoint_dir(cfg, p.plan, "config", training_data(cfg, p), lambda: input_files(p.pieces))

    storage = claim()
    folder = Path(storage)
    first = open_run(storage, uri, cfg, {"lr": "1"})
    mlflow_run.end_run(uri, first, "FAILED")
    second = open_run(claim(), uri, cfg, {"lr": "1"})
    assert second != first  # no checkpoint yet: nothing resumed, a new run
    assert json.loads((folder / RUN_STAMP).read_text())["mlflow"] == {"uri": uri, "run_id": second}
    mlflow_run.end_run(uri, second, "FAILED")
    (folder / "run" / "step-00000002").mkdir(parents=True)  # as Ray Train leaves a checkpoint
    assert open_run(claim(), uri, cfg, {"lr": "2"}) == second  # its params stay as logged
    run = mlflow_run.client(uri).get_run(second)
    assert run.info.status == "RUNNING" and run.data.tags["raytrieve.resumes"] == "1" and run.data.params["lr"] == "1"
    cfg.mlflow.experiment = "another-experiment"  # the config moved the run: a new one goes there
    moved = open_run(claim(), uri, cfg, {"lr": "1"})
    client = mlflow_run.client(uri)
    assert moved != second and client.get_run(moved).info.experiment_id == client.get_experiment_by_name(
        "another-experiment").experiment_id
    other_store = mlflow_run.tracking_uri(f"file://{tmp_path}/other-mlruns")
    assert open_run(claim(), other_store, cfg, {"lr": "1"}) != second  # another store: a run of its own there


def test_more_workers_than_the_embedded_ray_can_hold_is_refused_before_it_starts(tiny_models, data, tmp_path,
                                                                                 monkeypatch):
    """Refused only after the embedded Ray had started (~20 s), though this machine's CPUs are known."""
    from ray._private.utils import get_num_cpus

    from raytrieve import ray_cluster
    from raytrieve.train.run import run_training

    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process (a plain pytest may hold one)
    monkeypatch.setattr(ray_cluster, "connect", lambda *a, **k: pytest.fail("Ray started before the check"))
    workers = int(get_num_cpus())  # one CPU each: none left for the data stage
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, scaling__num_workers=workers,
                         scaling__resources_per_worker={"CPU": 1})
    with pytest.raises(ConfigError, match=rf"job.yaml.scaling: {workers} worker\(s\) x 1.0 CPU leave 0 of the "
                                          rf"cluster's {int(get_num_cpus())} CPUs; the data stage"):
        run_training(cfg, "job.yaml", ray_address="local")


def test_in_batch_negatives_with_one_row_per_batch_is_refused(tiny_models, data, tmp_path):
    """MNRL on (query, document) at batch_size 1 is log(1) = 0 at every step: the run 'trained',
    logged a flat loss and changed nothing. Refused unless the gathered batch has other rows or
    the data gives a hard negative (test_loss_registry checks which losses are constant so)."""
    one = {"training__batch_size": 1}
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, **one)
    with pytest.raises(ConfigError, match=r"^config.training.batch_size: MultipleNegativesRankingLoss "
                                          r"\(config.datasets\[0\].loss\) takes its negatives from the other rows "
                                          r"of a batch, and a batch of 1 row has none.*raise training.batch_size "
                                          r"to 2 or more, or add a hard-negative column"):
        prepare(cfg)
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, **one, scaling__num_workers=2)
    cfg.datasets[0].loss.args["gather_across_devices"] = False
    with pytest.raises(ConfigError, match=r"or set gather_across_devices: true"):
        prepare(cfg)
    # Two workers gathering (the default) see two rows; a hard-negative column is a negative.
    assert prepare(shipped_config("dense_mnrl", tmp_path, tiny_models, data, **one, scaling__num_workers=2))
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, **one)
    cfg.datasets[0].path = str(tmp_path / "triples.parquet")
    t = pq.read_table(data["train"])
    pq.write_table(t.append_column("negative", t.column("document").take(list(range(1, t.num_rows)) + [0])),
                   cfg.datasets[0].path)
    cfg.datasets[0].columns = ["query", "document", "negative"]
    assert prepare(cfg)


def test_batches_the_sampler_leaves_one_row_are_left_out_for_in_batch_negatives(tiny_models, data, tmp_path):
    """no_duplicates keeps repeated texts apart: 24 pairs whose documents are 18 times one text
    made 17 one-row batches, where MNRL's loss is log(1) = 0: 17 of 18 steps trained on nothing,
    silently. They are left out and named; a loss with a hard-negative column keeps them."""
    t = pq.read_table(data["train"])
    docs = t.column("document").to_pylist()
    docs[6:] = [docs[6]] * 18
    path = tmp_path / "repeats.parquet"
    pq.write_table(t.set_column(t.schema.get_field_index("document"), "document", pa.array(docs)), path)
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, training__batch_size=8)
    assert cfg.training.batch_sampler == "no_duplicates"
    cfg.datasets[0].path = str(path)
    plan = prepare(cfg).plan
    sizes = np.diff(plan.offsets).tolist()
    # 7 distinct documents fill one batch of 7; the other 17 rows repeat its 7th document.
    assert sizes == [7] and plan.optimizer_steps == 1
    assert plan.dropped == ["17 row(s) of pydocs in epoch 0: 17 batch(es) of fewer than 2 rows, where its loss "
                            "takes its negatives from the batch's other rows and would be constant (no_duplicates "
                            "kept repeated texts apart)"]
    # Two workers that do not gather see their own slice: a global batch needs 2 rows a rank.
    # 4 distinct documents and two repeated 10 times: one batch of 6, then 9 of the pair.
    two = docs[:4] + [docs[4]] * 10 + [docs[5]] * 10
    pq.write_table(t.set_column(t.schema.get_field_index("document"), "document", pa.array(two)), path)
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, training__batch_size=4, scaling__num_workers=2)
    cfg.datasets[0].path = str(path)
    assert np.diff(prepare(cfg).plan.offsets).tolist() == [6] + [2] * 9  # gathered: 2 rows each
    cfg.datasets[0].loss.args["gather_across_devices"] = False
    plan = prepare(cfg).plan
    assert np.diff(plan.offsets).tolist() == [6]
    assert plan.dropped == ["18 row(s) of pydocs in epoch 0: 9 batch(es) of fewer than 4 rows, where its loss takes "
                            "its negatives from the batch's other rows and would be constant (no_duplicates kept "
                            "repeated texts apart)"]
    # Only such batches: no step is left, and the refusal says why.
    docs = [docs[6]] * 24
    pq.write_table(t.set_column(t.schema.get_field_index("document"), "document", pa.array(docs)), path)
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, training__batch_size=8)
    cfg.datasets[0].path = str(path)
    with pytest.raises(DataError, match=r"gives no full optimizer step .*not trained on: 24 row\(s\) of pydocs in "
                                        r"epoch 0: 24 batch\(es\) of fewer than 2 rows"):
        prepare(cfg)
    # A hard negative per row is a negative in a one-row batch: nothing is left out.
    t2 = t.set_column(t.schema.get_field_index("document"), "document", pa.array(docs))
    pq.write_table(t2.append_column("negative", pa.array([f"an unrelated note, {i}" for i in range(24)])), path)
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, training__batch_size=8)
    cfg.datasets[0].path = str(path)
    cfg.datasets[0].columns = ["query", "document", "negative"]
    plan = prepare(cfg).plan
    assert np.diff(plan.offsets).tolist() == [1] * 24 and not plan.dropped


def test_workers_the_embedded_ray_could_never_place_are_refused_before_it_starts(tiny_models, data, tmp_path,
                                                                                 monkeypatch):
    """Ray Train waits for resources forever (a worker-group start timeout, retried without
    limit): use_gpu, or more GPUs per worker than the machine has, pended with no error."""
    from ray._private.accelerators import get_accelerator_manager_for_resource

    from raytrieve import ray_cluster
    from raytrieve.train.run import run_training

    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_cluster, "connect", lambda *a, **k: pytest.fail("Ray started before the check"))
    manager = get_accelerator_manager_for_resource("GPU")
    gpus = manager.get_current_node_num_accelerators() if manager else 0
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, scaling__use_gpu=True,
                         scaling__resources_per_worker={"CPU": 0.5, "GPU": gpus + 1})
    message = rf"job.yaml.scaling: 1 worker\(s\) of CPU 0.5, GPU {gpus + 1} each \(PACK\) do not fit the machine"
    with pytest.raises(ConfigError, match=message + rf" \(node 0: CPU \d+, GPU {gpus}\): 0 would\. Lower "
                                          r"scaling.num_workers or scaling.resources_per_worker"):
        run_training(cfg, "job.yaml", ray_address="local")


def test_bundles_that_fit_places_whole_workers_per_node():
    from raytrieve.sizing import bundles_that_fit

    nodes = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 3.0}, {"CPU": 16.0, "GPU": 1.0}]
    assert bundles_that_fit(nodes, {"CPU": 1.0}) == 27
    assert bundles_that_fit(nodes, {"CPU": 2.0, "GPU": 1.0}) == 3  # 2 on the first node, 1 on the third
    assert bundles_that_fit(nodes, {"CPU": 2.0, "GPU": 1.0}, "STRICT_PACK") == 2
    assert bundles_that_fit(nodes, {"CPU": 4.0}, "STRICT_SPREAD") == 2  # the 3-CPU node holds none
    assert bundles_that_fit(nodes, {"GPU": 1.0, "CPU": 0.0}) == 3  # a zero ask places anywhere
    assert bundles_that_fit(nodes, {"CPU": 0.1}) == 270  # 0.1 x 10 fits exactly, in floating point too
    assert bundles_that_fit([], {"CPU": 1.0}) == 0


def test_workers_a_cluster_cannot_place_yet_are_warned_of(tiny_models, data, tmp_path, caplog):
    """On a cluster raytrieve did not start, nodes may still join (an autoscaler): a warning that
    names what is missing, not a refusal."""
    from raytrieve.train.run import _check_workers_fit

    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, scaling__num_workers=3,
                         scaling__resources_per_worker={"CPU": 4})
    nodes = [{"CPU": 8.0}, {"CPU": 2.0}]
    with caplog.at_level("WARNING", logger="raytrieve.train"):
        _check_workers_fit(cfg, nodes, "job.yaml", fixed=False)
    assert ("job.yaml.scaling: 3 worker(s) of CPU 4 each (PACK) do not fit the cluster (node 0: CPU 8; node 1: CPU 2): "
            "2 would yet. Ray Train waits for nodes that hold them") in caplog.text
    caplog.clear()
    _check_workers_fit(cfg, [*nodes, {"CPU": 4.0}], "job.yaml", fixed=False)
    assert not caplog.text
