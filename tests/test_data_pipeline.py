"""The Ray Data stage on a real local Ray: each rank reads its planned rows from the dataset
file on the workers, and every micro-batch comes out, in plan order, tokenized and padded
exactly as the encoder's own ``tokenize`` of those rows' texts (prompts per column, Router
routes), with its labels."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytrieve import DenseEncoder
from raytrieve.data.pipeline import (
    DatasetStream, StreamSpec, decode_features, decode_labels, decode_texts, micro_batches, rank_epoch_dataset,
)
from raytrieve.data.train_source import list_pieces
from raytrieve.modules import Pooling, Transformer
from raytrieve.train.config import TrainingConfig
from raytrieve.train.plan import DatasetKeys, plan_training
from tests.conftest import SENTENCES


def _stream(plan, pieces, spec, rank, epoch=0):
    """Every micro-batch of ``rank`` in ``epoch``, as the train loop cuts them."""
    lookups = []
    for d in range(len(pieces)):
        ms = np.nonzero((plan.epoch == epoch) & (plan.dataset == d))[0]
        rows, keys = plan.rank_stream(rank, ms)
        order = np.argsort(rows)
        lookups.append((rows[order].astype(np.int64), keys[order]) if len(ms) else None)
    ds = rank_epoch_dataset(pieces, lookups, spec)
    ms = np.nonzero(plan.epoch == epoch)[0]
    return list(micro_batches(ds.iter_batches(batch_size=3, batch_format="pyarrow"),
                              [(int(m), int(plan.rank_sizes[m])) for m in ms]))


def _same(got, want):
    assert got.keys() == want.keys()
    for key, value in want.items():
        g = got[key]
        assert (g.tolist() if hasattr(g, "tolist") else g) == (value.tolist() if hasattr(value, "tolist") else value), key


@pytest.mark.timeout(300)
def test_each_rank_streams_exactly_its_planned_rows(ray_cluster, tiny_dirs, tmp_path, monkeypatch):
    from raytrieve.data import train_source

    monkeypatch.setattr(train_source, "PIECE_ROWS", 4)  # one piece per row group
    t = Transformer.from_pretrained(tiny_dirs["base"], max_seq_length=16)
    model = DenseEncoder([t, Pooling(32, "mean", include_prompt=False)], device="cpu")
    model.save(tmp_path / "model")
    n = len(SENTENCES)
    columns = {"q": SENTENCES, "d": SENTENCES[::-1], "score": [float(i) for i in range(n)]}
    # Small row groups: several pieces, read by several tasks.
    pq.write_table(pa.table(columns), tmp_path / "data.parquet", row_group_size=4)
    schema, pieces = list_pieces(tmp_path / "data.parquet", "parquet")
    assert len(pieces) == 4 and [p.first_row for p in pieces] == [0, 4, 8, 12]
    plan = plan_training([DatasetKeys("a", n)], TrainingConfig(batch_size=3, batch_sampler="default", seed=3), 2)
    spec = StreamSpec(str(tmp_path / "model"), "dense",
                      [DatasetStream(["q", "d"], "score", ["query: ", None], None, "float")])
    seen = []
    for rank in range(2):
        out = _stream(plan, [pieces], spec, rank)
        assert [m for m, _ in out] == list(range(plan.micro_batches))  # plan order kept
        for m, batch in out:
            rows = plan.rank_rows(rank, m).tolist()
            seen += rows
            q, d = decode_features(batch, spec.datasets[0], [model.input_module(), model.input_module()])
            _same(q, model.tokenize([columns["q"][i] for i in rows], prompt="query: "))
            _same(d, model.tokenize([columns["d"][i] for i in rows]))
            labels = decode_labels(batch, "float")
            assert labels.dtype.is_floating_point and labels.tolist() == [float(i) for i in rows]
    assert len(seen) == 14 and sorted(seen) == sorted(plan.rows.tolist())  # both ranks: every planned row once


@pytest.mark.timeout(300)
def test_cross_rows_stay_text_and_listwise_labels_stay_ragged(ray_cluster, tmp_path):
    table = pa.table({"query": ["q0", "q1", "q2", "q3"], "docs": [["a", "b"], ["c"], ["d", "e", "f"], ["g"]],
                      "labels": [[1.0, 0.0], [1.0], [0.0, 0.5, 1.0], [0.0]]})
    pq.write_table(table, tmp_path / "listwise.parquet")
    _, pieces = list_pieces(tmp_path / "listwise.parquet", "parquet")
    plan = plan_training([DatasetKeys("l", 4)], TrainingConfig(batch_size=2, batch_sampler="default"), 1)
    spec = StreamSpec("unused", "cross", [DatasetStream(["query", "docs"], "labels", [None, None], None,
                                                        "listwise", (False, True))])
    for m, batch in _stream(plan, [pieces], spec, 0):
        rows = plan.rank_rows(0, m).tolist()
        queries, docs = decode_texts(batch, spec.datasets[0])
        assert queries == [f"q{i}" for i in rows] and docs == [table["docs"][i].as_py() for i in rows]
        labels = decode_labels(batch, "listwise")
        assert [x.tolist() for x in labels] == [table["labels"][i].as_py() for i in rows]


@pytest.mark.timeout(300)
def test_batch_stage_applies_max_seq_length(ray_cluster, tiny_dirs, tmp_path):
    t = Transformer.from_pretrained(tiny_dirs["base"], max_seq_length=64)
    model = DenseEncoder([t, Pooling(32, "mean")], device="cpu")
    model.save(tmp_path / "model")
    pq.write_table(pa.table({"q": [" ".join(["word"] * 200), "short"]}), tmp_path / "long.parquet")
    _, pieces = list_pieces(tmp_path / "long.parquet", "parquet")
    plan = plan_training([DatasetKeys("a", 2)], TrainingConfig(batch_size=2, batch_sampler="default"), 1)
    spec = StreamSpec(str(tmp_path / "model"), "dense", [DatasetStream(["q"], None, [None], None)], max_seq_length=16)
    ((_, batch),) = _stream(plan, [pieces], spec, 0)
    (q,) = decode_features(batch, spec.datasets[0], [model.input_module()])
    assert q["input_ids"].shape == (2, 16)


def test_a_stream_missing_rows_is_an_error():
    from raytrieve.data.pipeline import StreamError

    good = pa.table({"seq": pa.array([0, 1, (1 << 24)], pa.int64())})
    assert [m for m, _ in micro_batches([good], [(0, 2), (1, 1)])] == [0, 1]
    with pytest.raises(StreamError, match="micro-batch 0"):
        list(micro_batches([pa.table({"seq": pa.array([1, 0], pa.int64())})], [(0, 2)]))
    with pytest.raises(StreamError, match="ended early"):
        list(micro_batches([good], [(0, 2), (1, 1), (2, 1)]))
