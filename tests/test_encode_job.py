"""The corpus encoding job on a real local Ray: its vectors equal the in-process encoders',
bad rows follow the policy and are listed, a finished job is a no-op, and a job whose
driver is SIGKILLed mid-way finishes on a rerun with every id exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from raytrieve.config import from_dict
from raytrieve.errors import ConfigError, DataError
from raytrieve.inference.config import EncodeConfig
from raytrieve.inference.shards import MANIFEST, TMP_MARK, read_bad_rows, read_vectors
from tests.conftest import SENTENCES, state_address
from tests.train_helpers import ROOT


def _corpus(path: Path, n: int, bad: bool = True, title: bool = False) -> dict[str, list]:
    texts = [f"{SENTENCES[i % len(SENTENCES)]} (item {i})" for i in range(n)]
    ids = [f"doc-{i}" for i in range(n)]
    data: dict[str, list] = {"id": ids, "text": texts}
    if bad:
        texts[3] = None
        texts[7] = "   "
        ids[12] = ids[11]
    if title:
        data["title"] = [f"Title {i}" if i % 3 else None for i in range(n)]
        if bad:  # row 7 (blank text) has a title, so it is kept as the title alone; row 9 has neither
            texts[9] = ""
    pq.write_table(pa.table(data), path)
    return data


def _expected(data: dict[str, list]) -> tuple[list[str], list[str]]:
    """(ids, texts) the job must encode: first occurrence of each id (a null one: left out), title
    joined in front of a non-blank text, a title alone for a blank one (BEIR's title-only
    documents), neither: left out."""
    seen, ids, texts = set(), [], []
    for i, (id_, text) in enumerate(zip(data["id"], data["text"])):
        title = data.get("title", [None] * len(data["id"]))[i]
        if id_ is None or text is None or not (text.strip() or title) or id_ in seen:
            continue
        seen.add(id_)
        ids.append(id_)
        texts.append(title if not text.strip() else f"{title} {text}" if title else text)
    return ids, texts


def _config(tmp_path: Path, corpus_path: Path, **extra) -> EncodeConfig:
    """The tests compare the job's vectors with in-process float32 encoders: models compute in
    float32 unless a test says otherwise (test_auto_dtype_is_recorded_and_close_to_float32)."""
    base = {"corpus": {"path": str(corpus_path)}, "output_dir": str(tmp_path / "vectors"), "rows_per_shard": 25,
            "compute": {"encode_actors": 1, "cpus_per_encode_actor": 0.5, "torch_threads": 1, "token_budget": 256}}
    for kind in ("dense", "sparse"):
        if isinstance(extra.get(kind), dict):
            extra[kind] = {"dtype": "float32", **extra[kind]}
    return from_dict(EncodeConfig, {**base, **extra})


def _dense_of_sparse(v) -> np.ndarray:
    offsets, indices, values = v.sparse
    out = np.zeros((len(v.ids), 30522), dtype=np.float32)
    for i in range(len(v.ids)):
        out[i, indices[offsets[i]:offsets[i + 1]]] = values[offsets[i]:offsets[i + 1]]
    return out


@pytest.mark.slow
def test_auto_dtype_is_recorded_and_close_to_float32(ray_cluster, tiny_models, tmp_path):
    """The default dtype (auto): each actor picks the format this machine runs fast, if the model
    passes its guard; the manifest says what was asked and what the actors chose."""
    from raytrieve.encoders import DenseEncoder
    from raytrieve.inference.encode import run_encode

    data = _corpus(tmp_path / "corpus.parquet", 60, bad=False)
    cfg = from_dict(EncodeConfig, {"corpus": {"path": str(tmp_path / "corpus.parquet")},
                                   "output_dir": str(tmp_path / "vectors"), "rows_per_shard": 30,
                                   "dense": {"model": str(tiny_models["dense"])},
                                   "compute": {"encode_actors": 1, "cpus_per_encode_actor": 0.5, "torch_threads": 1}})
    run_encode(cfg)
    v = read_vectors(cfg.output_dir)
    chosen = DenseEncoder(tiny_models["dense"], dtype="auto").dtype  # the same decision, in process
    assert v.manifest.dense.dtype == "auto" and v.manifest.dense.dtypes_used == [chosen]
    reference = DenseEncoder(tiny_models["dense"]).encode_document(data["text"], normalize_embeddings=True)
    cosines = (v.dense * reference).sum(1)
    assert cosines.min() >= 0.999
    if chosen == "float32":
        np.testing.assert_allclose(v.dense, reference, atol=1e-5)
    else:
        assert not np.allclose(v.dense, reference, atol=1e-6)  # bfloat16 really ran in the actors


@pytest.mark.slow
def test_job_vectors_equal_in_process_encoders(ray_cluster, tiny_models, tmp_path):
    from raytrieve.encoders import DenseEncoder, SparseEncoder
    from raytrieve.inference.encode import run_encode

    data = _corpus(tmp_path / "corpus.parquet", 120, title=True)
    cfg = _config(tmp_path, tmp_path / "corpus.parquet", dense={"model": str(tiny_models["dense"])},
                  sparse={"model": str(tiny_models["sparse"])})
    cfg.corpus.title_column = "title"
    result = run_encode(cfg)
    ids, texts = _expected(data)
    assert (result.rows, result.shards, result.shards_written, result.bad_rows) == (len(ids), 5, 5, 3)
    assert texts[ids.index(data["id"][7])] == "Title 7" and data["id"][9] not in ids

    v = read_vectors(cfg.output_dir)
    assert v.ids == ids  # corpus order, every kept id exactly once
    dense = DenseEncoder(tiny_models["dense"]).encode_document(texts, normalize_embeddings=True)
    np.testing.assert_allclose(v.dense, dense, atol=1e-5)
    sparse = SparseEncoder(tiny_models["sparse"]).encode_document(texts, convert_to_sparse_tensor=False).numpy()
    np.testing.assert_allclose(_dense_of_sparse(v), sparse, atol=1e-5)
    assert v.manifest.dense.normalize is True and v.manifest.dense.dim == 32
    # Shards are input row ranges planned from the file's metadata; bad rows leave their shard short.
    assert [s.rows for s in v.manifest.shards] == [22, 25, 25, 25, 20]
    # The corpus settings the texts were read with, as Serve and mining read them again.
    located = {"path": str((tmp_path / "corpus.parquet").resolve()), "format": "parquet"}
    assert v.manifest.corpus.config() == cfg.corpus.model_copy(update=located)

    bad = read_bad_rows(cfg.output_dir).to_pylist()
    assert [(b["row"], b["id"]) for b in bad] == [(3, "doc-3"), (9, "doc-9"), (12, "doc-11")]
    assert [b["reason"] for b in bad][:2] == ["null text", "empty text and title"]
    assert bad[2]["reason"].startswith("duplicate")

    # `raytrieve index build` over the job's output: both indices, searchable, exact.
    from raytrieve.cli import main
    from raytrieve.index.build import load_indices

    assert main(["index", "build", "--vectors", cfg.output_dir, "--out", str(tmp_path / "index")]) == 0
    indices = load_indices(tmp_path / "index")
    assert indices.source == v.manifest and indices.dense.ids == ids
    # source.json is the job's manifest.json, key for key.
    assert json.loads((tmp_path / "index" / "source.json").read_text()) == json.loads(
        (Path(cfg.output_dir) / "manifest.json").read_text())
    hits = indices.dense.search(dense[:10], top_k=5)
    brute = np.argsort(-(dense[:10] @ v.dense.T), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(hits.rows, brute)
    offsets, terms, weights = v.sparse
    queries = [(terms[offsets[r]:offsets[r + 1]], weights[offsets[r]:offsets[r + 1]]) for r in range(5)]
    sparse_hits = indices.sparse.search(queries, 3)
    brute = np.argsort(-(sparse[:5] @ sparse.T), axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(sparse_hits.rows, brute)

    mtimes = {p.name: p.stat().st_mtime_ns for p in Path(cfg.output_dir).iterdir()}
    again = run_encode(cfg)
    assert again.already_complete and again.shards_written == 0
    assert {p.name: p.stat().st_mtime_ns for p in Path(cfg.output_dir).iterdir()} == mtimes


@pytest.mark.slow
def test_job_query_side_router_int8_matryoshka(ray_cluster, tiny_models, tmp_path):
    from raytrieve.encoders import DenseEncoder, SparseEncoder
    from raytrieve.quantization import quantize_embeddings
    from raytrieve.inference.encode import run_encode

    data = _corpus(tmp_path / "corpus.parquet", 60, bad=False)
    cfg = _config(tmp_path, tmp_path / "corpus.parquet", side="query",
                  dense={"model": str(tiny_models["dense"]), "precision": "int8", "truncate_dim": 16,
                         "calibration_rows": 40},
                  sparse={"model": str(tiny_models["router"])})
    run_encode(cfg)
    v = read_vectors(cfg.output_dir)
    assert v.ids == data["id"] and v.dense.dtype == np.int8 and v.dense.shape == (60, 16)
    ranges = np.asarray(v.manifest.dense.ranges, dtype=np.float32)
    assert ranges.shape == (2, 16)
    emb = DenseEncoder(tiny_models["dense"]).encode_query(data["text"], truncate_dim=16, normalize_embeddings=True)
    expected = quantize_embeddings(emb, "int8", ranges=ranges)
    # A float difference at a bucket edge may move a value by one bucket, never more.
    assert np.abs(v.dense.astype(int) - expected.astype(int)).max() <= 1
    assert (v.dense == expected).mean() > 0.99
    # The Router's query route: the static (inference-free) side, not the MLM.
    router = SparseEncoder(tiny_models["router"])
    np.testing.assert_allclose(_dense_of_sparse(v), router.encode_query(data["text"], convert_to_sparse_tensor=False)
                               .numpy(), atol=1e-5)
    assert not np.allclose(_dense_of_sparse(v)[:5], router.encode_document(data["text"][:5],
                                                                           convert_to_sparse_tensor=False).numpy())

    # The int8 ranges come from the corpus itself; a changed corpus is still the same job: the
    # changed shard is re-encoded with the first run's ranges.
    data["text"][5] = "A changed query."
    pq.write_table(pa.table(data), tmp_path / "corpus.parquet")
    again = run_encode(cfg)
    assert again.shards_changed == [0] and again.shards_written == 1
    assert read_vectors(cfg.output_dir).manifest.dense.ranges == v.manifest.dense.ranges


def test_bad_input_is_refused_before_any_encoding(ray_cluster, tiny_models, tmp_path):
    from raytrieve.inference.encode import run_encode

    _corpus(tmp_path / "corpus.parquet", 30)
    dense = {"model": str(tiny_models["dense"])}
    with pytest.raises(DataError, match=r"no column 'body' for the text.*\['id', 'text'\].*corpus.text_column"):
        run_encode(_config(tmp_path, tmp_path / "corpus.parquet", dense=dense,
                           corpus={"path": str(tmp_path / "corpus.parquet"), "text_column": "body"}))
    with pytest.raises(DataError, match=r"3 bad row\(s\): row 3 \(null text\); row 7 \(empty text\); row 12 "
                                        r"\(duplicate id \(row 11 has it first\).*bad_rows: skip"):
        run_encode(_config(tmp_path, tmp_path / "corpus.parquet", dense=dense, bad_rows="fail"))
    with pytest.raises(ConfigError, match="truncate_dim=64 exceeds the model's 32"):
        run_encode(_config(tmp_path, tmp_path / "corpus.parquet", dense={**dense, "truncate_dim": 64}))
    with pytest.raises(ConfigError, match="set dense:, sparse: or both"):
        run_encode(_config(tmp_path, tmp_path / "corpus.parquet"))
    # It failed in the workers after 40 s, and its folder then refused the corrected rerun.
    with pytest.raises(ConfigError, match=r"sparse.max_active_dims must be >= 1 \(or null: every weight\), got -1"):
        _config(tmp_path, tmp_path / "corpus.parquet", sparse={"model": str(tiny_models["sparse"]), "max_active_dims": -1})
    with pytest.raises(ConfigError, match=r"config.output_dir .*corpus.parquet: is a file; name a folder"):
        run_encode(_config(tmp_path, tmp_path / "corpus.parquet", dense=dense,
                           output_dir=str(tmp_path / "corpus.parquet")))
    with pytest.raises(DataError, match="corpus.path .*missing.parquet: file not found"):
        run_encode(_config(tmp_path, tmp_path / "missing.parquet", dense=dense))
    # Found by the shard that reads it (a later line), on a worker: raised as itself, naming the
    # file (it was Ray Data's "UDF failed to process a data block" traceback, exit status 1).
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("id,text\n" + "".join(f"{i},text {i}\n" for i in range(8)) + "x,a,b,c\n")
    with pytest.raises(DataError, match=r"bad.csv: cannot read it as csv \(CSV parse error: Expected 2 columns, got 4"):
        run_encode(_config(tmp_path, bad_csv, dense=dense, output_dir=str(tmp_path / "csv_vectors")))
    (tmp_path / "vectors").mkdir()
    (tmp_path / "vectors" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not an encoding job's folder"):
        run_encode(_config(tmp_path, tmp_path / "corpus.parquet", dense=dense))
    assert (tmp_path / "vectors" / "notes.txt").read_text() == "mine"


def _wait_until_the_jobs_actors_exit(driver_pid: int) -> None:
    """A SIGKILLed driver's actors run on until Ray notices that their owner is gone, and one may
    finish another shard meanwhile (a CI run counted 3 shards, and the rerun found 4): wait until
    every actor that driver's job owns is dead and its process has exited."""
    import psutil
    from ray.util.state import list_actors, list_jobs

    deadline, jobs, actors = time.time() + 120, [], []
    while time.time() < deadline:
        # The session's cluster has run many drivers (past the state API's default limit of 100),
        # and a pid may come again: the newest job of this pid.
        jobs = sorted((j for j in list_jobs(state_address(), limit=10_000, raise_on_missing_output=False)
                       if j.driver_info is not None and int(j.driver_info.pid) == driver_pid),
                      key=lambda j: j.start_time or 0, reverse=True)
        if jobs:
            # Named ones (Ray Data's stats and coordinator actors) are detached: they outlive jobs.
            actors = [a for a in list_actors(state_address(), filters=[("job_id", "=", jobs[0].job_id)], limit=10_000,
                                             raise_on_missing_output=False) if not a.name]
            if actors and all(a.state == "DEAD" and not (a.pid and psutil.pid_exists(a.pid)) for a in actors):
                return
        time.sleep(0.2)
    raise AssertionError(f"the actors of the killed driver {driver_pid} still run after 120 s: {jobs[:1]} {actors}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_job_reruns_to_every_id_once(ray_cluster, tiny_models, tmp_path):
    """The driver (jobs/encode.py joined to the session's cluster, as under `ray job submit`) is
    SIGKILLed once some shards are written; the same command then finishes the job."""
    from raytrieve.encoders import DenseEncoder

    data = _corpus(tmp_path / "corpus.parquet", 300, bad=False)
    out = tmp_path / "vectors"
    config = {"corpus": {"path": str(tmp_path / "corpus.parquet")}, "output_dir": str(out), "rows_per_shard": 10,
              "dense": {"model": str(tiny_models["dense"]), "dtype": "float32"},
              "compute": {"encode_actors": 1, "cpus_per_encode_actor": 0.5, "torch_threads": 1, "token_budget": 256}}
    config_path = tmp_path / "encode.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           "PYTHONPATH": str(ROOT / "platform")}
    command = [sys.executable, str(ROOT / "jobs" / "encode.py"), "--config", str(config_path)]

    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("part-*.json"))) < 3 and first.poll() is None:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    _wait_until_the_jobs_actors_exit(first.pid)
    finished_before = len(list(out.glob("part-*.json")))
    assert 3 <= finished_before < 30, finished_before  # killed mid-way, not before or after
    assert not (out / "manifest.json").exists()

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Traceback" not in second.stderr, second.stderr[-3000:]  # a run that succeeds prints no trace
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["shards_reused"] == finished_before and summary["shards_written"] == 30 - summary["shards_reused"]
    v = read_vectors(out)
    assert v.ids == data["id"] and len(set(v.ids)) == 300
    np.testing.assert_allclose(v.dense, DenseEncoder(tiny_models["dense"]).encode_document(
        data["text"], normalize_embeddings=True), atol=1e-5)
    assert not list(out.glob(".*.tmp-*"))


@pytest.mark.slow
def test_changed_or_damaged_shards_are_re_encoded_and_named(ray_cluster, tiny_models, tmp_path):
    """Duplicates across shards lose to the first row; a rerun after the corpus changed in two
    shards (one only in the row it leaves out) and another shard's file was damaged re-encodes
    exactly those three, and says so."""
    from raytrieve.encoders import DenseEncoder
    from raytrieve.inference.encode import run_encode

    data = _corpus(tmp_path / "corpus.parquet", 100, bad=False)
    data["id"][60] = data["id"][5]  # shard 2 repeats an id of shard 0
    pq.write_table(pa.table(data), tmp_path / "corpus.parquet")
    cfg = _config(tmp_path, tmp_path / "corpus.parquet", dense={"model": str(tiny_models["dense"])})
    first = run_encode(cfg)
    assert (first.shards_written, first.bad_rows, first.duplicate_ids) == (4, 1, 1)
    assert read_bad_rows(cfg.output_dir).to_pylist() == [
        {"row": 60, "id": "doc-5", "reason": "duplicate id (an earlier row has it)"}]

    data["text"][30] = "A changed document."
    # Shard 2 keeps the same rows, but the row it leaves out is now left out for a null id: its
    # sidecar, which the manifest and read_bad_rows read, would otherwise say "duplicate" still.
    data["id"][60] = None
    pq.write_table(pa.table(data), tmp_path / "corpus.parquet")
    damaged = Path(cfg.output_dir) / "part-00003.parquet"
    damaged.write_bytes(damaged.read_bytes()[:-20])
    again = run_encode(cfg)
    assert (again.shards_written, again.shards_reused, again.shards_changed) == (3, 1, [1, 2, 3])
    assert (again.bad_rows, again.duplicate_ids) == (1, 0)
    assert read_bad_rows(cfg.output_dir).to_pylist() == [{"row": 60, "id": None, "reason": "null id"}]
    ids, texts = _expected(data)
    v = read_vectors(cfg.output_dir)
    assert v.ids == ids
    np.testing.assert_allclose(v.dense, DenseEncoder(tiny_models["dense"]).encode_document(
        texts, normalize_embeddings=True), atol=1e-5)


@pytest.mark.slow
def test_jsonl_glob_and_ray_dataset_inputs(ray_cluster, s3_store, tiny_models, tmp_path, monkeypatch):
    """Line-format files by byte ranges across a glob of files in an object store, and a Ray
    Dataset handed over from Python, give the same vectors as the in-process encoder. The
    workers read the bucket and write their shards there, one put each (tests/object_store.py's
    S3 server, named by the URI alone: the workers' environment has no AWS_* variables); the
    model too is a folder in the bucket, which the driver downloads and ships to the workers."""
    from raytrieve.encoders import DenseEncoder
    from raytrieve.inference.encode import run_encode
    from tests.object_store import BUCKET

    texts = [f"{SENTENCES[i % len(SENTENCES)]} (item {i})" for i in range(70)]
    (tmp_path / "in").mkdir()
    for f, (a, b) in enumerate([(0, 40), (40, 70)]):
        (tmp_path / "in" / f"part-{f}.jsonl").write_text(
            "".join(json.dumps({"id": i, "text": texts[i]}) + "\n" for i in range(a, b)))
    expected = DenseEncoder(tiny_models["dense"]).encode_document(texts, normalize_embeddings=True)
    key = f"encode/{tmp_path.name}"
    s3_store.put(tmp_path / "in", f"{key}/in")
    s3_store.put(tiny_models["dense"], f"{key}/model")
    monkeypatch.setenv("RAYTRIEVE_CACHE", str(tmp_path / "cache"))  # the driver's download, not the user's cache
    cfg = _config(tmp_path, s3_store.uri(f"{key}/in/*.jsonl"), dense={"model": s3_store.uri(f"{key}/model")},
                  rows_per_shard=9, output_dir=s3_store.uri(f"{key}/vectors"))
    result = run_encode(cfg)
    v = read_vectors(cfg.output_dir)
    assert result.shards >= 6 and v.ids == [str(i) for i in range(70)]  # integer ids are kept as text
    np.testing.assert_allclose(v.dense, expected, atol=1e-5)
    written = {Path(i.path).name for i in s3_store.fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{key}/vectors"))}
    assert {f"part-{n:05d}.parquet" for n in range(result.shards)} <= written and MANIFEST in written
    assert not any(TMP_MARK in name for name in written)

    ds = ray_cluster.data.from_items([{"id": f"d{i}", "text": t} for i, t in enumerate(texts)], override_num_blocks=3)
    cfg = _config(tmp_path, tmp_path / "unused", dense={"model": str(tiny_models["dense"])},
                  output_dir=str(tmp_path / "from_dataset"))
    run_encode(cfg, dataset=ds)
    v = read_vectors(cfg.output_dir)
    assert sorted(v.ids) == sorted(f"d{i}" for i in range(70))
    order = [int(i[1:]) for i in v.ids]
    np.testing.assert_allclose(v.dense, expected[order], atol=1e-5)
    # Another job into that folder (another max_seq_length, another dataset) is refused, and the
    # input its shards were encoded from is as it was: the new dataset was staged beside it.
    staged = Path(cfg.output_dir) / "_input"
    before = {p.name: p.read_bytes() for p in staged.iterdir()}
    other = ray_cluster.data.from_items([{"id": f"e{i}", "text": t[::-1]} for i, t in enumerate(texts)])
    changed = _config(tmp_path, tmp_path / "unused", dense={"model": str(tiny_models["dense"]), "max_seq_length": 16},
                      output_dir=cfg.output_dir)
    with pytest.raises(ConfigError, match="holds the output of a different encoding job"):
        run_encode(changed, dataset=other)
    assert {p.name: p.read_bytes() for p in staged.iterdir()} == before
    assert not (Path(cfg.output_dir) / "_input.next").exists() and read_vectors(cfg.output_dir).ids == v.ids


# -- a registered model, refusals, and the on-disk states a kill leaves ------------------------

REGISTERED = "models:/tiny-dense/1"  # the conftest's registry fixture
SHARDS = 10  # of 10 rows: the registered job's plan


@contextlib.contextmanager
def _registry_env(registry):
    """MLFLOW_TRACKING_URI names the store, as the README says for the encoding job; the
    download goes to a cache in the test's tmp dir, not the user's."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", registry["uri"])
        env.setenv("RAYTRIEVE_CACHE", str(registry["cache"]))
        env.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        yield


@pytest.fixture(scope="module")
def registered_job(ray_cluster, tiny_models, registry, tmp_path_factory):
    """One finished job (10 shards of 10 rows) encoded with models:/tiny-dense/1: the tests
    below check it, are refused by it, or copy it into what a kill leaves behind."""
    from raytrieve.encoders import DenseEncoder
    from raytrieve.inference.encode import run_encode

    root = tmp_path_factory.mktemp("registered_job")
    data = _corpus(root / "corpus.parquet", 100, bad=False)
    cfg = _config(root, root / "corpus.parquet", dense={"model": REGISTERED}, rows_per_shard=10)
    with _registry_env(registry):
        result = run_encode(cfg)
    expected = DenseEncoder(tiny_models["dense"]).encode_document(data["text"], normalize_embeddings=True)
    return {"root": root, "data": data, "cfg": cfg, "result": result, "expected": expected,
            "out": Path(cfg.output_dir)}


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def _check_vectors(job, out: Path) -> None:
    """Every id exactly once in corpus order; vectors equal the in-process encoder's."""
    v = read_vectors(out)
    assert v.ids == job["data"]["id"] and len(set(v.ids)) == len(v.ids)
    np.testing.assert_allclose(v.dense, job["expected"], atol=1e-5)


@pytest.mark.slow
def test_registered_model_encodes_like_its_folder(registered_job, registry):
    result, out = registered_job["result"], registered_job["out"]
    assert (result.rows, result.shards, result.shards_written, result.shards_reused) == (100, SHARDS, SHARDS, 0)
    _check_vectors(registered_job, out)
    manifest = read_vectors(out).manifest
    assert manifest.dense.model == REGISTERED
    # The driver downloaded the version once; the workers loaded that copy.
    assert Path(manifest.dense.model_path).is_relative_to(registry["cache"] / "mlflow")


@pytest.mark.slow
def test_other_model_setting_or_corpus_location_is_refused_and_nothing_changes(registered_job, registry, tiny_dirs,
                                                                               tmp_path):
    """Pointed at a finished job's folder, another model, any setting that changes the vectors
    or the shard plan, or the same corpus at another location is refused before Ray work
    starts, naming the folder, what differs and the fix; not one byte or mtime changes."""
    from raytrieve.encoders import DenseEncoder
    from raytrieve.inference.encode import run_encode
    from raytrieve.modules import Pooling, Transformer

    root, out = registered_job["root"], registered_job["out"]
    other = tmp_path / "other-model"
    DenseEncoder([Transformer.from_pretrained(tiny_dirs["base"], max_seq_length=24), Pooling(32, "cls")],
                 device="cpu").save(other)
    moved = tmp_path / "moved" / "corpus.parquet"
    moved.parent.mkdir()
    moved.write_bytes((root / "corpus.parquet").read_bytes())  # same content, other location
    corpus = str(root / "corpus.parquet")
    cases = [
        ({"dense": {"model": str(other)}}, "dense.model"),
        ({"dense": {"model": REGISTERED, "max_seq_length": 16}}, "dense.max_seq_length"),
        ({"dense": {"model": REGISTERED, "normalize": False}}, "dense.normalize"),
        ({"dense": {"model": REGISTERED, "precision": "int8", "calibration_rows": 20}}, "dense.precision"),
        ({"dense": {"model": REGISTERED, "truncate_dim": 16}}, "dense.truncate_dim"),
        ({"dense": {"model": REGISTERED}, "rows_per_shard": 25}, "rows_per_shard"),
        ({"dense": {"model": REGISTERED}, "corpus": {"path": str(moved)}}, "corpus.path"),
        # The job computed in float32 (as every job before the dtype setting did): the default,
        # auto, is another job, and the message says how to resume this one.
        ({"dense": {"model": REGISTERED, "dtype": "auto"}}, "set dtype: float32 to resume it"),
    ]
    before = _snapshot(out)
    with _registry_env(registry):
        for change, named in cases:
            cfg = _config(root, corpus, **{"rows_per_shard": 10, **change})
            with pytest.raises(ConfigError) as refused:
                run_encode(cfg)
            message = str(refused.value)
            assert f"output_dir {out}: holds the output of a different encoding job" in message, message
            assert named in message and "choose a new output_dir or delete that folder" in message, message
    assert _snapshot(out) == before

    # A caller's own cache (mine's <output_path>.work/vectors, a folder the user never named) is
    # replaced instead: every old file goes, a staged input included, and the new job is whole.
    scratch = tmp_path / "scratch"
    shutil.copytree(out, scratch)
    (scratch / "_input").mkdir()
    (scratch / "_input" / "part.parquet").write_bytes(b"old")
    cfg = _config(root, corpus, rows_per_shard=10, output_dir=str(scratch),
                  dense={"model": REGISTERED, "max_seq_length": 16})
    with _registry_env(registry):
        result = run_encode(cfg, scratch=True)
    assert (result.shards_written, result.shards_reused) == (SHARDS, 0)
    assert sorted(p.name for p in scratch.iterdir()) == ["job.json", "manifest.json"] + [
        f"part-{i:05d}.{ext}" for i in range(SHARDS) for ext in ("json", "parquet")]
    assert json.loads((scratch / "job.json").read_text())["identity"]["models"]["dense"]["max_seq_length"] == 16
    assert _snapshot(out) == before


def _state(job, tmp_path: Path, name: str) -> Path:
    """A copy of the finished job's folder (mtimes kept) to turn into one kill's leftovers."""
    out = tmp_path / name
    shutil.copytree(job["out"], out)
    return out


def _rerun(job, registry, out: Path, **compute):
    from raytrieve.inference.encode import run_encode

    cfg = _config(job["root"], job["root"] / "corpus.parquet", dense={"model": REGISTERED}, output_dir=str(out),
                  rows_per_shard=10)
    for key, value in compute.items():
        setattr(cfg.compute, key, value)
    with _registry_env(registry):
        return run_encode(cfg)


def _after_rerun(job, out: Path, before: dict[str, tuple[bytes, int]], reused: list[int]) -> None:
    """The folder holds exactly the job's files, no temporary; reused shards were not rewritten."""
    _check_vectors(job, out)
    assert sorted(p.name for p in out.iterdir()) == ["job.json", "manifest.json"] + [
        f"part-{i:05d}.{ext}" for i in range(SHARDS) for ext in ("json", "parquet")]
    after = _snapshot(out)
    for i in reused:
        for ext in ("parquet", "json"):
            assert after[f"part-{i:05d}.{ext}"] == before[f"part-{i:05d}.{ext}"]


@pytest.mark.slow
def test_each_kill_point_of_a_shard_write_and_damaged_sidecars_rerun_to_every_id_once(registered_job, registry,
                                                                                      tmp_path):
    """write_shard writes the parquet file under a temporary name, renames it, then the
    sidecar the same way; the driver writes the manifest after every shard. Each state a
    kill leaves is made exactly from a finished folder, then the job runs again."""
    job = registered_job
    manifest = json.loads((job["out"] / "manifest.json").read_text())

    # (a) Killed while writing shard 1's parquet file: only its temporary exists, half written.
    #     Shards finish out of order with several actors, so the later ones are already done.
    #     Besides, sidecars damaged four ways no longer vouch for their shards: not JSON,
    #     bytes that are no text, JSON but no object, another file's checksum.
    a = _state(job, tmp_path, "a")
    parquet = (a / "part-00001.parquet").read_bytes()
    for name in ("manifest.json", "part-00001.parquet", "part-00001.json"):
        (a / name).unlink()
    (a / ".part-00001.parquet.tmp-0a1b2c3d").write_bytes(parquet[: len(parquet) // 2])
    sidecar = json.loads((a / "part-00008.json").read_text())
    (a / "part-00005.json").write_bytes((a / "part-00005.json").read_bytes()[:-30])
    (a / "part-00006.json").write_bytes(b"\x89PNG\r\n\xff\xfe garbage")
    (a / "part-00007.json").write_text("[1, 2]")
    (a / "part-00008.json").write_text(json.dumps({**sidecar, "sha256": "0" * 64}))
    before = _snapshot(a)
    result = _rerun(job, registry, a)
    # The killed shard was never finished (missing, not changed); the damaged ones are named.
    assert (result.shards_written, result.shards_reused, result.shards_changed) == (5, 5, [5, 6, 7, 8])
    _after_rerun(job, a, before, reused=[0, 2, 3, 4, 9])
    assert json.loads((a / "part-00008.json").read_text())["sha256"] == sidecar["sha256"]

    # (b) Killed after shard 2's parquet rename, while its sidecar was being written; the
    #     later shards not started.
    b = _state(job, tmp_path, "b")
    sidecar = (b / "part-00002.json").read_bytes()
    for name in ["manifest.json", "part-00002.json"] + [f"part-{i:05d}.{ext}" for i in range(3, SHARDS)
                                                         for ext in ("parquet", "json")]:
        (b / name).unlink()
    (b / ".part-00002.json.tmp-4e5f6a7b").write_bytes(sidecar[:40])
    before = _snapshot(b)
    result = _rerun(job, registry, b)
    assert (result.shards_written, result.shards_reused, result.shards_changed) == (SHARDS - 2, 2, [])
    _after_rerun(job, b, before, reused=[0, 1])

    # (c) Killed after the last sidecar, before the manifest: nothing to encode, the manifest
    #     is written and says what the uninterrupted run said. Other compute settings (token
    #     budget, actors) do not make it another job: they change neither vectors nor plan.
    c = _state(job, tmp_path, "c")
    (c / "manifest.json").unlink()
    before = _snapshot(c)
    result = _rerun(job, registry, c, token_budget=512, tokenize_actors=2)
    assert (result.shards_written, result.shards_reused, result.already_complete) == (0, SHARDS, False)
    _after_rerun(job, c, before, reused=list(range(SHARDS)))
    rewritten = json.loads((c / "manifest.json").read_text())
    assert {k: v for k, v in rewritten.items() if k != "created"} == {k: v for k, v in manifest.items()
                                                                       if k != "created"}


class _RayStarted(Exception):
    """The job got past every check made before Ray: it would resume the folder."""


def _stop_where_ray_starts(monkeypatch) -> type[Exception]:
    import raytrieve.inference.encode as encode

    def start(*_a, **_k):
        raise _RayStarted

    monkeypatch.setattr(encode, "_init_ray", start)
    return _RayStarted


def test_a_folder_encoded_under_the_old_title_rule_is_refused_with_the_reason(tiny_models, tmp_path, monkeypatch):
    """Jobs before the title rule left out a row with a title and a blank text; resumed under the
    rule, their reused shards would lack those rows and new shards hold them. Such a folder (its
    job.json has no title_rule) is refused before Ray, naming why; without a title_column every
    row's text is what it was, and the folder resumes."""
    import raytrieve.inference.encode as encode
    from raytrieve.inference.encode_plan import calibration_sample, job_fingerprint, job_identity, resolve_outputs
    from raytrieve.inference.shards import JOB
    from raytrieve.data.sources import open_source, plan_shards

    RayStarted = _stop_where_ray_starts(monkeypatch)
    corpus = tmp_path / "corpus.parquet"
    _corpus(corpus, 30, bad=False, title=True)
    for title_column, refused in (("title", True), (None, False)):
        cfg = _config(tmp_path, corpus, output_dir=str(tmp_path / f"v-{title_column}"),
                      dense={"model": str(tiny_models["dense"])},
                      corpus={"path": str(corpus), "title_column": title_column})
        source = open_source(str(corpus), None, field="corpus.path")
        specs = plan_shards(source, cfg.rows_per_shard)
        identity = job_identity(cfg, source, resolve_outputs(cfg, calibration_sample(cfg, specs), "config")[1])
        assert ("title_rule" in identity) is refused
        old = {k: v for k, v in identity.items() if k != "title_rule"}  # job.json of a job before the rule
        out = Path(cfg.output_dir)
        out.mkdir()
        (out / JOB).write_text(json.dumps({"fingerprint": job_fingerprint(old), "identity": old}))
        if refused:
            with pytest.raises(ConfigError, match=r"holds the output of a different encoding job \(that job -> this "
                                                  r"one: title_rule: None -> 'the title alone when the text is "
                                                  r"blank'\); it left out rows with a title and a blank text"):
                encode.run_encode(cfg)
        else:
            with pytest.raises(RayStarted):  # past the folder's check: the job resumes
                encode.run_encode(cfg)


def test_a_changed_file_in_a_model_subfolder_is_another_job_and_older_folders_resume(tiny_models, tmp_path,
                                                                                    monkeypatch):
    """Every file under a model's folder keys the job by its content: a pooling config in
    1_Pooling/ changed since the job (other vectors) is refused before Ray, naming the model's
    weights and why; a copy or a fresh download of the same files (new mtimes: a job resumed on a
    new machine) resumes. Folders of earlier raytrieve versions, keyed by every file's mtime or
    by the top-level files only, still resume under the identity they were written with (so
    their shards are reused); a change their rule sees refuses them."""
    import raytrieve.inference.encode as encode
    from raytrieve.data.sources import open_source, plan_shards
    from raytrieve.inference import shards
    from raytrieve.inference.encode_plan import (calibration_sample, claim_output, job_fingerprint, job_identity,
                                                 older_identity_rules, resolve_outputs)

    RayStarted = _stop_where_ray_starts(monkeypatch)
    corpus = tmp_path / "corpus.parquet"
    _corpus(corpus, 30, bad=False)
    model = tmp_path / "model"
    shutil.copytree(tiny_models["dense"], model)
    cfg = _config(tmp_path, corpus, dense={"model": str(model)})
    out = Path(cfg.output_dir)
    source = open_source(str(corpus), None, field="corpus.path")
    described = resolve_outputs(cfg, calibration_sample(cfg, plan_shards(source, cfg.rows_per_shard)), "config")[1]

    def identity():
        return job_identity(cfg, source, resolve_outputs(cfg, calibration_sample(cfg, plan_shards(source, 10)),
                                                         "config")[1])

    def written_by(kept):
        out.mkdir(exist_ok=True)
        (out / shards.JOB).write_text(json.dumps({"fingerprint": job_fingerprint(kept), "identity": kept}))

    before = identity()
    written_by(before)
    (model / ".git").mkdir()
    (model / ".git" / "index").write_text("a clone's git state, which no model reads")
    with pytest.raises(RayStarted):  # the same model (hidden files aside): the job resumes
        encode.run_encode(cfg)
    pooling = model / "1_Pooling" / "config.json"
    settings = json.loads(pooling.read_text())
    assert settings["pooling_mode_mean_tokens"]
    settings.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    pooling.write_text(json.dumps(settings))
    now = identity()
    assert now["models"]["dense"]["weights"] != before["models"]["dense"]["weights"]
    with pytest.raises(ConfigError, match=r"holds the output of a different encoding job \(that job -> this one: "
                                          r"dense\.weights: .*\); a file under the model's folder was added, "
                                          r"removed or changed since that job; run it with that job's settings"):
        encode.run_encode(cfg)

    # An earlier raytrieve's folder, written before the pooling change: its key saw only the
    # top-level files, so it resumes, and this run takes on its identity (its shards' key).
    _, by_mtime, older = (kept for _, kept in older_identity_rules(before, described))
    assert len({before["models"]["dense"]["weights"], by_mtime["models"]["dense"]["weights"],
                older["models"]["dense"]["weights"]}) == 3
    written_by(older)
    assert claim_output(shards.OutputStore(str(out)), now, "config", described=described) == older
    with pytest.raises(RayStarted):
        encode.run_encode(cfg)
    # Another setting: the refusal names it, not the model's key (whose rule changed, not its files).
    shorter = _config(tmp_path, corpus, dense={"model": str(model), "max_seq_length": 16})
    with pytest.raises(ConfigError) as refused:
        encode.run_encode(shorter)
    assert "(that job -> this one: dense.max_seq_length: " in str(refused.value)
    assert "weights" not in str(refused.value) and "file under the model" not in str(refused.value)
    weights = model / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # replaced: a new mtime
    with pytest.raises(ConfigError, match=r"dense\.weights: "):  # its rule saw mtimes only
        encode.run_encode(cfg)

    # A folder keyed by every file's mtime (the rule before content) resumes as long as no mtime
    # moved; the rule it was written under is the identity this run takes on.
    by_mtime = dict(older_identity_rules(identity(), described))["every file's path, size and mtime"]
    written_by(by_mtime)
    assert claim_output(shards.OutputStore(str(out)), identity(), "config", described=described) == by_mtime

    # A fresh copy of the same files (every mtime new): that folder's rule sees a change, and the
    # refusal says why; under this rule it is the same model, and the job resumes.
    shutil.rmtree(model)
    time.sleep(0.01)
    shutil.copytree(tiny_models["dense"], model, copy_function=shutil.copyfile)  # new mtimes, no metadata
    pooling.write_text(json.dumps(settings))
    assert weights.stat().st_mtime_ns != stat.st_mtime_ns
    with pytest.raises(ConfigError, match=r"dense\.weights: .*that job keyed its models by their files' "
                                          r"modification times .*even by a copy of the same content"):
        encode.run_encode(cfg)
    written_by(identity())
    with pytest.raises(RayStarted):
        encode.run_encode(cfg)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor: the same size, other weights
    weights.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"dense\.weights: .*was added, removed or changed since that job"):
        encode.run_encode(cfg)


def test_a_job_folder_of_a_raytrieve_before_a_setting_resumes_while_it_is_at_its_default(tiny_models, tmp_path,
                                                                                        monkeypatch):
    """A corpus or job setting added since a folder was written (corpus.title_separator, say)
    refused that folder: a whole corpus to encode again after an upgrade. At its default it is
    no change, and the run takes on the folder's own identity (its shards' key); set otherwise,
    the refusal names it and not the settings left at their defaults."""
    import raytrieve.inference.encode as encode
    from raytrieve.data.sources import open_source, plan_shards
    from raytrieve.inference import shards
    from raytrieve.inference.encode_plan import (calibration_sample, claim_output, job_fingerprint, job_identity,
                                                 older_identity_rules, resolve_outputs)

    RayStarted = _stop_where_ray_starts(monkeypatch)
    corpus = tmp_path / "corpus.parquet"
    _corpus(corpus, 30, bad=False)
    cfg = _config(tmp_path, corpus, dense={"model": str(tiny_models["dense"])})
    out = Path(cfg.output_dir)
    source = open_source(str(corpus), None, field="corpus.path")
    described = resolve_outputs(cfg, calibration_sample(cfg, plan_shards(source, 10)), "c")[1]
    now = job_identity(cfg, source, described)

    def written_before(identity, *settings, config=None):
        kept = json.loads(json.dumps(identity))
        for name in settings:
            *path, key = name.split(".")
            owner = kept
            for part in path:
                owner = owner[part]
            del owner[key]
        out.mkdir(exist_ok=True)
        job = {"fingerprint": job_fingerprint(kept), "identity": kept, **({"config": config} if config else {})}
        (out / shards.JOB).write_text(json.dumps(job))
        return kept

    kept = written_before(now, "corpus.title_separator", "check_duplicate_ids")
    assert claim_output(shards.OutputStore(str(out)), now, "config", cfg=cfg) == kept
    keyed = []  # the job's shards are keyed by the folder's identity, so they are reused
    monkeypatch.setattr(encode, "job_fingerprint", lambda i: keyed.append(i) or job_fingerprint(i))
    with pytest.raises(RayStarted):
        encode.run_encode(cfg)
    assert keyed == [kept]
    # A setting the job's identity lacks but its kept config (job.json's "config") held was set
    # then: at another value it is a change, named with the value held; at the same, none.
    held = {"check_duplicate_ids": False, "corpus": {"title_separator": " | "}}
    written_before(now, "corpus.title_separator", "check_duplicate_ids", config=held)
    with pytest.raises(ConfigError, match=r"\(that job -> this one: check_duplicate_ids: False -> True; "
                                          r"corpus.title_separator: ' \| ' -> ' '\); run it"):
        encode.run_encode(cfg)
    kept = written_before(now, "check_duplicate_ids", config={**held, "check_duplicate_ids": True})
    assert claim_output(shards.OutputStore(str(out)), now, "config", cfg=cfg) == kept
    same = _config(tmp_path, corpus, dense={"model": str(tiny_models["dense"])}, check_duplicate_ids=False,
                   corpus={"path": str(corpus), "title_separator": " | "})
    same_now = job_identity(same, source, resolve_outputs(same, calibration_sample(same, plan_shards(source, 10)),
                                                          "c")[1])
    kept = written_before(same_now, "corpus.title_separator", "check_duplicate_ids", config=held)
    assert claim_output(shards.OutputStore(str(out)), same_now, "config", cfg=same) == kept  # not at defaults
    # Under an earlier weights rule too: the folder's identity, not this rule's.
    older = dict(older_identity_rules(now, described))["top-level files"]
    kept = written_before(older, "corpus.title_separator")
    assert claim_output(shards.OutputStore(str(out)), now, "config", cfg=cfg, described=described) == kept
    written_before(now, "corpus.title_separator", "check_duplicate_ids")
    with pytest.raises(ConfigError, match=r"\(that job -> this one: corpus.title_separator: None -> ' \| '\); run it"):
        encode.run_encode(_config(tmp_path, corpus, dense={"model": str(tiny_models["dense"])},
                                  corpus={"path": str(corpus), "title_separator": " | "}))
    with pytest.raises(ConfigError, match=r"\(that job -> this one: check_duplicate_ids: None -> False\); run it"):
        encode.run_encode(_config(tmp_path, corpus, dense={"model": str(tiny_models["dense"])},
                                  check_duplicate_ids=False))
    # Without cfg (the bare folder check) nothing is forgiven.
    with pytest.raises(ConfigError, match="holds the output of a different encoding job"):
        claim_output(shards.OutputStore(str(out)), now, "config")


def test_the_mtime_key_of_earlier_job_folders_is_unchanged(tmp_path):
    """Job folders written by earlier versions are keyed by ``assets.fingerprint`` and resume
    only while it gives what it gave them. Golden value from commit 8691269's code on this tree
    (fixed sizes and mtimes), whose names sort differently as path parts and as strings
    (``onnx/model.onnx`` before ``onnx.json``); the hidden ``.git`` is left out."""
    from raytrieve import assets

    files = {"modules.json": "[]", "onnx/model.onnx": "x" * 10, "onnx.json": "{}", "a b/x": "1", "a/x": "22",
             "1_Pooling/config.json": '{"p": 1}', ".git/index": "git", "checkpoint-500": "c"}
    for i, (name, text) in enumerate(sorted(files.items())):
        f = tmp_path / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
        os.utime(f, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000 + i * 1_000_001))
    assert assets.fingerprint(tmp_path) == "09b6a63460c2"
    before = assets.content_fingerprint(tmp_path)
    for f in tmp_path.rglob("*"):
        if f.is_file():
            os.utime(f, ns=(1_800_000_000_000_000_000, 1_800_000_000_000_000_000))
    assert assets.fingerprint(tmp_path) != "09b6a63460c2"
    assert assets.content_fingerprint(tmp_path) == before  # content keys ignore mtimes
    (tmp_path / "onnx.json").write_text("{ }")
    assert assets.content_fingerprint(tmp_path) != before
    (tmp_path / ".git" / "index").write_text("moved on")
    (tmp_path / "onnx.json").write_text("{}")
    assert assets.content_fingerprint(tmp_path) == before


def test_a_model_of_another_kind_is_refused_before_ray(tiny_models, tiny_dirs, tmp_path, monkeypatch):
    """A dense model under sparse: was encoded as 384 'active terms' (rc 0); a cross-encoder under
    dense: failed in every actor with KeyError 'sentence_embedding', and its folder then refused
    the corrected rerun. Both are refused before Ray, naming the key; nothing is written."""
    import raytrieve.inference.encode as encode

    monkeypatch.setattr(encode, "_init_ray", lambda *a, **k: pytest.fail("Ray started before the check"))
    corpus = tmp_path / "corpus.parquet"
    _corpus(corpus, 10, bad=False)
    cases = [({"sparse": {"model": str(tiny_models["dense"])}},
              r"^config.sparse.model: .*dense is a dense model \(SentenceTransformer, .*\); name a sparse model there"),
             ({"dense": {"model": str(tiny_models["cross"])}},
              r"^config.dense.model: .*cross is a cross model .*; name a dense model there")]
    for change, message in cases:
        with pytest.raises(ConfigError, match=message):
            encode.run_encode(_config(tmp_path, corpus, **change))
    assert not (tmp_path / "vectors").exists()


def test_a_column_of_the_wrong_type_and_an_empty_file_are_refused_before_ray(tiny_models, tmp_path, monkeypatch):
    """A parquet corpus whose text column held integers ran ~20 s on the cluster and ended in a
    Ray traceback with the reason inside (found by helper-83's trial); an empty jsonl said "no
    column 'id' for the id; the file has []". The first file's schema (metadata, or its first
    lines) is checked before Ray, naming the column and the fix, as each shard's reader checks its
    rows; integer ids and a column of nulls still pass."""
    import json

    import raytrieve.inference.encode as encode

    monkeypatch.setattr(encode, "_init_ray", lambda *a, **k: pytest.fail("Ray started before the check"))
    dense = {"model": str(tiny_models["dense"])}
    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": [1, 2]}), ints)
    with pytest.raises(DataError, match=r"ints.parquet: column 'text' \(text\) holds int64, expected strings; conv"):
        encode.run_encode(_config(tmp_path, ints, dense=dense))
    titled = tmp_path / "titled.jsonl"
    titled.write_text("".join(json.dumps({"id": i, "text": "t", "title": 0.5}) + "\n" for i in range(3)))
    with pytest.raises(DataError, match=r"column 'title' \(title\) holds double, expected strings"):
        encode.run_encode(_config(tmp_path, titled, dense=dense,
                                  corpus={"path": str(titled), "title_column": "title"}))
    broken = tmp_path / "broken.jsonl"  # line 8 of the file, pyarrow's "row 7" of what it parsed
    broken.write_text("".join(json.dumps({"id": str(i), "text": "t"}) + "\n" for i in range(7)) + '{"id": "7", "text": "x}\n')
    with pytest.raises(DataError, match=r"broken.jsonl: cannot read it as jsonl \(line 8 is not JSON \(.*\)\); check the "
                                        r"file, or set the format: key if it is of another format"):
        encode.run_encode(_config(tmp_path, broken, dense=dense))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty.jsonl: has no rows \(empty\); fix corpus.path"):
        encode.run_encode(_config(tmp_path, empty, dense=dense))
    parts = tmp_path / "parts"  # a Spark job's folder: an empty first part, rows in the next
    parts.mkdir()
    (parts / "part-00000.jsonl").write_text("")
    (parts / "part-00001.jsonl").write_text(json.dumps({"id": "a", "text": "t"}) + "\n")
    with pytest.raises(pytest.fail.Exception, match="Ray started"):
        encode.run_encode(_config(tmp_path, parts, dense=dense, corpus={"path": str(parts), "format": "jsonl"}))
    # A folder is read with its subfolders: a stray file there (a model's config.json) is the one
    # named, not only the folder ("the file has [...]" named the folder alone).
    stray = tmp_path / "stray"
    (stray / "ce_saved").mkdir(parents=True)
    (stray / "ce_saved" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}) + "\n")
    with pytest.raises(DataError, match=rf"{stray} \(its file {stray}/ce_saved/config.json\): no column 'id' for the "
                                        r"id; the file has \['architectures'\]"):
        encode.run_encode(_config(tmp_path, stray, dense=dense, corpus={"path": str(stray), "format": "jsonl"}))
    fine = tmp_path / "fine.parquet"  # integer ids, a title column of nulls: read as text
    pq.write_table(pa.table({"id": [1, 2], "text": ["x", "y"], "title": pa.nulls(2)}), fine)
    with pytest.raises(pytest.fail.Exception, match="Ray started"):
        encode.run_encode(_config(tmp_path, fine, dense=dense, corpus={"path": str(fine), "title_column": "title"}))
    assert not (tmp_path / "vectors").exists()


def test_bytes_that_are_not_utf8_are_named_with_the_file_and_the_fix(tmp_path):
    """pyarrow's jsonl reader keeps a latin-1 byte as it is; turning the column into Python text
    raised a bare UnicodeDecodeError on the worker, naming no file."""
    from raytrieve.data import formats
    from raytrieve.inference.config import CorpusConfig
    from raytrieve.inference.corpus import shard_rows

    table = formats.get("jsonl").parse(b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "caf\xe9"}\n', b"")
    with pytest.raises(DataError, match=r"^x.jsonl: column 'text' \(text\) holds bytes that are not UTF-8 \(unexpected "
                                        r"end of data at byte 3 of a value: b'caf\\xe9'\); save the file as UTF-8"):
        shard_rows(table, CorpusConfig(path="x.jsonl"), "x.jsonl")


def test_the_duplicate_check_counts_a_title_only_row_as_the_encoding_does(tmp_path):
    """A row with a title and a blank text is encoded (its title alone), but the duplicate check
    read only the id and text columns and saw it as a bad row: an id it shared with another row
    passed the check, the job wrote both, and `index build` refused the folder afterwards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raytrieve.data.sources import open_source, plan_shards
    from raytrieve.inference.config import CorpusConfig
    from raytrieve.inference.stages import shard_ids

    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ["x", "x", "y"], "text": ["", "hello", "   "], "title": ["T", None, None]}), path)
    corpus = CorpusConfig(path=str(path), title_column="title")
    specs = plan_shards(open_source(str(path), None, field="corpus.path"), 10)
    found = shard_ids(pa.Table.from_pylist([s.as_row() for s in specs]), corpus)
    assert found.column("id").to_pylist() == ["x", "x"]  # y: a blank text and no title, a bad row
    assert [p & 0xFFFFFFFF for p in found.column("pos").to_pylist()] == [0, 1]


def test_the_duplicate_summary_counts_every_block_and_lists_the_earliest_last_rows():
    """The duplicate table stays on the cluster in blocks; the task that summarizes it for the
    driver must count all of them and pick the ids whose last row comes first across blocks,
    the order a `bad_rows: fail` error lists rows in. Reference: the whole table at once."""
    from raytrieve.inference.checks import _summarize

    rng = np.random.default_rng(7)
    n_ids = 200
    counts = rng.integers(2, 6, n_ids)
    lasts = rng.choice(np.arange(10 * n_ids), n_ids, replace=False)  # each id's last row: distinct
    firsts = lasts - rng.integers(1, 5, n_ids)
    ids = [f"doc-{i}" for i in range(n_ids)]
    table = pa.table({"id": ids, "count": counts, "first": firsts, "last": lasts})
    cuts = sorted(rng.choice(np.arange(1, n_ids), 6, replace=False).tolist())
    blocks = [table.slice(a, b - a) for a, b in zip([0, *cuts], [*cuts, n_ids])] + [table.slice(0, 0)]

    got_ids, got_extra, got_examples = _summarize(5, *blocks)
    order = np.argsort(lasts)[:5]
    assert got_ids == n_ids
    assert got_extra == int((counts - 1).sum())
    assert got_examples == [(ids[i], int(lasts[i]), int(firsts[i])) for i in order]
    assert _summarize(5) == (0, 0, [])


def test_bad_rows_are_numbered_by_their_row_in_the_whole_input_across_shards(tmp_path):
    """`bad_rows: fail` names the first bad rows by their row in the whole input, and each
    repeated id by its last row and the row that keeps it, which may lie shards before. The
    shards' own pieces (scan, ids, summary) run here without Ray; the reference reads the
    corpus as one list of rows."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from raytrieve.data.sources import open_source, plan_shards
    from raytrieve.inference.checks import Duplicates, ScanResult, _summarize, combine_scans, first_bad_rows
    from raytrieve.inference.encode import EXAMPLES
    from raytrieve.inference.config import EncodeConfig
    from raytrieve.inference.stages import scan_shards, shard_ids

    rng = np.random.default_rng(3)
    n = 47
    ids = [f"d{i}" for i in range(n)]
    texts = [f"text {i}" for i in range(n)]
    for row in rng.choice(n, 5, replace=False):
        texts[row] = rng.choice([None, "", "  "])
    ids[int(rng.integers(n))] = None
    for row in range(1, 8):  # more bad rows in one shard than a shard's summary lists (EXAMPLES)
        texts[row] = ""
    for row in rng.choice(np.arange(15, n), 8, replace=False):
        ids[row] = ids[int(rng.integers(0, 12))]  # repeats of ids from the first shards
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string())}), path)
    cfg = EncodeConfig.model_validate({"corpus": {"path": str(path)}, "output_dir": str(tmp_path / "out"),
                                       "dense": {"model": "unused"}, "bad_rows": "fail"})
    specs = plan_shards(open_source(str(path), None, field="corpus.path"), 10)
    assert len(specs) == 5

    def shard_table(fn, spec):
        return fn(pa.Table.from_pylist([spec.as_row()]), cfg.corpus)

    scanned = combine_scans([r for spec in specs for r in shard_table(scan_shards, spec).to_pylist()])
    valid = pa.concat_tables([shard_table(shard_ids, spec) for spec in specs])
    grouped = valid.group_by("id").aggregate([("pos", "count"), ("pos", "min"), ("pos", "max")])
    grouped = grouped.rename_columns(["id", "count", "first", "last"]).filter(pc.greater(grouped["pos_count"], 1))
    n_ids, extra, examples = _summarize(100, grouped)
    duplicates = Duplicates(n_ids, extra, examples)
    got = first_bad_rows(scanned, duplicates, cfg, EXAMPLES)  # as the job names them
    everything = first_bad_rows(ScanResult(n, 0, scanned.offsets, []), duplicates, cfg, 100)

    expected, seen = [], {}
    for row, (id_, text) in enumerate(zip(ids, texts)):
        if id_ is None:
            expected.append((row, None, "null id"))
        elif text is None:
            expected.append((row, id_, "null text"))
        elif not text.strip():
            expected.append((row, id_, "empty text"))
        elif id_ in seen:
            last = max(r for r, i in enumerate(ids) if i == id_ and texts[r] is not None and texts[r].strip())
            if row == last:
                expected.append((row, id_, f"duplicate id (row {seen[id_]} has it first)"))
        else:
            seen[id_] = row
    assert got == expected[:EXAMPLES] and len({r // 10 for r, _, _ in expected}) > 1
    assert everything == [e for e in expected if e[2].startswith("duplicate")]  # every repeated id, by its rows
    assert any(int(w.split("row ")[1].split(" ")[0]) < 10 <= r for r, _, w in everything)
    listed = [e for e in expected if not e[2].startswith("duplicate")]
    assert scanned.examples == [e for e in listed if sum(f[0] // 10 == e[0] // 10 for f in listed if f < e) < EXAMPLES]
    assert scanned.input_rows == n and scanned.bad + extra == sum(
        1 for r, (i, t) in enumerate(zip(ids, texts)) if i is None or t is None or not t.strip() or seen.get(i, r) != r)


def test_a_converted_variant_is_the_same_model_under_other_library_versions(tmp_path, monkeypatch):
    """A shipped variant converted on first use (splade-tiny) writes files that record the
    library versions that converted it. The job keys it by its source instead: converted again
    under other versions (another machine's cache), it is the same model and the job resumes.
    A folder keyed by the converted files (the rule before) resumes where that copy is kept, and
    is told apart elsewhere; the variant's key is never a folder's own content key, so the raw
    source folder given as a path (another model: no SPLADE stack) is neither that job nor made
    those vectors."""
    import raytrieve.inference.encode as encode
    from raytrieve import assets
    from raytrieve.data.sources import open_source, plan_shards
    from raytrieve.inference import shards
    from raytrieve.inference.encode_plan import (calibration_sample, claim_output, job_fingerprint, job_identity,
                                                 older_identity_rules, resolve_outputs)

    RayStarted = _stop_where_ray_starts(monkeypatch)
    corpus = tmp_path / "corpus.parquet"
    _corpus(corpus, 30, bad=False)
    cfg = _config(tmp_path, corpus, sparse={"model": "splade-tiny"})
    out = Path(cfg.output_dir)
    source = open_source(str(corpus), None, field="corpus.path")

    def on_machine(cache: str) -> tuple[dict, dict]:
        monkeypatch.setenv("RAYTRIEVE_CACHE", str(tmp_path / cache))
        described = resolve_outputs(cfg, calibration_sample(cfg, plan_shards(source, 10)), "config")[1]
        return job_identity(cfg, source, described), described

    def written_by(kept):
        out.mkdir(exist_ok=True)
        (out / shards.JOB).write_text(json.dumps({"fingerprint": job_fingerprint(kept), "identity": kept}))

    first, described_a = on_machine("cache-a")
    converted_a = Path(described_a["sparse"]["model_path"])
    assert converted_a.is_relative_to(tmp_path / "cache-a")
    # Machine B converts the same source under other library versions: its files record them.
    monkeypatch.setenv("RAYTRIEVE_CACHE", str(tmp_path / "cache-b"))
    from raytrieve.model_ref import resolve_model

    converted_b = resolve_model("splade-tiny")
    config = json.loads((converted_b / "config.json").read_text())
    assert config["transformers_version"]
    (converted_b / "config.json").write_text(json.dumps({**config, "transformers_version": "4.0.0"}))
    assert assets.content_fingerprint(converted_b) != assets.content_fingerprint(converted_a)
    second, described_b = on_machine("cache-b")
    assert second == first and described_b["sparse"]["weights"] == described_a["sparse"]["weights"]
    written_by(first)
    with pytest.raises(RayStarted):  # resumed on machine B: the same job
        encode.run_encode(cfg)

    # The rule before: keyed by the converted files. On machine A (its copy) it resumes under its
    # own identity (its shards' key); on machine B the converted files differ, and it is refused.
    previous = dict(older_identity_rules(first, described_a))["a converted variant's files by their content"]
    assert previous["models"]["sparse"]["weights"] == assets.content_fingerprint(converted_a)
    written_by(previous)
    with pytest.raises(ConfigError, match=r"sparse\.weights: .*was added, removed or changed since that job"):
        encode.run_encode(cfg)
    monkeypatch.setenv("RAYTRIEVE_CACHE", str(tmp_path / "cache-a"))
    # What the rule before wrote: this identity with the converted files' content as the key.
    assert previous == {**first, "models": {"sparse": {**first["models"]["sparse"],
                                                       "weights": assets.content_fingerprint(converted_a)}}}
    assert claim_output(shards.OutputStore(str(out)), first, "config", described=described_a) == previous
    with pytest.raises(RayStarted):
        encode.run_encode(cfg)
    # Another setting against that folder: the refusal names the setting, not the model's key
    # (whose rule changed, not its files).
    with pytest.raises(ConfigError) as refused:
        encode.run_encode(_config(tmp_path, corpus, sparse={"model": "splade-tiny", "max_seq_length": 16}))
    assert "(that job -> this one: sparse.max_seq_length: " in str(refused.value)
    assert "weights" not in str(refused.value) and "file under the model" not in str(refused.value)
    # The same for a folder of the rule before that, which also kept the model's local folder:
    # the cache folder as it was named then (the source's top-level files alone).
    local = dict(older_identity_rules(first, described_a))["their content and local folder"]
    top = assets.top_level_fingerprint(assets.package_dir(assets.get_variant("splade-tiny").source))
    assert local["models"]["sparse"]["model_path"] == str(tmp_path / "cache-a" / "models" / f"splade-tiny-{top}")
    written_by(local)
    with pytest.raises(RayStarted):
        encode.run_encode(cfg)
    with pytest.raises(ConfigError) as refused:
        encode.run_encode(_config(tmp_path, corpus, sparse={"model": "splade-tiny", "max_seq_length": 16}))
    assert "(that job -> this one: sparse.max_seq_length: " in str(refused.value)
    assert not any(word in str(refused.value) for word in ("weights", "model_path", "file under the model"))
    # A folder an earlier version wrote, by hand: its conversion kept under the cache folder's
    # name of then (converted under other library versions than today's copy), the job keyed by
    # that copy's content, with and without its local folder: both resume on this machine.
    legacy = tmp_path / "cache-a" / "models" / f"splade-tiny-{top}"
    shutil.copytree(converted_a, legacy)
    config = json.loads((legacy / "config.json").read_text())
    (legacy / "config.json").write_text(json.dumps({**config, "transformers_version": "4.1.0"}))
    legacy_key = assets.content_fingerprint(legacy)
    assert legacy_key != assets.content_fingerprint(converted_a)
    by_then = {**first["models"]["sparse"], "weights": legacy_key}
    for model in (by_then, {**by_then, "model": "splade-tiny", "model_path": str(legacy)}):
        written_by({**first, "models": {"sparse": model}})
        os.utime(legacy, (1, 1))
        with pytest.raises(RayStarted):
            encode.run_encode(cfg)
        # The copy was used to key that job: `raytrieve cache prune` must not take it from the folder.
        assert legacy.stat().st_mtime > 1

    # The raw source folder, given as a path, is another model: another job, and not the maker.
    raw = assets.package_dir(assets.get_variant("splade-tiny").source)
    written_by(first)
    with pytest.raises(ConfigError, match=r"sparse\.model: 'splade-tiny' -> '.*'; sparse\.weights: "):
        encode.run_encode(_config(tmp_path, corpus, sparse={"model": str(raw)}))
    made = shards.SparseInfo.model_validate({**described_a["sparse"], "dtypes_used": ["float32"]})
    assert made.made_by("splade-tiny", converted_b)  # by name, whatever the converted files record
    copy = tmp_path / "copy"
    shutil.copytree(converted_b, copy)
    assert made.made_by(str(copy), copy)  # a copy of the converted weights, by path
    assert not made.made_by(str(raw), raw)
    # Made on another machine (its converted folder not here): this machine's conversion decides.
    elsewhere = made.model_copy(update={"model_path": str(tmp_path / "other-machine" / "splade-tiny")})
    assert elsewhere.made_by(str(copy), copy) and not elsewhere.made_by(str(raw), raw)
    # A manifest of the rule before (the converted files' content): a copy still passes here.
    before = made.model_copy(update={"weights": assets.content_fingerprint(converted_a)})
    assert before.made_by(str(copy), copy) and not before.made_by(str(raw), raw)
    # A machine that cannot make the variant (its package is not installed) refuses, not raises.
    monkeypatch.setattr(assets, "package_dir", lambda source: (_ for _ in ()).throw(
        assets.AssetError(f"package {source.package!r} is not installed")))
    assert not elsewhere.made_by(str(copy), copy)
