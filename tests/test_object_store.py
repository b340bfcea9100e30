"""Inputs in an object store: the encoding corpus, training datasets, the eval set and mining's
pairs named by ``s3://`` URIs read the same rows as the same files on disk.

The store is moto's S3 server (tests/object_store.py), a separate HTTP server that speaks S3's
REST API, started on 127.0.0.1 (nothing leaves the machine); raytrieve reaches it through
pyarrow's own S3 client, exactly as it reaches AWS (only ``AWS_ENDPOINT_URL`` points
elsewhere). ``file://`` URIs alone would not show this: pyarrow answers them with its local
filesystem, so code that only works on local files (memory maps, ``Path.stat``) passes there.
tests/test_encode_job.py runs an encoding job on Ray whose workers read and write the bucket.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raytrieve.data.sources import open_source, plan_shards, read_shard
from raytrieve.data.train_source import read_piece
from raytrieve.errors import DataError
from raytrieve.train.run import prepare
from tests.object_store import BUCKET, KEY, SECRET
from tests.train_helpers import shipped_config, write_data


@pytest.fixture(scope="module")
def s3(s3_store):
    """The session's S3 server, and the AWS_* variables that name it (as a user's environment
    would); tests that name it by the URI alone use ``s3_store.uri``."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", f"http://{s3_store.endpoint}")
        env.setenv("AWS_ACCESS_KEY_ID", KEY)
        env.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield s3_store


def _corpus_rows(n: int) -> dict[str, list]:
    # Commas, quotes and non-ASCII, so byte ranges cut lines at odd places.
    return {"id": [f"doc-{i}" for i in range(n)], "text": [f"text {i}, " + "ünï \"q\" " * (i % 7) for i in range(n)]}


def _shards(location: str, rows_per_shard: int) -> tuple[list[dict], list]:
    specs = plan_shards(open_source(location), rows_per_shard)
    return [r for s in specs for r in read_shard(s, ["id", "text"]).select(["id", "text"]).to_pylist()], specs


def test_the_encoding_corpus_reads_from_s3_shard_by_shard_as_from_disk(s3, tmp_path):
    put = s3.put
    folder = tmp_path / "parts"
    folder.mkdir()
    table = pa.table(_corpus_rows(42))
    for f, (offset, n) in enumerate([(0, 23), (23, 4), (27, 15)]):
        pq.write_table(table.slice(offset, n), folder / f"part-{f}.parquet", row_group_size=5)
    (folder / "_SUCCESS").write_text("")
    pcsv.write_csv(table, tmp_path / "c.csv")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    import datasets

    datasets.Dataset(table).save_to_disk(str(tmp_path / "hf"))
    expected = table.to_pylist()
    for local, key, rows_per_shard in [(folder, "corpus/parts", 4), (tmp_path / "c.csv", "corpus/c.csv", 3),
                                       (tmp_path / "c.jsonl", "corpus/c.jsonl", 5), (tmp_path / "hf", "corpus/hf", 10)]:
        uri = put(local, key)
        rows, specs = _shards(uri, rows_per_shard)
        assert rows == expected == _shards(str(local), rows_per_shard)[0], key
        assert len(specs) >= 42 // (rows_per_shard + 3) and all(s.path.startswith(f"{uri}") for s in specs), key
    rows, _ = _shards(f"s3://{BUCKET}/corpus/parts/part-*.parquet", 7)  # a glob over the bucket's keys
    assert rows == expected
    with pytest.raises(DataError, match=rf"s3://{BUCKET}/corpus/nowhere.parquet: file not found"):
        open_source(f"s3://{BUCKET}/corpus/nowhere.parquet")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


def test_training_datasets_and_the_eval_set_read_from_s3_as_from_disk(s3, tiny_models, data, tmp_path):
    """The driver plans and digests a dataset in the bucket as it does the local copy, and every
    piece opens again from its own URI, as a worker opens it."""
    import datasets

    put = s3.put
    table = pq.read_table(data["train"])
    (tmp_path / "folder").mkdir()
    pq.write_table(table.slice(0, 10), tmp_path / "folder" / "a.parquet", row_group_size=4)
    pq.write_table(table.slice(10), tmp_path / "folder" / "b.parquet")
    pcsv.write_csv(table, tmp_path / "train.csv")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    datasets.Dataset(table).save_to_disk(str(tmp_path / "hf"))
    local = prepare(shipped_config("dense_mnrl", tmp_path, tiny_models, data))
    columns = ["query", "document"]
    for name, pieces in [("folder", 2), ("train.csv", 1), ("train.jsonl", 1), ("hf", 1)]:
        cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data)
        cfg.datasets[0].path = put(tmp_path / name, f"train/{name}")
        p = prepare(cfg, "job.yaml")
        assert p.digests == local.digests and p.rows == local.rows == [table.num_rows], name
        assert p.plan.rows.tolist() == local.plan.rows.tolist(), name
        assert len(p.pieces[0]) == pieces and all(x.path.startswith("s3://") for x in p.pieces[0]), name
        got = [r for piece in p.pieces[0] for r in read_piece(piece, columns).to_pylist()]
        assert got == table.select(columns).to_pylist(), name
    cfg.datasets[0].path = f"s3://{BUCKET}/train/missing.parquet"
    with pytest.raises(DataError, match=rf"job.yaml.datasets\[0\] \(pydocs\): s3://{BUCKET}/train/missing.parquet "
                                        r"does not exist; fix datasets\[\].path"):
        prepare(cfg, "job.yaml")

    # The eval set, read whole on the driver: a parquet file, and a saved HF dataset (which
    # datasets.load_from_disk would open only with an fsspec package for s3).
    test = pq.read_table(data["test"])
    datasets.Dataset(test).save_to_disk(str(tmp_path / "test_hf"))
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data)
    for uri in (put(data["test"], "eval/test.parquet"), put(tmp_path / "test_hf", "eval/test_hf")):
        cfg.eval.path = uri
        assert prepare(cfg, "job.yaml").spec.eval_columns == local.spec.eval_columns, uri
    assert len(local.spec.eval_columns["query"]) == test.num_rows


def test_minings_pairs_read_from_s3_as_from_disk(s3, tmp_path):
    from raytrieve.config import from_dict
    from raytrieve.inference.config import MineConfig
    from raytrieve.inference.mine import read_pairs

    put = s3.put
    table = pa.table({"query": [f"q{i % 5}" for i in range(20)], "positive": [f"doc {i}, ünï" for i in range(20)]})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))

    def pairs(path: str) -> tuple:
        return read_pairs(from_dict(MineConfig, {"pairs": {"path": path}, "retriever": {"model": "all-minilm-l6-v2"},
                                                 "output_path": str(tmp_path / "mined.parquet")}))

    local = pairs(str(tmp_path / "pairs.jsonl"))
    assert pairs(put(tmp_path / "pairs.jsonl", "mine/pairs.jsonl")) == local and len(local[0]) == 20


def test_an_encoding_jobs_output_in_s3_builds_the_same_indices(s3, tmp_path, monkeypatch):
    """The encoding job writes its shards to an object store with one put each (no rename
    there); `raytrieve index build` reads them, and the documents from the corpus, from the
    bucket. Oracle: the same job on disk, built the same way (tests/test_index_build.py's job).
    An index folder in the bucket serves as the folder on disk (Serve's ``Documents``: each
    node's copy, downloaded once per content)."""
    from raytrieve.index.build import build_indices, load_indices, local_index
    from raytrieve.serve.deployments import Documents
    from raytrieve.index.documents import DocumentStore
    from raytrieve.inference import shards
    from tests.test_index_build import _job

    put = s3.put
    local = shards.OutputStore(str(_job(tmp_path)))
    bucket = shards.OutputStore(f"s3://{BUCKET}/job")
    assert not bucket.renames and local.renames
    corpus = put(tmp_path / "vectors-corpus", "job-corpus")
    for name in local.names():  # written as the job's encoders and driver write them there
        if name == shards.MANIFEST:
            manifest = local.read_json(name)
            bucket.write_json(name, {**manifest, "corpus": {**manifest["corpus"], "path": corpus}})
        else:
            bucket.write_bytes(name, local.read_bytes(name))
    assert bucket.names() == local.names() and bucket.read_bytes("part-00002.parquet") == local.read_bytes(
        "part-00002.parquet")

    want = build_indices(local.location, tmp_path / "from-disk")
    got = build_indices(bucket.location, tmp_path / "from-s3")
    assert got["rows"] == want["rows"] > 0
    a, b = load_indices(tmp_path / "from-disk"), load_indices(tmp_path / "from-s3")
    assert a.dense is not None and b.dense is not None and a.sparse is not None and b.sparse is not None
    assert b.dense.ids == a.dense.ids and (b.dense.vectors == a.dense.vectors).all()
    assert all((getattr(b.sparse, n) == getattr(a.sparse, n)).all() for n in ("term_ptr", "doc_rows", "weights"))
    rows = range(want["rows"])
    assert DocumentStore(tmp_path / "from-s3", len(rows)).texts(rows) == DocumentStore(
        tmp_path / "from-disk", len(rows)).texts(rows)

    monkeypatch.setenv("RAYTRIEVE_CACHE", str(tmp_path / "cache"))
    index = put(tmp_path / "from-disk", "index")
    assert local_index(index).is_relative_to(tmp_path / "cache") and local_index(index) == local_index(index)
    on_disk, in_bucket = Documents([str(tmp_path / "from-disk")]), Documents([index])
    terms = np.flatnonzero(np.diff(a.sparse.term_ptr))[:3]  # terms some documents hold
    sparse_query = {"indices": terms.tolist(), "values": [1.0, 0.5, 2.0][: len(terms)]}
    for kind, vector in (("dense", a.dense.vectors[3]), ("sparse", sparse_query)):
        got = in_bucket.search_with_texts(index, kind, vector, 5, 5)
        assert got == on_disk.search_with_texts(str(tmp_path / "from-disk"), kind, vector, 5, 5) and got[0], kind
    # `index build --out` a folder URI: built on disk, then put file by file; what was there is
    # replaced whole (an earlier index), a folder of other files refused before any work.
    built = build_indices(local.location, f"s3://{BUCKET}/built")
    assert built["out"] == f"s3://{BUCKET}/built" and built["rows"] == want["rows"]
    copy = load_indices(local_index(f"s3://{BUCKET}/built"))
    assert copy.dense is not None and (copy.dense.vectors == a.dense.vectors).all() and copy.dense.ids == a.dense.ids
    (tmp_path / "x.txt").write_text("someone else's file")
    put(tmp_path / "x.txt", "not-index/x.txt")
    mine = tmp_path / "mine"  # a file:// URI is a local folder, with local disk's checks
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match=r"--out .*mine: the folder holds other files \(keep.txt\)"):
        build_indices(local.location, mine.as_uri())
    assert (mine / "keep.txt").read_text() == "mine"
    with pytest.raises(DataError, match=r"^--out s3://raytrieve-test/not-index: the folder holds other files \(x.txt\)"):
        build_indices(local.location, f"s3://{BUCKET}/not-index")
    (tmp_path / "from-disk" / "source.json").rename(tmp_path / "source.json")
    with pytest.raises(DataError, match=r"index s3://.*/not-an-index: no source.json at its top; point at a folder `raytrieve index build` wrote"):
        local_index(put(tmp_path / "from-disk", "not-an-index"))

    bucket.delete("part-00002.parquet")
    with pytest.raises(DataError, match=rf"s3://{BUCKET}/job/part-00002.parquet: shard listed in the manifest is "
                                        r"missing; run the encoding job again"):
        build_indices(bucket.location, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_a_serve_apps_index_and_model_uris_are_pinned_to_the_content_its_start_checked(s3, tiny_models, tmp_path,
                                                                                     monkeypatch):
    """Index and model folder URIs are read by each replica when it starts, maybe long after the
    app was deployed: the app pins each URI to the content its start checked
    (``check_before_start``'s pins, passed to every replica). A replica starting after a folder
    was written again at its URI serves the pinned copy where its machine has it, and is
    refused, naming the fix, where not; pinned anew (deployed again), it reads the new content.
    Replicas' loads are ``Documents`` and ``load_model`` here, as the deployments call them (no Ray)."""
    import time

    import torch

    from raytrieve.config import from_dict
    from raytrieve.encoders import load_encoder
    from raytrieve.errors import ModelLoadError
    from raytrieve.index.build import build_indices, index_pin, load_indices, local_index
    from raytrieve.serve.app import _local_runners, store_pins
    from raytrieve.serve.config import ServeConfig
    from raytrieve.serve.deployments import Documents, load_model
    from tests.conftest import SENTENCES
    from tests.test_index_build import _job

    vectors = _job(tmp_path)
    build_indices(vectors, tmp_path / "both")
    build_indices(vectors, tmp_path / "dense-only", kinds=("dense",))
    key, model_key = f"pinned/{tmp_path.name}", f"pinned-model/{tmp_path.name}"
    s3.put(tmp_path / "both", key)
    s3.put(tiny_models["dense"], model_key)
    index, model = s3.uri(key), s3.uri(model_key)  # the keys in the URIs: no message may show them
    monkeypatch.setenv("RAYTRIEVE_CACHE", str(tmp_path / "node-a"))
    cfg = from_dict(ServeConfig, {"dense": {"model": model, "index": index, "dtype": "float32"},
                                  "sparse": {"model": str(tiny_models["sparse"])}})
    pins = store_pins(cfg)
    assert {k for k, v in pins.items() if v} == {index, model} and pins[index] == index_pin(index)
    assert pins[str(tiny_models["sparse"])] is None  # a folder on disk is read in place
    assert index_pin(str(tmp_path / "both")) is None
    first = Documents([index], pins=pins)
    assert first.indices[index].sparse is not None  # node a holds its copy of the content pinned
    copy = local_index(index, pins[index])
    assert copy.is_relative_to(tmp_path / "node-a")
    want = load_encoder("dense", str(tiny_models["dense"]), dtype="float32").encode(SENTENCES[:3], convert_to_tensor=True)
    torch.testing.assert_close(load_model("dense", cfg.dense, pins[model]).encode(SENTENCES[:3], convert_to_tensor=True),
                               want, atol=0, rtol=0)

    time.sleep(1.1)  # S3 keeps times to the second: the rewrites are seen by their times too
    s3.fs.delete_dir(f"{BUCKET}/{key}")
    s3.put(tmp_path / "dense-only", key)  # rebuilt in place: no sparse index now
    s3.fs.delete_dir(f"{BUCKET}/{model_key}")
    s3.put(tiny_models["sparse"], model_key)  # another model saved there
    assert index_pin(index) != pins[index] and store_pins(cfg)[model] != pins[model]
    again = Documents([index], pins=pins)  # a replica restarted on node a: the content deployed
    assert again.indices[index].sparse is not None and local_index(index, pins[index]) == copy
    torch.testing.assert_close(load_model("dense", cfg.dense, pins[model]).encode(SENTENCES[:3], convert_to_tensor=True),
                               want, atol=0, rtol=0)
    # An ingress replica that recalls in its own process (recall_in_ingress) loads both alike.
    (runner,) = _local_runners(cfg.model_copy(update={"recall_in_ingress": True}), pins).values()
    assert runner.documents.indices[index].sparse is not None
    torch.testing.assert_close(runner.model.encode(SENTENCES[:3], convert_to_tensor=True), want, atol=0, rtol=0)
    monkeypatch.setenv("RAYTRIEVE_CACHE", str(tmp_path / "node-b"))  # a new node, without those copies
    fix = r": written again since the app pinned its content \(when it was deployed\), and this machine has no copy"
    with pytest.raises(DataError, match=rf"index s3://[^ ]*pinned/[^ ]*{fix}") as e:
        Documents([index], pins=pins)
    with pytest.raises(ModelLoadError, match=rf"model s3://[^ ]*pinned-model/[^ ]*{fix}") as m:
        load_model("dense", cfg.dense, pins[model])
    assert SECRET not in str(e.value) + str(m.value)
    fresh = Documents([index], pins=store_pins(cfg))  # deployed again: the new content, checked anew
    assert fresh.indices[index].sparse is None and load_indices(local_index(index)).dense is not None


def test_a_store_named_by_the_uris_query_reaches_every_file_of_a_folder(s3, tiny_models, data, tmp_path,
                                                                        monkeypatch):
    """A folder's files are listed as paths inside the filesystem, which leave out the URI's
    query: rebuilt as ``s3://`` + path, each file went to AWS's endpoint instead of the one the
    query named. Here no environment variable names the server; only the query does."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    table = pq.read_table(data["train"])
    (tmp_path / "my folder" / "city=New York").mkdir(parents=True)  # names that must be percent-encoded
    pq.write_table(table.slice(0, 10), tmp_path / "my folder" / "b%20.parquet")
    pq.write_table(table.slice(10), tmp_path / "my folder" / "city=New York" / "a #1.parquet")
    s3.put(tmp_path / "my folder", "query/my folder")
    uri = f"s3://{BUCKET}/query/my%20folder?endpoint_override={s3.endpoint}&scheme=http"
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data)
    cfg.datasets[0].path = uri
    p = prepare(cfg, "job.yaml")
    assert [piece.path for piece in p.pieces[0]] == [
        f"s3://{BUCKET}/query/my%20folder/{name}?endpoint_override={s3.endpoint}&scheme=http"
        for name in ("b%2520.parquet", "city%3DNew%20York/a%20%231.parquet")
    ] and p.rows == [table.num_rows]
    got = [r for piece in p.pieces[0] for r in read_piece(piece, ["query", "document"]).to_pylist()]
    assert got == table.select(["query", "document"]).to_pylist()
    rows, specs = _shards_of(uri, ["query", "document"], 5)
    assert rows == table.select(["query", "document"]).to_pylist() and len(specs) == 5


def _shards_of(location: str, columns: list[str], rows_per_shard: int) -> tuple[list[dict], list]:
    specs = plan_shards(open_source(location), rows_per_shard)
    return [r for s in specs for r in read_shard(s, columns).select(columns).to_pylist()], specs


def test_saved_hf_datasets_in_shards_and_by_file_and_what_cannot_be_read_is_named(s3, tiny_models, data,
                                                                                   tmp_path):
    import datasets

    put = s3.put
    table = pq.read_table(data["train"])
    datasets.Dataset(table).save_to_disk(str(tmp_path / "hf3"), num_shards=3)
    files = sorted(p.name for p in (tmp_path / "hf3").glob("*.arrow"))
    assert len(files) == 3
    uri = put(tmp_path / "hf3", "hf/hf3")
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data)
    columns = ["query", "document"]
    for location, n in ((uri, table.num_rows), (f"{uri}/{files[1]}", None)):
        cfg.datasets[0].path = location
        p = prepare(cfg, "job.yaml")
        got = [r for piece in p.pieces[0] for r in read_piece(piece, columns).to_pylist()]
        if n is None:  # one shard of the three, named directly
            want = pa.ipc.open_stream(pa.memory_map(str(tmp_path / "hf3" / files[1]))).read_all()
            assert got == want.select(columns).to_pylist() and 0 < len(got) < table.num_rows
        else:
            assert got == table.select(columns).to_pylist() and len(p.pieces[0]) == 3
    cfg.eval.path = uri  # read whole on the driver
    assert prepare(cfg, "job.yaml").spec.eval_columns["query"] == table.column("query").to_pylist()

    splits = datasets.DatasetDict({"train": datasets.Dataset(table), "test": datasets.Dataset(table.slice(0, 3))})
    splits.save_to_disk(str(tmp_path / "splits"))
    cfg.eval.path = put(tmp_path / "splits", "hf/splits")
    with pytest.raises(DataError, match=r"hf/splits: a DatasetDict \(splits \['train', 'test'\]\); point at one "
                                        r"split's folder"):
        prepare(cfg, "job.yaml")

    # A piece whose file went away after the plan: named, not read as an empty file.
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    cfg.datasets[0].path = put(tmp_path / "t.jsonl", "gone/t.jsonl")
    piece = prepare(cfg, "job.yaml").pieces[0][0]
    s3.fs.delete_file(f"{BUCKET}/gone/t.jsonl")
    with pytest.raises(DataError, match=rf"s3://{BUCKET}/gone/t.jsonl: cannot read it as jsonl \(.*\); check the "
                                        r"file; the driver and every worker node read it at this location"):
        read_piece(piece, columns)

    # A store that cannot be reached: the dataset, its path and the fix, before any work.
    cfg.datasets[0].path = f"s3://{BUCKET}/x.parquet?endpoint_override=127.0.0.1:9&scheme=http"  # nothing listens
    with pytest.raises(DataError, match=r"job.yaml.datasets\[0\] \(pydocs\): datasets\[\].path s3://.*: cannot "
                                        r"reach it \(.*\); check the file; the driver and every worker node"):
        prepare(cfg, "job.yaml")


def test_keys_in_a_uri_stay_out_of_what_the_run_records(s3_store, tiny_models, data, tmp_path, monkeypatch):
    """``s3://KEY:SECRET@bucket/...`` opens the store, and pyarrow accepts it; the secret must not
    reach the MLflow parameters, the model card or its train_config.yaml, which others read."""
    import time

    from raytrieve._io import redact
    from raytrieve.tracking.mlflow_run import flatten
    from raytrieve.train.card_facts import driver_facts
    from raytrieve.train.model_card import card_files

    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data)
    cfg.model.name_or_path = s3_store.uri(f"secret/{tmp_path.name}/model")  # the model too: downloaded
    monkeypatch.setenv("RAYTRIEVE_CACHE", str(tmp_path / "cache"))
    s3_store.put(tiny_models["dense"], f"secret/{tmp_path.name}/model")
    cfg.datasets[0].path = s3_store.uri(f"secret/{tmp_path.name}/train.parquet")
    cfg.eval.path = s3_store.uri(f"secret/{tmp_path.name}/test.parquet")
    s3_store.put(data["train"], f"secret/{tmp_path.name}/train.parquet")
    s3_store.put(data["test"], f"secret/{tmp_path.name}/test.parquet")
    p = prepare(cfg, "job.yaml")  # the keys in the URI open it
    assert SECRET in cfg.datasets[0].path and p.rows == [pq.read_table(data["train"]).num_rows]
    cfg = p.spec.config  # as the run has it: filled in by prepare
    params = flatten(cfg)
    files = card_files(driver_facts(cfg, p, time.time()))
    recorded = [*params.values(), *files.values()]
    assert all(SECRET not in text for text in recorded)
    # The keys are dropped, not masked: the recorded config reruns with the environment's keys.
    assert params["datasets.0.path"] == cfg.datasets[0].path.replace(f"{KEY}:{SECRET}@", "")
    assert f"path: s3://{BUCKET}/secret/{tmp_path.name}/train.parquet?endpoint_override=" in files["train_config.yaml"]
    # Secrets a query may hold (Azure's client secret, a SAS token's signature) are masked.
    assert redact("abfs://acct.dfs.core.windows.net/c?tenant_id=t&client_secret=abc&client_id=i") == (
        "abfs://acct.dfs.core.windows.net/c?tenant_id=t&client_secret=***&client_id=i")
    assert redact("see https://u:p@a.blob.core.windows.net/c/x?sv=1&sig=XY%3D&se=2 now") == (
        "see https://a.blob.core.windows.net/c/x?sv=1&sig=***&se=2 now")
    assert redact("s3://b/x?endpoint_override=h:9000&tag=a@b") == "s3://b/x?endpoint_override=h:9000&tag=a@b"


def test_a_checkpoint_folder_in_s3_belongs_to_one_run(s3_store, tmp_path):
    """checkpoint.dir may be an object store's URI (Ray Train keeps its checkpoints there; the
    DDP resume test in tests/test_train_e2e.py restarts from them): the run's stamp is written
    there with one put, a run with other settings is refused by the folder's URI once a
    checkpoint exists, and what a rerun reads back (its MLflow run, a finished run) comes back."""
    from raytrieve.config import from_dict
    from raytrieve.data.files import OutputStore
    from raytrieve.errors import ConfigError
    from raytrieve.train.checkpoint import (
        RUN_STAMP,
        checkpoint_dir,
        claim_checkpoint_dir,
        finished_run,
        record_finished,
        record_mlflow_run,
        run_to_resume,
    )
    from raytrieve.train.config import TrainConfig, TrainingConfig
    from raytrieve.train.plan import DatasetKeys, plan_training

    def config(**optimizer) -> TrainConfig:
        return from_dict(TrainConfig, {
            "model": {"name_or_path": "all-minilm-l6-v2", "kind": "dense"},
            "datasets": [{"name": "pairs", "path": "pairs.parquet", "loss": {"name": "MultipleNegativesRankingLoss"}}],
            "output_dir": str(tmp_path / "model"), "optimizer": optimizer,
            "checkpoint": {"dir": s3_store.uri(f"claim/{tmp_path.name}")}})

    plan = plan_training([DatasetKeys("pairs", 16)], TrainingConfig(batch_size=4, batch_sampler="default", seed=3), 1)
    data = {"pairs": {"rows": 16, "sha256": "aa"}}
    root = claim_checkpoint_dir(config(), plan, "job.yaml", data)
    assert root == checkpoint_dir(config()) == s3_store.uri(f"claim/{tmp_path.name}")
    store = OutputStore(root)
    assert store.names() == [RUN_STAMP] and not (tmp_path / "model.checkpoints").exists()
    assert claim_checkpoint_dir(config(learning_rate=1e-3), plan, "job.yaml", data) == root  # no checkpoint yet
    record_mlflow_run(root, "file:///mlruns", "r1")
    assert run_to_resume(root, "file:///mlruns") is None  # nothing to resume yet
    s3_store.fs.create_dir(f"{BUCKET}/claim/{tmp_path.name}/run/step-00000004")  # as Ray Train leaves one
    store.write_bytes("run/step-00000004/state.pt", b"x")
    assert run_to_resume(root, "file:///mlruns") == "r1"
    with pytest.raises(ConfigError, match=rf"job.yaml: s3://{BUCKET}/claim/{tmp_path.name}\?.* holds checkpoints of "
                                          r"a run with other settings or data \(optimizer.learning_rate: 0.001 -> "
                                          r"2e-05\)") as refused:
        claim_checkpoint_dir(config(), plan, "job.yaml", data)
    assert SECRET not in str(refused.value)  # the message names the folder without its keys
    record_finished(root, {"steps": 4})
    assert finished_run(root) == {"steps": 4} and store.read_json(RUN_STAMP)["mlflow"]["run_id"] == "r1"
    # A tracking store whose URI holds a password: the stamp keeps it without; the same store
    # named with other keys resumes its run, another store does not.
    record_mlflow_run(root, "postgresql://ml:hunter2@db:5432/mlflow", "r2")
    assert "hunter2" not in json.dumps(store.read_json(RUN_STAMP))
    assert run_to_resume(root, "postgresql://ml:rotated@db:5432/mlflow") == "r2"
    assert run_to_resume(root, "postgresql://ml:hunter2@other:5432/mlflow") is None


def test_an_inference_free_run_with_checkpoints_in_s3_builds_its_start_in_the_cache(s3_store, tiny_models, data,
                                                                                   tmp_path, monkeypatch):
    """The initial Router of an inference-free run is built in its checkpoint folder, which the
    workers read as a path; with the folder in an object store it is built in raytrieve's cache
    instead (model_ref.ship sends such folders to the workers)."""
    from raytrieve.encoders import SparseEncoder

    monkeypatch.setenv("RAYTRIEVE_CACHE", str(tmp_path / "cache"))
    cfg = shipped_config("router_inference_free_splade", tmp_path, tiny_models, data)
    cfg.checkpoint.dir = s3_store.uri(f"free/{tmp_path.name}")
    start = Path(prepare(cfg).spec.model_path)
    assert start.parent == tmp_path / "cache" / "initial-models"
    assert set(SparseEncoder(str(start), device="cpu").first_module.routes()) == {"query", "document"}


def test_a_jobs_error_line_holds_no_keys(capsys, tmp_path):
    """A job's one error line (kept in `ray job logs`) names the URI without its keys."""
    from raytrieve.jobs_entry import run_job
    from tests.train_helpers import ROOT

    uri = f"s3://{KEY}:{SECRET}@{BUCKET}/x.parquet?region=us-east-1&endpoint_override=127.0.0.1:9&scheme=http"
    config = str(ROOT / "jobs" / "configs" / "dense_mnrl.yaml")  # nothing listens at port 9
    assert run_job("train", config, [f"datasets.0.path={uri}", "eval.path=null", f"output_dir={tmp_path}/m"],
                   None) == 2
    err = capsys.readouterr().err
    assert err.startswith("raytrieve train: error: ") and "cannot reach it" in err, err
    assert SECRET not in err and f"s3://{BUCKET}/x.parquet?region=" in err, err


def test_a_model_in_s3_loads_as_from_disk_downloaded_once_per_content(s3_store, tiny_models, tmp_path, monkeypatch):
    """A model reference may be a folder's URI: it is downloaded into the cache once, its
    encoders give the folder's outputs, the same content is not downloaded again, and a model
    saved again at that URI is. What cannot be loaded is named without the URI's keys."""
    import shutil
    import time

    import torch

    from raytrieve.encoders import load_encoder
    from raytrieve.errors import ConfigError, ModelLoadError
    from raytrieve.model_ref import check_reference, resolve_model
    from tests.conftest import SENTENCES

    monkeypatch.setenv("RAYTRIEVE_CACHE", str(tmp_path / "cache"))
    key = f"models/{tmp_path.name}"
    for kind in ("dense", "sparse", "cross"):
        s3_store.put(tiny_models[kind], f"{key}/{kind}")
        uri = s3_store.uri(f"{key}/{kind}")  # keys, endpoint and region in the URI: no AWS_* variables
        check_reference(uri, "job.yaml.model")  # parses; listing it is the loader's
        ours, local = load_encoder(kind, uri), load_encoder(kind, str(tiny_models[kind]))
        if kind == "cross":
            pairs = [(SENTENCES[0], s) for s in SENTENCES[1:5]]
            torch.testing.assert_close(ours.predict(pairs, convert_to_tensor=True),
                                       local.predict(pairs, convert_to_tensor=True), atol=0, rtol=0)
        else:
            torch.testing.assert_close(ours.encode(SENTENCES[:4], convert_to_tensor=True),
                                       local.encode(SENTENCES[:4], convert_to_tensor=True), atol=0, rtol=0)
    uri = s3_store.uri(f"{key}/dense")
    first = resolve_model(uri)
    local_files = sorted(str(p.relative_to(tiny_models["dense"])) for p in tiny_models["dense"].rglob("*") if p.is_file())
    from raytrieve._io import ORIGIN_FILE  # the cache's note of where the copy came from (test_cache.py)

    copied = sorted(str(p.relative_to(first)) for p in first.rglob("*") if p.is_file() and p.name != ORIGIN_FILE)
    assert copied == local_files
    assert first.is_relative_to(tmp_path / "cache") and len(list((tmp_path / "cache" / "store").iterdir())) == 3
    assert resolve_model(uri) == first  # the same content: not downloaded again
    # Keys or none in the URI, the same content is the same copy (the keys are not its identity).
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", KEY)
        env.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        assert resolve_model(uri.replace(f"{KEY}:{SECRET}@", "")) == first
    # Saved again at the same URI (another card): a new download, with the new file.
    card = tmp_path / "README.md"
    card.write_text("# saved again\n")
    s3_store.put(card, f"{key}/dense/README.md")
    killed = tmp_path / "cache" / "store" / f".{resolve_model(uri).name}.tmp-x"  # as a killed download leaves it
    shutil.rmtree(resolve_model(uri))
    (killed / "0_Transformer").mkdir(parents=True)
    again = resolve_model(uri)
    assert not killed.exists()
    assert again != first and (again / "README.md").read_text() == "# saved again\n"

    # A save that begins while a copy is downloaded (same sizes, other bytes): nothing is kept.
    from raytrieve.data import files as files_module

    copy = shutil.copyfileobj

    def copy_then_resave(src, dst, length=0):
        copy(src, dst, length)
        time.sleep(1.1)  # S3 keeps modification times to the second: this save is seen by its time
        card.write_text("# third save!\n".upper())  # the same size as what is being downloaded
        s3_store.put(card, f"{key}/dense/README.md")

    # The same size as "# saved again": a second later, or the listing could not tell them apart
    # (S3 keeps modification times to the second; pyarrow's listing gives no ETag).
    time.sleep(1.1)
    card.write_text("# third save!\n")
    s3_store.put(card, f"{key}/dense/README.md")
    copies = sorted((tmp_path / "cache" / "store").iterdir())
    with monkeypatch.context() as patched:
        patched.setattr(files_module.shutil, "copyfileobj", copy_then_resave)
        with pytest.raises(ModelLoadError, match=r"dense\?.*: it changed while it was downloaded; read it again"):
            resolve_model(uri)
    assert sorted((tmp_path / "cache" / "store").iterdir()) == copies  # no copy, nor a half of one

    s3_store.put(card, f"{key}/not-a-model/README.md")
    refusals = [
        (s3_store.uri(f"{key}/nothing"), "nothing is there; point at the folder a model was saved to"),
        (s3_store.uri(f"{key}/not-a-model"), r"not-a-model\?.*: no modules.json and no config.json at its top"),
        (uri.replace(s3_store.endpoint, "127.0.0.1:9"), "cannot list the folder"),  # nothing listens there
    ]
    for bad, message in refusals:
        with pytest.raises(ModelLoadError, match=message) as caught:
            load_encoder("dense", bad)
        assert SECRET not in str(caught.value) and "credentials" in str(caught.value)
    with pytest.raises(ConfigError, match=r"job.yaml.model: model nope://x: pyarrow cannot open this URI"):
        check_reference("nope://x", "job.yaml.model")
    # Served by its URI and no name: clients name it so, without the keys.
    from raytrieve.serve.config import DeploymentConfig

    assert DeploymentConfig(model=uri).public_name == uri.replace(f"{KEY}:{SECRET}@", "")


def test_an_encoding_job_with_its_model_in_s3_resumes_with_a_new_copy_another_cache_or_other_keys(
        s3_store, tiny_models, tmp_path, monkeypatch):
    """The job's identity names a model by its URI without keys and its files' content, not by
    where this machine keeps its copy: a rerun after the same files were saved again (a new copy
    in the cache), with another RAYTRIEVE_CACHE (another machine) or with the keys in the
    environment instead of the URI is the same job, and so is a folder an earlier raytrieve
    wrote with the copy's path and the keys in its identity. Other content is refused, by name.
    Checked up to where the job starts Ray (nothing is encoded)."""
    import time

    import raytrieve.inference.encode as encode
    from raytrieve.config import from_dict
    from raytrieve.errors import ConfigError
    from raytrieve.inference import shards
    from raytrieve.inference.config import EncodeConfig
    from raytrieve.inference.encode_plan import (calibration_sample, claim_output, job_fingerprint, job_identity,
                                                 older_identity_rules, resolve_outputs)
    from raytrieve.model_ref import resolve_model

    class RayStarted(Exception):
        pass

    def start(*_a, **_k):
        raise RayStarted

    monkeypatch.setattr(encode, "_init_ray", start)
    key = f"models/{tmp_path.name}/dense"
    s3_store.put(tiny_models["dense"], key)
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table(_corpus_rows(20)), corpus)
    out = tmp_path / "vectors"

    def config(model: str, output_dir: str = str(out)) -> EncodeConfig:
        return from_dict(EncodeConfig, {"corpus": {"path": str(corpus)}, "output_dir": output_dir,
                                        "dense": {"model": model, "dtype": "float32"}})

    def planned(cfg: EncodeConfig) -> tuple[dict, dict]:
        source = open_source(str(corpus), None, field="corpus.path")
        described = resolve_outputs(cfg, calibration_sample(cfg, plan_shards(source, cfg.rows_per_shard)), "c")[1]
        return job_identity(cfg, source, described), described

    def written(identity: dict) -> None:
        out.mkdir(exist_ok=True)
        (out / shards.JOB).write_text(json.dumps({"fingerprint": job_fingerprint(identity), "identity": identity}))

    cfg = config(s3_store.uri(key))  # keys in the URI
    monkeypatch.setenv("RAYTRIEVE_CACHE", str(tmp_path / "cache-a"))
    first, described = planned(cfg)
    copy = Path(described["dense"]["model_path"])
    assert copy.is_relative_to(tmp_path / "cache-a")
    assert SECRET not in json.dumps(first) and "model_path" not in first["models"]["dense"]
    written(first)
    with pytest.raises(RayStarted):
        encode.run_encode(cfg)
    # Another machine's cache; then the same files saved again (new times: a new copy).
    monkeypatch.setenv("RAYTRIEVE_CACHE", str(tmp_path / "cache-b"))
    with pytest.raises(RayStarted):
        encode.run_encode(cfg)
    copy_b = resolve_model(s3_store.uri(key))
    time.sleep(1.1)  # S3 keeps times to the second
    s3_store.put(tiny_models["dense"], key)
    assert resolve_model(s3_store.uri(key)) != copy_b
    with pytest.raises(RayStarted):
        encode.run_encode(cfg)
    # The keys from the environment, not the URI.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", KEY)
        env.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        with pytest.raises(RayStarted):
            encode.run_encode(config(s3_store.uri(key).replace(f"{KEY}:{SECRET}@", "")))

    # A folder an earlier raytrieve wrote: the identity held the URI with its keys and cache-a's
    # copy. From cache-b it is the same job, under the folder's own identity (its shards' key).
    earlier = dict(older_identity_rules(first, described))["their content and local folder"]
    assert earlier["models"]["dense"]["model_path"] == str(copy) and SECRET in json.dumps(earlier)
    written(earlier)
    now, described_now = planned(cfg)
    assert described_now["dense"]["model_path"] != str(copy)
    assert claim_output(shards.OutputStore(str(out)), now, "c", cfg=cfg, described=described_now) == earlier
    with pytest.raises(RayStarted):
        encode.run_encode(cfg)
    # Other files at the URI are another model: refused, naming its weights and no keys.
    card = tmp_path / "README.md"
    card.write_text("# another model card\n")
    s3_store.put(card, f"{key}/README.md")
    for kept in (first, earlier):
        written(kept)
        with pytest.raises(ConfigError, match=r"different encoding job \(that job -> this one: dense\.weights: .*\); "
                                              r"a file under the model's folder was added") as refused:
            encode.run_encode(cfg)
        assert "model_path" not in str(refused.value) and SECRET not in str(refused.value)
    # The output in the bucket, named with keys: the refusal names it without them.
    written(first)
    s3_store.put(out / shards.JOB, f"vectors/{tmp_path.name}/{shards.JOB}")
    with pytest.raises(ConfigError, match=rf"output_dir s3://{BUCKET}/vectors/.*: holds the output of a different"
                                          r" encoding job") as refused:
        encode.run_encode(config(s3_store.uri(key), s3_store.uri(f"vectors/{tmp_path.name}")))
    assert SECRET not in str(refused.value)


def test_a_trained_models_folder_in_s3_is_replaced_whole_and_checked_before_work(s3_store, tiny_models, data,
                                                                                  tmp_path, monkeypatch):
    """Training's output_dir may be a folder URI: the driver checks it as it does a folder on
    disk (an earlier model is replaced, other files or a file are refused, checkpoints may not go
    inside it, and by default go beside it with the URI's query kept). The save replaces the
    folder file by file behind ``.incomplete``, which a loader refuses while it is there."""
    from raytrieve.data.files import INCOMPLETE, OutputStore
    from raytrieve.errors import ConfigError, ModelLoadError
    from raytrieve.model_ref import resolve_model
    from raytrieve.train.checkpoint import checkpoint_dir

    monkeypatch.setenv("RAYTRIEVE_CACHE", str(tmp_path / "cache"))
    key = f"out/{tmp_path.name}"
    uri = s3_store.uri(f"{key}/model")
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, output_dir=uri)
    assert checkpoint_dir(cfg) == s3_store.uri(f"{key}/model.checkpoints")
    assert prepare(cfg, "job.yaml").spec.config.output_dir == uri  # nothing there yet; a URI is kept as given

    # An earlier model (with a file the new one lacks, in a subfolder too) is replaced whole.
    old = tmp_path / "old"
    (old / "sub").mkdir(parents=True)
    (old / "modules.json").write_text("[]")
    (old / "sub" / "stale.bin").write_bytes(b"old")
    s3_store.put(old, f"{key}/model")
    prepare(cfg, "job.yaml")
    store = OutputStore(uri)
    store.replace_with(tiny_models["dense"])
    local = sorted(p.relative_to(tiny_models["dense"]).as_posix() for p in tiny_models["dense"].rglob("*") if p.is_file())
    folder = f"{BUCKET}/{key}/model"
    listed = s3_store.fs.get_file_info(pafs.FileSelector(folder, recursive=True))
    assert sorted(i.path.removeprefix(f"{folder}/") for i in listed if i.type == pafs.FileType.File) == local
    assert (resolve_model(uri) / "model.safetensors").read_bytes() == (tiny_models["dense"] / "model.safetensors").read_bytes()

    # A save cut short (INCOMPLETE still there): the loader refuses it, a rerun may replace it.
    store.write_bytes(INCOMPLETE, b"")
    with pytest.raises(ModelLoadError, match=r"is being written, or its write was cut short \(\.incomplete"):
        resolve_model(uri)
    store.delete("modules.json")
    prepare(cfg, "job.yaml")

    s3_store.put(data["train"], f"{key}/other/train.parquet")
    s3_store.put(data["train"], f"{key}/a-file")
    refused = [
        ({"output_dir": s3_store.uri(f"{key}/other")}, r"job.yaml.output_dir s3://.*/other\?.*: the folder holds other "
                                                       r"files \(train.parquet\); it is replaced whole"),
        ({"output_dir": s3_store.uri(f"{key}/a-file")}, r"job.yaml.output_dir s3://.*/a-file\?.*: is a file"),
        ({"checkpoint": {"dir": s3_store.uri(f"{key}/model/ckpt")}}, r"job.yaml.checkpoint.dir .*/model/ckpt: inside "
                                                                     r"output_dir"),
        ({"output_dir": s3_store.uri("")}, r"job.yaml.output_dir s3://raytrieve-test/\?.*: a bucket \(or container\) "
                                           r"itself; name a folder inside it"),
    ]
    for change, message in refused:
        bad = shipped_config("dense_mnrl", tmp_path, tiny_models, data, output_dir=uri)
        for field, value in change.items():
            setattr(bad, field, value if field == "output_dir" else bad.checkpoint.model_copy(update=value))
        with pytest.raises(ConfigError, match=message) as caught:
            prepare(bad, "job.yaml")
        assert SECRET not in str(caught.value)
    # Training a model in place, by its URI: the save would replace the model it reads.
    s3_store.put(tiny_models["dense"], f"{key}/base")
    in_place = shipped_config("dense_mnrl", tmp_path, tiny_models, data, output_dir=s3_store.uri(f"{key}/base"))
    in_place.model.name_or_path = s3_store.uri(f"{key}/base")
    with pytest.raises(ConfigError, match=r"job.yaml.output_dir s3://.*/base\?.*: holds the model being trained") as caught:
        prepare(in_place, "job.yaml")
    assert SECRET not in str(caught.value)
    # A file:// URI is a local folder, with local disk's checks.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match=r"job.yaml.output_dir .*mine: the folder holds other files \(keep.txt\)"):
        prepare(shipped_config("dense_mnrl", tmp_path, tiny_models, data, output_dir=(tmp_path / "mine").as_uri()),
                "job.yaml")
