"""The Ray Data batch stage on a real local Ray: each planned micro-batch comes out
tokenized and padded exactly as the encoder's own ``tokenize`` (prompts per column, Router
routes), in step order, with its labels."""

from __future__ import annotations

import json

import pytest

from raytrieve import DenseEncoder
from raytrieve.data.pipeline import decode_features, decode_labels, micro_batch_rows, rank_dataset
from raytrieve.modules import Pooling, Transformer
from raytrieve.train.plan import MicroBatch
from tests.conftest import SENTENCES


@pytest.mark.timeout(300)
def test_batch_stage_matches_the_encoder(ray_cluster, tiny_dirs, tmp_path):
    t = Transformer.from_pretrained(tiny_dirs["base"], max_seq_length=16)
    model = DenseEncoder([t, Pooling(32, "mean", include_prompt=False)], device="cpu")
    model.save(tmp_path / "model")
    n = len(SENTENCES)
    columns = {"q": SENTENCES, "d": SENTENCES[::-1], "score": [float(i) for i in range(n)]}
    plan = [MicroBatch(0, 0, list(range(i, min(i + 3, n)))) for i in range(0, n, 3)][::-1]  # any order
    rows = micro_batch_rows(plan, [columns], [["q", "d"]], ["score"])
    ds = rank_dataset(rows, str(tmp_path / "model"), "dense", prompts=[["query: ", None]], routes=[[None, None]],
                      rows_per_call=2)
    out = list(ds.iter_rows())
    assert [r["step"] for r in out] == list(range(len(plan)))  # step order kept
    for r, mb in zip(out, plan):
        q, d = decode_features(r["features"], 2, None)
        want_q = model.tokenize([SENTENCES[i] for i in mb.rows], prompt="query: ")
        want_d = model.tokenize([columns["d"][i] for i in mb.rows])
        for got, want in ((q, want_q), (d, want_d)):
            assert got.keys() == want.keys()
            for key in want:
                value = want[key]
                assert (got[key].tolist() if hasattr(got[key], "tolist") else got[key]) == (
                    value.tolist() if hasattr(value, "tolist") else value), key
        labels = decode_labels(json.loads(r["payload"])["labels"], listwise=False)
        assert labels.tolist() == [float(i) for i in mb.rows]


def test_listwise_labels_stay_ragged():
    labels = decode_labels([[1.0, 0.0], [0.0, 0.5, 1.0]], listwise=True)
    assert [x.tolist() for x in labels] == [[1.0, 0.0], [0.0, 0.5, 1.0]]


@pytest.mark.timeout(300)
def test_batch_stage_applies_max_seq_length(ray_cluster, tiny_dirs, tmp_path):
    t = Transformer.from_pretrained(tiny_dirs["base"], max_seq_length=64)
    DenseEncoder([t, Pooling(32, "mean")], device="cpu").save(tmp_path / "model")
    long_text = " ".join(["word"] * 200)
    rows = micro_batch_rows([MicroBatch(0, 0, [0, 1])], [{"q": [long_text, "short"]}], [["q"]], [None])
    out = list(rank_dataset(rows, str(tmp_path / "model"), "dense", [[None]], [[None]],
                            max_seq_length=16).iter_rows())
    (q,) = decode_features(out[0]["features"], 1, None)
    assert q["input_ids"].shape == (2, 16)
