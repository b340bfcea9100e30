"""Training streams its data from the files on the workers, and data parallelism is exact:
2 workers (batch 4 each, one Ray node or two) end with the same weights as 1 worker with
batch 8, because both train on exactly the same planned global batches (the gather makes 2
ranks' MNRL the loss of the whole batch). Dropout is off so the runs are deterministic.

The two-node case starts a second Ray node on this host (the ``second_node`` fixture:
``cluster/local.sh join`` with its own temp dir, ports and a ``node2`` resource) joining the
session's cluster; STRICT_SPREAD puts one worker on each node."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raytrieve.train.run import run_training
from tests.conftest import SENTENCES, register_model
from tests.train_helpers import shipped_config, write_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def no_dropout_model(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoTokenizer, BertModel

    from raytrieve import DenseEncoder
    from raytrieve.modules import Pooling, Transformer

    root = tmp_path_factory.mktemp("no_dropout")
    bert = BertModel.from_pretrained(tiny_dirs["base"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    bert.save_pretrained(root / "base")
    AutoTokenizer.from_pretrained(tiny_dirs["base"]).save_pretrained(root / "base")
    DenseEncoder([Transformer.from_pretrained(root / "base", max_seq_length=24), Pooling(32, "mean")],
                 device="cpu").save(root / "dense")
    return {"dense": root / "dense"}


def _run(name, tmp_path, models, data, **changes):
    from raytrieve.encoders import load_encoder

    cfg = shipped_config("dense_mnrl", tmp_path / name, models, data, eval={}, optimizer__learning_rate=1e-3,
                         **changes)
    result = run_training(cfg)
    return result, load_encoder("dense", cfg.output_dir).state_dict()


@pytest.fixture(scope="module")
def one_worker(ray_cluster, no_dropout_model, data, tmp_path_factory):
    """The reference: 1 worker, global batch 8."""
    return _run("one", tmp_path_factory.mktemp("one"), no_dropout_model, data, training__batch_size=8)


def _assert_same_weights(got, want, start):
    moved = max(float((want[k] - start[k]).abs().max()) for k in want)
    assert moved > 1e-3  # training changed the weights: equality below is not trivial
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=2e-5, rtol=1e-4, msg=key)


def _start(model_dir):
    from raytrieve.encoders import load_encoder

    return load_encoder("dense", str(model_dir)).state_dict()


@pytest.mark.timeout(600)
def test_two_workers_train_on_exactly_the_planned_batches(one_worker, no_dropout_model, data, s3_store, tmp_path):
    """The data in an object store here, as a folder of two files, and one file on disk in the
    reference: the driver checks it there and the workers' read tasks open each file by its URI
    (tests/object_store.py's S3 server, named by the folder's URI alone: keys, endpoint and region
    carry over to its files; the workers' environment has no AWS_* variables)."""
    import pyarrow.parquet as pq

    reference, want = one_worker
    table = pq.read_table(data["train"])
    (tmp_path / "folder").mkdir()
    pq.write_table(table.slice(0, 10), tmp_path / "folder" / "part-0.parquet")
    pq.write_table(table.slice(10), tmp_path / "folder" / "part-1.parquet")
    s3_store.put(tmp_path / "folder", f"train/{tmp_path.name}")
    in_bucket = {**data, "train": s3_store.uri(f"train/{tmp_path.name}")}
    result, got = _run("two", tmp_path, no_dropout_model, in_bucket, scaling__num_workers=2)
    assert result.steps == reference.steps == 24 // 8 and result.dropped == []
    _assert_same_weights(got, want, _start(no_dropout_model["dense"]))


@pytest.mark.timeout(900)
def test_one_worker_on_each_of_two_nodes(one_worker, second_node, no_dropout_model, data, registry, s3_store,
                                         tmp_path, monkeypatch):
    """From a registered copy of the model: the driver downloads it into its cache, and the
    worker on the second node (a cache of its own) gets it through Ray's object store. The
    trained model and the checkpoints go to an object store (tests/object_store.py's S3 server),
    which every node reaches, whichever node rank 0 runs on."""
    import pyarrow.fs as pafs

    from tests.object_store import BUCKET, KEY, SECRET

    reference, want = one_worker
    registered = register_model(registry, no_dropout_model["dense"], "no-dropout")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    monkeypatch.setenv("RAYTRIEVE_CACHE", str(registry["cache"]))
    trained = s3_store.uri(f"trained/{tmp_path.name}/dense_mnrl")
    result, got = _run("nodes", tmp_path, {"dense": registered}, data, scaling__num_workers=2,
                       scaling__placement_strategy="STRICT_SPREAD", output_dir=trained)
    # The result, and the run's stamp that records it, name the model without the URI's keys.
    assert result.output_dir == trained.replace(f"{KEY}:{SECRET}@", "") and SECRET in trained
    assert not (tmp_path / "nodes" / "out" / "dense_mnrl").exists()
    folder = f"{BUCKET}/trained/{tmp_path.name}"
    stored = {i.path.removeprefix(f"{folder}/")
              for i in s3_store.fs.get_file_info(pafs.FileSelector(folder, recursive=True))}
    assert "dense_mnrl/modules.json" in stored and "dense_mnrl/.incomplete" not in stored
    assert any(name.startswith("dense_mnrl.checkpoints/") for name in stored)  # beside it, the URI's query kept
    with s3_store.fs.open_input_stream(f"{folder}/dense_mnrl.checkpoints/raytrieve-run.json") as f:
        stamp = f.read().decode()
    assert '"finished"' in stamp and SECRET not in stamp
    assert result.steps == reference.steps
    copies = list((second_node.cache / "shipped").iterdir())  # unpacked once on the second node
    assert len(copies) == 1 and (copies[0] / "modules.json").is_file()
    _assert_same_weights(got, want, _start(no_dropout_model["dense"]))
    # Ray marks each worker process's log with what it ran: a train worker ran on the second
    # node (STRICT_SPREAD put the other worker on the head). Where Ray Data's read tasks run is
    # the scheduler's choice (seen on either node), so it is not asserted.
    ran = "".join(f.read_text(errors="replace") for f in second_node.temp_dir.glob("session_*/logs/worker-*.out"))
    assert ":actor_name:RayTrainWorker" in ran
    # The trained model still encodes (sanity of the saved weights).
    from raytrieve.encoders import load_encoder

    assert load_encoder("dense", trained).encode(SENTENCES[:2]).shape == (2, 32)
