"""The encoding job's manifest.json as a typed VectorsManifest, without Ray: what the job writes
reads back key for key, folders of older versions still read (their missing keys get defaults,
nothing is filled in when they are copied), and a malformed manifest is refused naming the
file, the key and the fix. Index folders keep the same manifest as source.json."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest

from raytrieve.errors import DataError, InputError
from raytrieve.index.build import build_indices, load_indices
from raytrieve.inference import shards
from raytrieve.inference.config import CorpusConfig
from raytrieve.inference.shards import read_manifest, read_vectors

DENSE = {
    "model": "minilm-l6",
    "model_path": "/models/minilm",
    "prompt": None,
    "max_seq_length": 128,
    "similarity": "cosine",
    "dtype": "auto",
    "weights": "0123456789abcdef",
    "dim": 4,
    "precision": "float32",
    "truncate_dim": None,
    "normalize": True,
    "ranges": None,
    "dtypes_used": ["bfloat16"],
}
SPARSE = {
    "model": "splade-tiny",
    "model_path": "/models/splade",
    "prompt": "query: ",
    "max_seq_length": 64,
    "similarity": "dot",
    "dtype": "float32",
    "vocab_size": 30522,
    "max_active_dims": None,
    "dtypes_used": ["float32"],
}


def _written(rows: list[int], dense: dict | None = DENSE) -> dict:
    """A manifest as the job writes it today (version 2), keys in its order (a fresh copy)."""
    return copy.deepcopy({
        "format": "raytrieve-vectors",
        "version": 2,
        "fingerprint": "0123456789abcdef",
        "corpus": {
            "path": "/data/corpus.parquet",
            "format": "parquet",
            "files": 1,
            "input_rows": sum(rows) + 1,
            "bad_rows": 1,
            "duplicate_ids": 0,
            "id_column": "doc_id",
            "text_column": "body",
            "title_column": "title",
            "title_separator": ": ",
        },
        "rows": sum(rows),
        "side": "document",
        **({"dense": dense} if dense is not None else {}),
        "sparse": SPARSE,
        "shards": [
            {"file": f"part-{i:05d}.parquet", "rows": n, "input_rows": n + (i == 0), "sha256": "ab" * 32,
             "checksum": f"c{i}"}
            for i, n in enumerate(rows)
        ],
        "created": "2026-11-30T12:00:00Z",
    })


# Version 1 (before shards were planned from file metadata): no corpus format, files,
# duplicate_ids or title settings, no shard input_rows or checksum, no dtype keys.
VERSION_1 = {
    "format": "raytrieve-vectors",
    "version": 1,
    "fingerprint": "fedcba9876543210",
    "corpus": {"path": "/data/old.jsonl", "input_rows": 10, "bad_rows": 0, "id_column": "id", "text_column": "text"},
    "rows": 10,
    "side": "query",
    "dense": {k: v for k, v in DENSE.items() if k not in ("dtype", "dtypes_used")},
    "shards": [{"file": "part-00000.parquet", "rows": 10, "sha256": "cd" * 32}],
    "created": "2026-11-23T08:00:00Z",
}


def _folder(tmp_path: Path, manifest: dict) -> Path:
    out = tmp_path / "vectors"
    out.mkdir(exist_ok=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def test_written_manifest_reads_typed_and_round_trips_key_for_key(tmp_path):
    raw = _written([3, 2])
    m = read_manifest(_folder(tmp_path, raw))
    assert (m.version, m.rows, m.side, m.created) == (2, 5, "document", "2026-11-30T12:00:00Z")
    assert m.dense is not None and m.dense.dtypes_used == ["bfloat16"] and m.dense.normalize is True
    assert m.sparse is not None and m.sparse.vocab_size == 30522 and m.sparse.prompt == "query: "
    assert m.output("dense") is m.dense and m.output("sparse") is m.sparse
    assert [(s.file, s.rows, s.input_rows, s.checksum) for s in m.shards] == [
        ("part-00000.parquet", 3, 4, "c0"), ("part-00001.parquet", 2, 2, "c1")]
    assert m.corpus.config() == CorpusConfig(path="/data/corpus.parquet", format="parquet", id_column="doc_id",
                                             text_column="body", title_column="title", title_separator=": ")
    # Written again, it is the same JSON, keys in the same order (what `index build` copies).
    assert json.dumps(m.to_json(), indent=2) == json.dumps(raw, indent=2)


def test_version_1_manifest_reads_with_defaults_and_copies_unchanged(tmp_path):
    m = read_manifest(_folder(tmp_path, VERSION_1))
    assert m.corpus.format is None and m.corpus.files is None and m.corpus.duplicate_ids is None
    assert m.corpus.config() == CorpusConfig(path="/data/old.jsonl")  # the config's own defaults
    assert m.shards[0].input_rows is None and m.shards[0].checksum is None
    assert m.dense is not None and m.dense.dtype == "float32" and m.dense.dtypes_used == []  # computed in float32
    assert m.sparse is None and m.output("sparse") is None
    assert m.to_json() == VERSION_1  # no default is written into a copy


def test_keys_of_a_newer_version_are_kept():
    raw = _written([1])
    raw["corpus"]["encoding"] = "utf-8"
    raw["lineage"] = {"run": "abc"}
    m = shards.parse_manifest(copy.deepcopy(raw), "manifest.json", "fix")
    assert m.to_json() == raw


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda m: m["corpus"].pop("path"), "manifest.json.corpus: missing required key 'path'"),
        (lambda m: m.pop("rows"), "manifest.json: missing required key 'rows'"),
        (lambda m: m.update(rows="5"), "manifest.json.rows: expected an integer, got '5'"),
        (lambda m: m["shards"][1].update(sha256=None), "manifest.json.shards[1].sha256: expected a string, got None"),
        (lambda m: m["corpus"].update(format="xml"), "manifest.json.corpus.format: 'xml' is not one of"),
        (lambda m: m["sparse"].update(vocab_size=1.5), "manifest.json.sparse.vocab_size: expected an integer"),
        (lambda m: m.update(shards={"file": "x"}), "manifest.json.shards: expected a list"),
    ],
)
def test_malformed_manifest_names_the_file_the_key_and_the_fix(tmp_path, change, named):
    raw = _written([3, 2])
    change(raw)
    out = _folder(tmp_path, raw)
    with pytest.raises(DataError) as e:
        read_manifest(out)
    assert str(e.value).startswith(str(out / "manifest.json"))
    assert named in str(e.value) and "run the encoding job again" in str(e.value)


@pytest.mark.parametrize("raw", [[1, 2], {"format": "other"}, {"version": 2}])
def test_other_json_is_not_a_manifest(tmp_path, raw):
    with pytest.raises(DataError, match=r"manifest\.json: not a raytrieve encoding job manifest .*run the encoding"):
        read_manifest(_folder(tmp_path, raw))


def test_manifest_that_is_no_json_or_missing_and_the_folder_it_is_missing_from(tmp_path):
    out = _folder(tmp_path, {})
    (out / "manifest.json").write_text('{"format": "raytrieve-vectors", ')
    with pytest.raises(DataError, match=r"manifest\.json: not valid JSON"):
        read_manifest(out)
    (out / "manifest.json").unlink()
    # A folder no encoding job started in is not called unfinished (resuming would not help).
    with pytest.raises(DataError, match=r"vectors: not an encoding job's output \(no manifest\.json or job\.json\)"):
        read_manifest(out)
    with pytest.raises(DataError, match=r"elsewhere: no such folder; give the output folder of an encoding job"):
        read_manifest(tmp_path / "elsewhere")
    (out / "job.json").write_text("{}")  # the job started there and did not finish
    with pytest.raises(DataError, match=r"no manifest\.json; the encoding job has not finished there \(run it again"):
        read_manifest(out)


def _encoded(tmp_path: Path, dense: dict | None = DENSE) -> tuple[Path, np.ndarray]:
    """A finished job's folder made by hand: one shard of dense and sparse vectors + manifest."""
    store = shards.OutputStore(str(tmp_path / "vectors"))
    vectors = np.eye(3, 4, dtype=np.float32)
    sparse = (np.array([0, 1, 3, 4]), np.array([5, 1, 7, 2]), np.array([0.5, 1.0, 2.0, 0.25], dtype=np.float32))
    table = shards.shard_table(["a", "b", "c"], vectors, sparse, np.array([11, 12, 13]))
    sidecar = shards.write_shard(store, 0, table, {"input_rows": 3, "bad_rows": []})
    raw = _written([3], dense)
    raw["shards"][0].update(sha256=sidecar["sha256"], input_rows=3)
    store.write_json(shards.MANIFEST, raw)
    return Path(store.location), vectors


def test_read_vectors_and_index_build_carry_the_typed_manifest(tmp_path):
    out, vectors = _encoded(tmp_path)
    v = read_vectors(out)
    assert v.manifest == read_manifest(out) and v.ids == ["a", "b", "c"]
    np.testing.assert_array_equal(v.dense, vectors)
    build_indices(out, tmp_path / "index", texts=False)  # a job made by hand, without its corpus
    indices = load_indices(tmp_path / "index")
    assert indices.source == v.manifest and indices.sparse is not None and indices.sparse.vocab_size == 30522
    copied = json.loads((tmp_path / "index" / "source.json").read_text())
    assert copied == json.loads((out / "manifest.json").read_text())


def test_index_build_replaces_an_index_and_refuses_anything_else(tmp_path):
    """`index build --out` replaces its folder whole: an earlier index there, yes; a folder of
    other files or a file, never (they were lost, and the folder became mode 0700)."""
    import os
    import stat

    out, _ = _encoded(tmp_path)
    index = tmp_path / "index"
    build_indices(out, index, texts=False)  # a job made by hand, without its corpus
    build_indices(out, index, texts=False)  # an earlier index is replaced
    assert stat.S_IMODE(index.stat().st_mode) == 0o777 & ~_umask()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match=r"--out .*data: the folder holds other files \(keep\.txt\); .*new or empty"):
        build_indices(out, tmp_path / "data", texts=False)
    assert (tmp_path / "data" / "keep.txt").read_text() == "mine"
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(DataError, match=r"--out .*a-file: is a file; give a folder"):
        build_indices(out, tmp_path / "a-file", texts=False)
    assert (tmp_path / "a-file").read_text() == "mine" and not os.path.isdir(tmp_path / "a-file")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_vectors_the_manifest_does_not_describe_are_refused(tmp_path):
    out, _ = _encoded(tmp_path, dense=None)
    with pytest.raises(DataError, match=r"the shards hold dense vectors, manifest\.json has no 'dense' part"):
        read_vectors(out)


def test_malformed_source_json_of_an_index_folder(tmp_path):
    (tmp_path / "index").mkdir()
    raw = _written([1])
    del raw["corpus"]["text_column"]
    (tmp_path / "index" / "source.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"source\.json\.corpus: missing required key 'text_column'.*index build"):
        load_indices(tmp_path / "index")
    # A folder that is not there is said so ("no source.json; not an index folder" misled).
    with pytest.raises(DataError, match=r"nope: no such folder; give an index folder"):
        load_indices(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no source.json; not an index folder"):
        load_indices(tmp_path / "empty")


def test_index_build_refuses_what_the_manifest_and_options_decide_before_reading_a_shard(tmp_path, monkeypatch):
    """Options, vector precision and the model's similarity were found only after every shard was
    read and verified (minutes and gigabytes on a large corpus). Euclidean vectors were indexed
    as dot products, which order vectors of unequal length otherwise: refused now."""
    import raytrieve.inference.shards as shards_module
    from raytrieve.index.build import IndexOptions

    out, _ = _encoded(tmp_path)
    monkeypatch.setattr(shards_module, "read_vectors", lambda *a, **k: pytest.fail("the shards were read"))
    refused = [
        (IndexOptions(quantize="int8", backend="faiss"), InputError, r"quantize int8 works with the exact backend only \(FAISS"),
        (IndexOptions(faiss_params={"nlist": 4}), InputError, r"faiss_params \(--faiss-param\) only applies with backend='faiss' \(--backend faiss\)"),
        (IndexOptions(backend="faiss", faiss_index="ivf", faiss_params={"nprobes": 2}), InputError,
         r"faiss_params \(--faiss-param\): unknown key\(s\) \['nprobes'\]"),
        (IndexOptions(quantize="int4"), InputError, "quantize"),
    ]
    for options, error, message in refused:
        with pytest.raises(error, match=message):
            build_indices(out, tmp_path / "index", options)
    for similarity in ("euclidean", "manhattan"):
        raw = json.loads((out / "manifest.json").read_text())
        raw["dense"]["similarity"] = similarity
        (out / "manifest.json").write_text(json.dumps(raw))
        with pytest.raises(DataError, match=rf"vectors \(dense.similarity\): the model's similarity is '{similarity}'; "
                                            r"an index ranks by cosine or dot product only"):
            build_indices(out, tmp_path / "index")
    assert not (tmp_path / "index").exists()


def test_the_model_that_made_vectors_is_known_by_its_files_wherever_they_are(tiny_models, tmp_path):
    """Serve, evaluate and mining accept a model for vectors when it made them
    (``ModelInfo.made_by``): the job's files by content at any path (another machine, another
    cache), or a registered copy whose weights equal the job's folder's, found unchanged. The
    same reference with other files (a model trained again into its folder) is refused, and so
    is another model; a manifest from before the content was recorded goes by reference,
    folder or equal weights, as it did."""
    import shutil

    from raytrieve.assets import content_fingerprint

    job = tmp_path / "job-model"
    shutil.copytree(tiny_models["dense"], job)
    made = shards.DenseInfo.model_validate({**DENSE, "model": "s3://K:S@b/m?region=x", "model_path": str(job),
                                            "weights": content_fingerprint(job)})
    elsewhere = tmp_path / "cache" / "copy"
    shutil.copytree(job, elsewhere)
    assert made.made_by("s3://b/m?region=x", elsewhere) and made.made_by("anything", elsewhere)
    job.rename(tmp_path / "away")  # on another machine: the job's folder is not here, its content decides
    assert made.made_by("anything", elsewhere)
    (tmp_path / "away").rename(job)
    registered = tmp_path / "registered"
    shutil.copytree(job, registered)
    (registered / "README.md").write_text("# a card the registry wrote\n")
    assert made.made_by("models:/m/1", registered)  # equal weights, and the job's folder is here unchanged
    other = tmp_path / "other"
    shutil.copytree(tiny_models["dense"], other)
    weights = other / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert not made.made_by("s3://b/m?region=x", other) and made.not_made_by("x") == ""
    # Trained again into the job's own folder: the same reference and path, other files.
    shutil.copyfile(weights, job / "model.safetensors")
    assert not made.made_by("s3://K:S@b/m?region=x", job)
    assert "with other files under that name" in made.not_made_by("s3://b/m?region=x")
    assert not made.made_by("models:/m/1", registered)  # the job's folder no longer has the job's files

    before = {k: v for k, v in DENSE.items() if k != "weights"}  # a manifest from before the content was recorded
    older = shards.DenseInfo.model_validate({**before, "model": "minilm", "model_path": str(tmp_path / "gone")})
    assert older.weights is None
    assert older.made_by("minilm", other)  # by reference, as before the content was recorded
    assert not older.made_by("elsewhere", other)
    assert "is not on this machine, so its weights cannot be compared" in older.not_made_by("elsewhere")
    older = shards.DenseInfo.model_validate({**before, "model": "minilm", "model_path": str(registered)})
    assert older.made_by("models:/m/1", registered) and older.made_by("models:/m/1", elsewhere)  # folder; weights
    assert not older.made_by("models:/m/1", job)  # trained again: other weights
    # A shipped variant by its name: its converted copy records the library versions that made it.
    variant = shards.DenseInfo.model_validate({**DENSE, "model": "all-minilm-l6-v2", "model_path": "/elsewhere",
                                               "weights": "0" * 16})
    assert variant.made_by("all-minilm-l6-v2", other) and not variant.made_by(str(other), other)
