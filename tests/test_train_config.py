"""The training config and the dataset checks that run before any worker starts."""

from __future__ import annotations

import re

import json
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytrieve.data.validate import validate_datasets
from raytrieve.errors import ConfigError, DataError
from raytrieve.train.config import LossSpec, load_train_config

PAIRS = {"question": ["how to sort", "capital of france", "boil an egg"],
         "answer": ["sorted(xs)", "Paris is the capital", "nine minutes in water"],
         "score": [0.9, 0.8, 0.1]}


def write_config(tmp_path, body: str) -> str:
    path = tmp_path / "train.yaml"
    path.write_text(textwrap.dedent(body))
    return str(path)


@pytest.fixture
def data(tmp_path):
    pq.write_table(pa.table(PAIRS), tmp_path / "pairs.parquet")
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for q, a, s in zip(*PAIRS.values()):
            f.write(json.dumps({"question": q, "answer": a, "score": s}) + "\n")
    (tmp_path / "pairs.csv").write_text("question,answer,score\n" + "\n".join(
        f"{q},{a},{s}" for q, a, s in zip(*PAIRS.values())))
    (tmp_path / "empty.jsonl").write_text("")
    import datasets

    datasets.Dataset.from_dict({"query": ["q1", "q2"], "docs": [["a", "b"], ["c"]], "labels": [[1, 0], [1]]}).save_to_disk(
        str(tmp_path / "listwise_hf"))
    return tmp_path


BASE = """
model: {{name_or_path: all-minilm-l6-v2, kind: {kind}}}
output_dir: out/model
datasets:
  - name: pairs
    path: {path}
    columns: {columns}
    label_column: {label}
    loss: {loss}
"""


def cfg(tmp_path, path, loss="{name: MultipleNegativesRankingLoss}", columns="[question, answer]", label="null",
        kind="dense", extra=""):
    return write_config(tmp_path, BASE.format(path=path, loss=loss, columns=columns, label=label, kind=kind) + extra)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_valid_config_and_data(data, fmt):
    c = load_train_config(cfg(data, data / f"pairs.{fmt}", extra="training: {batch_size: 2, max_steps: 5}\n"),
                          ["optimizer.learning_rate=3e-5"])
    assert c.training.batch_size == 2 and c.optimizer.learning_rate == 3e-5
    report = validate_datasets(c)
    assert report[0].rows == 3 and report[0].text_columns == ["question", "answer"]


def test_labels_and_listwise(data):
    c = load_train_config(cfg(data, data / "pairs.parquet", loss="{name: CoSENTLoss}", label="score"))
    assert validate_datasets(c)[0].label_column == "score"
    # A loss that reads labels where given (else makes its own) takes one; so does batching by label.
    c = load_train_config(cfg(data, data / "pairs.parquet", loss="{name: ContrastiveTensionLoss}", label="score"))
    assert validate_datasets(c)[0].label_column == "score"
    # It reads them, so they must be numbers: text labels were dropped, and the loss made its own.
    c = load_train_config(cfg(data, data / "pairs.parquet", loss="{name: ContrastiveTensionLoss}", label="answer",
                              columns="[question, question]"))
    with pytest.raises(DataError, match="label column 'answer' must be numeric"):
        validate_datasets(c)
    c = load_train_config(cfg(data, data / "pairs.parquet", label="score",
                              extra="training: {batch_sampler: group_by_label}\n"))
    assert validate_datasets(c)[0].label_column == "score"
    c = load_train_config(cfg(data, data / "listwise_hf", loss="{name: LambdaLoss}", columns="[query, docs]",
                              label="labels", kind="cross"))
    assert validate_datasets(c)[0].rows == 2


@pytest.mark.parametrize("kwargs,error,match", [
    ({"columns": "[question, answr]"}, DataError, r"column\(s\) \['answr'\] not in .*columns are \['question', 'answer', 'score'\]\. Set the dataset's columns:"),
    ({"loss": "{name: CoSENTLoss}"}, DataError, "CoSENTLoss needs labels; set datasets\\[\\].label_column"),
    ({"loss": "{name: CoSENTLoss}", "label": "answer"}, DataError, "label column 'answer' must be numeric"),
    ({"loss": "{name: TripletLoss}"}, DataError, "TripletLoss takes 3 text column"),
    ({"columns": "[question, score]"}, DataError, "column 'score' must hold strings"),
    # A loss that reads no labels trained every row as a positive pair, those labelled 0 too.
    ({"label": "score"}, DataError, r"label_column 'score' is set, but MultipleNegativesRankingLoss reads no labels: "
                                    r"every row would train as a positive pair, those labelled 0 too; leave "
                                    r"label_column out .* \(CoSENTLoss or ContrastiveLoss\)"),
    ({"label": "score", "kind": "cross"}, DataError, r"\(BinaryCrossEntropyLoss\)"),
    # sentence-transformers takes a column named score as the label by itself: the error says which.
    ({"loss": "{name: CoSENTLoss}", "columns": "null"}, DataError,
     r"CoSENTLoss takes 2 text column\(s\), the dataset gives 3 columns \['question', 'answer', 'score'\]; 'score' "
     r"holds the labels by sentence-transformers' naming: set label_column: score"),
    # Not for a loss that reads no labels (the next check would refuse it).
    ({"loss": "{name: MegaBatchMarginLoss}", "columns": "null"}, DataError,
     r"MegaBatchMarginLoss takes 2 text column\(s\), the dataset gives 3 columns .*; set datasets\[\].columns"),
])
def test_bad_data_is_named(data, kwargs, error, match):
    with pytest.raises(error, match=match):
        validate_datasets(load_train_config(cfg(data, data / "pairs.parquet", **kwargs)))


def test_a_parquet_folder_whose_files_disagree_names_the_file(data):
    """The first file's schema stood for the folder: a later file without a column was a KeyError
    traceback, one with numbers for text a TypeError in the read tasks."""
    for name, later, message in (
        ("missing", {"question": ["q"]}, r"b.parquet: has no column\(s\) \['answer', 'score'\] that .*a.parquet has"),
        ("numbers", {"question": ["q"], "answer": [7], "score": [0.5]},
         r"b.parquet: column 'answer' holds number, .*a.parquet holds text"),
    ):
        folder = data / name
        folder.mkdir()
        pq.write_table(pa.table(PAIRS), folder / "a.parquet")
        pq.write_table(pa.table(later), folder / "b.parquet")
        with pytest.raises(DataError, match=message):
            validate_datasets(load_train_config(cfg(data, folder)))
    same = data / "same"  # large_string and int64 beside string and double: the same kinds
    same.mkdir()
    pq.write_table(pa.table(PAIRS), same / "a.parquet")
    pq.write_table(pa.table({"question": pa.array(["q"], pa.large_string()), "answer": ["a"], "score": [1]}),
                   same / "b.parquet")
    assert validate_datasets(load_train_config(cfg(data, same)))[0].rows == 4


def test_empty_missing_and_null(data):
    with pytest.raises(DataError, match="has no rows"):
        validate_datasets(load_train_config(cfg(data, data / "empty.jsonl")))
    with pytest.raises(DataError, match="does not exist; fix datasets\\[\\].path"):
        validate_datasets(load_train_config(cfg(data, data / "nope.parquet")))
    pq.write_table(pa.table({"question": ["a", None], "answer": ["b", "c"]}), data / "nulls.parquet")
    with pytest.raises(DataError, match="column 'question' has 1 null value"):
        validate_datasets(load_train_config(cfg(data, data / "nulls.parquet")))
    # group_by_label batches rows by label: a null label is refused even when the loss takes none.
    pq.write_table(pa.table({"question": ["a", "b"], "answer": ["b", "c"], "topic": [1, None]}),
                   data / "null_label.parquet")
    grouped = cfg(data, data / "null_label.parquet", label="topic", extra="training: {batch_sampler: group_by_label}\n")
    with pytest.raises(DataError, match="label column 'topic' has null values"):
        validate_datasets(load_train_config(grouped))


def test_bad_config_is_named(data):
    path = data / "pairs.parquet"
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['batchsize'\]"):
        load_train_config(cfg(data, path, extra="training: {batchsize: 2}\n"))
    with pytest.raises(ConfigError, match="training.batch_size must be at least 1"):
        load_train_config(cfg(data, path), ["training.batch_size=0"])
    with pytest.raises(ConfigError, match=r"model.kind: 'dual' is not one of"):
        load_train_config(cfg(data, path, kind="dual"))
    with pytest.raises(ConfigError, match="scaling.strategy: 'zero3' is not one of"):
        load_train_config(cfg(data, path), ["scaling.strategy=zero3"])
    # Values that trained uphill, not at all, or failed only after training (registering).
    refused = {
        "optimizer.max_grad_norm=-1": "optimizer.max_grad_norm must be positive (or null for no clipping), got -1.0",
        "optimizer.max_grad_norm=0": "optimizer.max_grad_norm must be positive",
        "optimizer.weight_decay=-0.5": "optimizer.weight_decay must be 0 or more, got -0.5",
        "optimizer.learning_rate_mapping={'^stack': -1}": "learning_rate_mapping: the rate of '^stack' must be positive",
        "eval.every_n_steps=0": "eval.every_n_steps must be at least 1",
        "checkpoint.every_n_steps=-3": "checkpoint.every_n_steps must be at least 1",
        "model.max_seq_length=0": "model.max_seq_length: input should be greater than or equal to 1",
        "mlflow.register_model_as=team/model": "mlflow.register_model_as 'team/model': use letters, digits",
        f"mlflow.register_model_as={'m' * 201}": "at most 200",
        "mlflow.experiment=' '": "mlflow.experiment: empty",
        "output_dir=''": "output_dir: empty; name the folder",
        "model.kind=cross": "eval.evaluator 'information_retrieval' needs embeddings; a cross-encoder is evaluated by",
    }
    for override, message in refused.items():
        extra = "eval: {path: %s, evaluator: information_retrieval}\n" % path if "kind" in override else ""
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_train_config(cfg(data, path, extra=extra), [override])
    # A cross-encoder takes one prompt string (before each pair's query); per-column ones are refused.
    for override, key in (("datasets.0.prompts={query: 'q: '}", r"datasets\[0\]\.prompts"), ("prompts={a: 'q: '}", "prompts")):
        with pytest.raises(ConfigError, match=rf"yaml\.{key}: a cross-encoder takes one prompt string"):
            load_train_config(cfg(data, path), ["model.kind=cross", override])
    assert load_train_config(cfg(data, path), ["model.kind=cross", "prompts=q: "]).prompts == "q: "


def test_sentence_transformers_names_are_told_their_place(data):
    """A ported config: transformers' training-argument names got the valid keys of their
    section only; a loss's argument one level too high, or a loss given by its name alone, did
    not say what to write."""
    path = data / "pairs.parquet"
    with pytest.raises(ConfigError, match=re.escape(
            "train.yaml: unknown key(s) ['learning_rate', 'num_train_epochs'] (learning_rate is optimizer.learning_rate "
            "here; num_train_epochs is training.epochs here); valid keys are")):
        load_train_config(cfg(data, path, extra="learning_rate: 1.0e-5\nnum_train_epochs: 1\n"))
    with pytest.raises(ConfigError, match=re.escape(
            "train.yaml.training: unknown key(s) ['warmup_ratio'] (warmup_ratio is schedule.warmup_ratio here)")):
        load_train_config(cfg(data, path, extra="training: {warmup_ratio: 0.1}\n"))
    with pytest.raises(ConfigError, match=re.escape(
            "train.yaml.datasets[0].loss: unknown key(s) ['scale'] (scale is args.scale here); valid keys are")):
        load_train_config(cfg(data, path, loss="{name: MultipleNegativesRankingLoss, scale: 20}"))
    with pytest.raises(ConfigError, match=re.escape("loss: unknown key(s) ['inners']; valid keys are")):
        load_train_config(cfg(data, path, loss="{name: MultipleNegativesRankingLoss, inners: {}}"))  # a typo: no args hint
    # A loss by its name alone is {name: ...}.
    assert load_train_config(cfg(data, path, loss="MultipleNegativesRankingLoss")).datasets[0].loss == LossSpec(
        "MultipleNegativesRankingLoss")


def test_a_tracking_store_that_does_not_open_is_refused_before_ray(tmp_path):
    """A bad MLflow URI, an unreachable server, a tag key MLflow refuses: each ended in MLflow's
    traceback after Ray had started. check_store runs before connect (train/run.py)."""
    import socket

    from raytrieve.tracking.mlflow_run import check_store

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    for uri in ("htp://x", closed):
        with pytest.raises(ConfigError, match=rf"job.yaml.mlflow.tracking_uri \(or MLFLOW_TRACKING_URI\) "
                                              rf"{re.escape(uri)}: the tracking store does not open \(\w+"):
            check_store(uri, "exp", {}, "job.yaml")
    store = (tmp_path / "mlruns").as_uri()
    with pytest.raises(ConfigError, match=r"job.yaml.mlflow.tags: 'team\\nname': "):
        check_store(store, "exp", {"team\nname": "x"}, "job.yaml")
    check_store(store, "exp", {"team": "search"}, "job.yaml")  # a store that opens, names it accepts


def _digest(table: pa.Table, cut: list[int] | None = None, untyped: bool = False) -> str:
    """ContentDigest of ``table`` fed in batches ending at the rows ``cut`` names. ``untyped``: a
    batch's column of nulls only has type null, as a JSON reader types it, and an empty batch of
    that type comes first."""
    from raytrieve.data.digest import ContentDigest

    def typed(batch: pa.RecordBatch) -> pa.RecordBatch:
        if not untyped:
            return batch
        columns = [pa.nulls(len(c)) if c.null_count == len(c) else c for c in batch.columns]
        return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)

    digest = ContentDigest(table.column_names)
    if untyped:
        digest.update(typed(pa.RecordBatch.from_pylist([], schema=table.schema)))
    edges = [0, *sorted(set(cut or [])), table.num_rows]
    for start, stop in zip(edges, edges[1:]):
        for batch in table.slice(start, stop - start).to_batches():  # slices: buffers offset into the column's
            digest.update(typed(batch))
    return digest.hexdigest()


def test_the_content_digest_sees_values_not_how_they_are_cut():
    """The resume key of training data: equal values (by Python's ==) give equal digests however
    the rows are cut into batches, or typed (a batch of nulls only as type null, as JSON reads
    it; an empty batch); any other values give another (random tables, nulls, lists)."""
    from hypothesis import given
    from hypothesis import strategies as st

    text = st.one_of(st.none(), st.text(max_size=4))
    row = st.tuples(text, st.one_of(st.none(), st.lists(text, max_size=3)),
                    st.one_of(st.none(), st.integers(-3, 3), st.floats(allow_nan=False)))

    def table(rows):
        return pa.table({"t": pa.array([r[0] for r in rows], pa.string()),
                         "docs": pa.array([r[1] for r in rows], pa.list_(pa.string())),
                         "label": pa.array([None if r[2] is None else float(r[2]) for r in rows], pa.float64())})

    @given(st.lists(row, max_size=8), st.lists(row, max_size=8), st.lists(st.integers(0, 8), max_size=4))
    def check(a, b, cut):
        ta, tb = table(a), table(b)
        assert _digest(ta, [c for c in cut if c <= len(a)]) == _digest(ta)
        assert _digest(ta, [c for c in cut if c <= len(a)], untyped=True) == _digest(ta)
        assert (_digest(ta) == _digest(tb)) == (ta.to_pylist() == tb.to_pylist())

    check()
    # Strings split differently, a null and "", 1 and 1.0 (a label file may hold either).
    assert _digest(pa.table({"d": [["ab", "c"]]})) != _digest(pa.table({"d": [["a", "bc"]]}))
    assert _digest(pa.table({"d": [["a"], ["b", "c"]]})) != _digest(pa.table({"d": [["a", "b"], ["c"]]}))
    assert _digest(pa.table({"t": [None]}, schema=pa.schema([("t", pa.string())]))) != _digest(pa.table({"t": [""]}))
    assert _digest(pa.table({"s": pa.array([1, 0], pa.int64())})) == _digest(pa.table({"s": [1.0, -0.0]}))
    # Empty lists whose items a reader typed as null (nothing said otherwise) are empty lists of text.
    assert _digest(pa.table({"d": [[], []]})) == _digest(pa.table({"d": pa.array([[], []], pa.list_(pa.string()))}))


def test_the_same_data_in_any_file_layout_has_one_digest(data):
    """What training reads, not how it is stored: the pairs as parquet, jsonl, csv, a folder of
    two parquet files with one-row row groups, and as an HF dataset give one digest; a changed
    character, or two rows swapped, another."""
    import datasets

    def digest(path, **kwargs):
        if "label" in kwargs:  # a loss that reads the labels
            kwargs["loss"] = "{name: CoSENTLoss}"
        return validate_datasets(load_train_config(cfg(data, path, **kwargs)))[0].digest

    folder = data / "split"
    folder.mkdir()
    pq.write_table(pa.table(PAIRS).slice(0, 2), folder / "a.parquet", row_group_size=1, compression="zstd")
    pq.write_table(pa.table(PAIRS).slice(2), folder / "b.parquet")
    datasets.Dataset.from_dict(PAIRS).save_to_disk(str(data / "pairs_hf"))
    same = {name: digest(data / name, label="score") for name in (
        "pairs.parquet", "pairs.jsonl", "pairs.csv", "split", "pairs_hf")}
    assert len(set(same.values())) == 1, same
    changed = {**PAIRS, "answer": ["sorted(xs)", "Paris is the capital", "nine minutes in water!"]}
    pq.write_table(pa.table(changed), data / "changed.parquet")
    swapped = {k: [v[1], v[0], v[2]] for k, v in PAIRS.items()}
    pq.write_table(pa.table(swapped), data / "swapped.parquet")
    others = {digest(data / "changed.parquet", label="score"), digest(data / "swapped.parquet", label="score"),
              digest(data / "pairs.parquet")}  # no label column read: another digest of other values
    assert len(others | set(same.values())) == 4


def test_the_digest_takes_every_label_type_training_accepted():
    """A review found label columns that validation accepts but the digest's float cast refused
    (ids past 2**53, dates): they crashed the run. Such ids stay distinct, and dates hash."""
    import datetime

    big = 2**53 + 1
    assert _digest(pa.table({"l": pa.array([big], pa.int64())})) != _digest(pa.table({"l": pa.array([big + 1])}))
    assert _digest(pa.table({"l": pa.array([big], pa.uint64())})) == _digest(pa.table({"l": pa.array([big])}))
    day = pa.table({"d": [datetime.date(2026, 1, 1), None]})
    assert _digest(day) == _digest(day, [1]) != _digest(pa.table({"d": [datetime.date(2026, 1, 2), None]}))
    assert _digest(pa.table({"s": pa.array(["ab"], pa.string_view())})) == _digest(pa.table({"s": ["ab"]}))
