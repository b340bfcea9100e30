"""Bad configs and bad data fail in the driver's checks, before any Ray work, with the
problem named; the batch plan gives every rank the same number of steps."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytrieve.errors import ConfigError, DataError
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
    with pytest.raises(ConfigError, match="unknown dense loss 'MultipleNegativeRankingLoss'"):
        prepare(cfg)


def test_wrong_label_type(tiny_models, data, tmp_path):
    cfg = shipped_config("cross_bce", tmp_path, tiny_models, data)
    t = pq.read_table(data["labeled"])
    pq.write_table(t.set_column(2, "label", pa.array(["yes"] * t.num_rows)), tmp_path / "bad.parquet")
    cfg.datasets[0].path = str(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="label column 'label' must be numeric"):
        prepare(cfg)


def test_bad_loss_argument_is_caught_against_the_model(tiny_models, data, tmp_path):
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data)
    cfg.datasets[0].loss.args = {"scael": 20}
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) \['scael'\]"):
        prepare(cfg)


def test_cached_loss_with_fsdp_is_refused(tiny_models, data, tmp_path):
    cfg = shipped_config("dense_cached_mnrl_matryoshka", tmp_path, tiny_models, data, scaling__strategy="fsdp")
    with pytest.raises(ConfigError, match="strategy: ddp"):
        prepare(cfg)


def test_plan_is_equal_across_ranks_and_reports_what_it_leaves_out(tiny_models, data, tmp_path):
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, scaling__num_workers=3)
    p = prepare(cfg)
    assert len({len(r) for r in p.plan.per_rank}) == 1
    assert all(len({len(mb.rows) for mb in r}) <= 2 for r in p.plan.per_rank)
    # 24 rows, global batches of 12: nothing left out; batches share rows equally per rank.
    for step in zip(*p.plan.per_rank):
        assert len({len(mb.rows) for mb in step}) == 1
        texts = [t for mb in step for i in mb.rows for t in (p.columns[0]["query"][i], p.columns[0]["document"][i])]
        assert len(texts) == len(set(texts))  # no duplicates across the ranks of one global batch
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, scaling__num_workers=5)
    p = prepare(cfg)
    assert p.plan.dropped and "multiple of 5 workers" in p.plan.dropped[0]


def test_prompts_run_wide_and_per_dataset(tiny_models, data, tmp_path):
    datasets = [
        {"name": "a", "path": str(data["train"]), "columns": ["query", "document"],
         "loss": {"name": "MultipleNegativesRankingLoss"}},
        {"name": "b", "path": str(data["train"]), "columns": ["query", "document"],
         "loss": {"name": "MultipleNegativesRankingLoss"}, "prompts": "passage: "},
    ]
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, datasets=datasets,
                         prompts={"query": "query: ", "title": "unused: "})
    p = prepare(cfg)
    assert p.prompts == [["query: ", None], ["passage: ", "passage: "]]
