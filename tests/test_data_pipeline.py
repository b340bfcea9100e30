"""The Ray Data tokenization stage on a real local Ray: ids equal the encoder's own
tokenization, prompts per column, labels passed through, collation pads per column."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytrieve import DenseEncoder
from raytrieve.data.pipeline import collate, tokenized_dataset
from raytrieve.losses.registry import LossSpec
from raytrieve.modules import Pooling, Transformer
from raytrieve.train.config import DatasetConfig
from tests.conftest import SENTENCES


@pytest.mark.timeout(300)
def test_tokenize_stage_matches_the_encoder(ray_cluster, tiny_dirs, tmp_path):
    t = Transformer.from_pretrained(tiny_dirs["base"], max_seq_length=16)
    model = DenseEncoder([t, Pooling(32, "mean", include_prompt=False)], device="cpu")
    model.save(tmp_path / "model")
    n = len(SENTENCES)
    pq.write_table(pa.table({"q": SENTENCES, "d": SENTENCES[::-1], "score": [float(i) for i in range(n)]}),
                   tmp_path / "train.parquet")
    d = DatasetConfig(name="x", path=str(tmp_path / "train.parquet"), loss=LossSpec("CoSENTLoss"),
                      columns=["q", "d"], label_column="score", prompts={"q": "query: "})
    rows = tokenized_dataset(d, "parquet", str(tmp_path / "model"), "dense", batch_size=4).take_all()
    assert len(rows) == n
    rows.sort(key=lambda r: r["label"])
    want_q = model.input_module().tokenize_ids(SENTENCES, prompt="query: ")["input_ids"]
    want_d = model.input_module().tokenize_ids(SENTENCES[::-1])["input_ids"]
    assert [list(r["q.input_ids"]) for r in rows] == want_q
    assert [list(r["d.input_ids"]) for r in rows] == want_d
    assert all(r["q.prompt_length"] == model.input_module().prompt_length("query: ") for r in rows)
    assert "d.prompt_length" not in rows[0]

    batch = {k: [r[k] for r in rows[:4]] for k in rows[0]}
    features = collate(batch, ["q", "d"])
    direct = model.tokenize(SENTENCES[:4], prompt="query: ")
    assert features[0]["input_ids"].tolist() == direct["input_ids"].tolist()
    assert features[0]["attention_mask"].tolist() == direct["attention_mask"].tolist()
    assert features[0]["prompt_length"] == direct["prompt_length"]
