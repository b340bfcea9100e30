"""Hard-negative mining on real text (docstrings of installed packages) with the shipped
pretrained models: positives never come back as negatives, margins and bounds hold against
independently recomputed scores, and every output format has the right columns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytrieve.config import from_dict
from raytrieve.errors import ConfigError, DataError
from raytrieve.inference.config import MineConfig, SelectionConfig
from raytrieve.inference.mine import select_negatives

COMPUTE = {"encode_actors": 1, "cpus_per_encode_actor": 0.5, "torch_threads": 1}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    from raytrieve.data.pydocs import package_pairs

    found = [p for pkg in ("yaml", "tqdm", "safetensors") for p in package_pairs(pkg)]
    pairs = list({(p.query, p.document): p for p in found}.values())  # distinct pairs
    # A query with two positives: neither may come back as the other's negative.
    pairs.append(type(pairs[0])(pairs[0].query, pairs[1].document, pairs[0].package))
    path = tmp_path_factory.mktemp("mine") / "pairs.parquet"
    pq.write_table(pa.table({"query": [p.query for p in pairs], "positive": [p.document for p in pairs]}), path)
    return path


@pytest.fixture(scope="module")
def positives_vectors(ray_cluster, pairs_file):
    """The distinct positives as a corpus, encoded once by the encoding job with MiniLM; the
    dense tests mine against it through corpus_vectors (the sparse test encodes its own)."""
    from raytrieve.inference.config import EncodeConfig
    from raytrieve.inference.encode import run_encode

    positives = list(dict.fromkeys(pq.read_table(pairs_file).column("positive").to_pylist()))
    corpus = pairs_file.parent / "positives.parquet"
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(len(positives))], "text": positives}), corpus)
    out = pairs_file.parent / "positives-vectors"
    run_encode(from_dict(EncodeConfig, {"corpus": {"path": str(corpus)}, "output_dir": str(out),
                                        "dense": {"model": "all-minilm-l6-v2", "max_seq_length": 128,
                                                  "dtype": "float32"},
                                        "compute": COMPUTE}))
    return {"corpus": {"path": str(corpus)}, "corpus_vectors": str(out)}


def _cfg(pairs_file, tmp_path, **extra) -> MineConfig:
    base = {"pairs": {"path": str(pairs_file)}, "retriever": {"model": "all-minilm-l6-v2", "max_seq_length": 128,
                                                                            "dtype": "float32"},
            "output_path": str(tmp_path / "mined.parquet"), "compute": COMPUTE}
    return from_dict(MineConfig, {**base, **extra})


def _positives(pairs_file) -> dict[str, set[str]]:
    t = pq.read_table(pairs_file).to_pydict()
    out: dict[str, set[str]] = {}
    for q, p in zip(t["query"], t["positive"]):
        out.setdefault(q, set()).add(p)
    return out


@pytest.mark.slow
def test_dense_ntuple_scores_respect_margin(positives_vectors, pairs_file, tmp_path, monkeypatch, caplog):
    import logging
    import shutil

    from raytrieve.encoders import DenseEncoder
    from raytrieve.inference.mine import run_mine

    pairs = shutil.copy(pairs_file, tmp_path / "pairs.parquet")  # rewritten below
    cfg = _cfg(pairs, tmp_path, output_format="n-tuple-scores", **positives_vectors,
               selection={"num_negatives": 3, "range_max": 20, "absolute_margin": 0.05})
    result = run_mine(cfg)
    _rerun_changes_nothing(cfg, result, monkeypatch, caplog)
    # An output whose row count changed since (pyarrow keeps its schema's marks) is mined again.
    pq.write_table(pq.read_table(cfg.output_path).slice(1), cfg.output_path)
    assert run_mine(cfg) == result and pq.read_metadata(cfg.output_path).num_rows == result.rows
    assert result.positives_not_in_corpus == 0  # the corpus is the pairs' positives
    # The candidates' index was built on disk beside the output, and removed once mined.
    assert not Path(f"{cfg.output_path}.work").exists()
    table = pq.read_table(cfg.output_path).to_pydict()
    assert list(table) == ["query", "positive", "negative_1", "negative_2", "negative_3", "score"]
    assert result.rows == len(table["query"]) == result.pairs - result.pairs_dropped > 0.9 * result.pairs
    assert result.negatives == 3 * result.rows  # those written (the dropped pairs' negatives were counted)
    positives = _positives(pairs_file)
    model = DenseEncoder("all-minilm-l6-v2")
    model.max_seq_length = 128
    for i in range(len(table["query"])):
        negatives = [table[f"negative_{j}"][i] for j in (1, 2, 3)]
        assert not set(negatives) & positives[table["query"][i]]
        q = model.encode_query(table["query"][i], normalize_embeddings=True)
        docs = model.encode_document([table["positive"][i], *negatives], normalize_embeddings=True)
        recomputed = docs @ q
        np.testing.assert_allclose(table["score"][i], recomputed, atol=1e-4)
        assert all(s <= recomputed[0] - 0.05 + 1e-6 for s in recomputed[1:])
        assert list(recomputed[1:]) == sorted(recomputed[1:], reverse=True)  # "top": best first

    # Other pairs at the same path, or another setting: mined again.
    source = pq.read_table(pairs)
    pq.write_table(source.slice(0, source.num_rows - 1), pairs)
    with caplog.at_level(logging.INFO, logger="raytrieve.mine"):
        assert run_mine(cfg).pairs == result.pairs - 1
        fewer = cfg.model_copy(update={"selection": cfg.selection.model_copy(update={"num_negatives": 2})})
        assert run_mine(fewer).negatives == 2 * pq.read_metadata(cfg.output_path).num_rows
    assert "nothing to do" not in caplog.text
    assert list(pq.read_table(cfg.output_path).column_names)[2:] == ["negative_1", "negative_2", "score"]


def _rerun_changes_nothing(cfg, result, monkeypatch, caplog):
    """A rerun with nothing changed says so, leaves the output as it was and gives the first
    run's result; with corpus_vectors given it knows before Ray (it redid the candidates, the
    rerank and the write)."""
    import io
    import logging
    import sys

    from raytrieve import ray_cluster
    from raytrieve.inference.mine import run_mine

    written = Path(cfg.output_path).stat().st_mtime_ns
    err = io.StringIO()  # the progress stages' lines
    with monkeypatch.context() as m, caplog.at_level(logging.INFO, logger="raytrieve.mine"):
        if cfg.corpus_vectors:
            m.setattr(ray_cluster, "connect", lambda *a, **k: pytest.fail("Ray started for nothing to do"))
        m.setattr(sys, "stderr", err)
        assert run_mine(cfg) == result
    assert Path(cfg.output_path).stat().st_mtime_ns == written
    assert "mine:" not in err.getvalue()  # no phases shown for a run that has none ("0/4 phases")
    assert f"{cfg.output_path}: already mined from these pairs, corpus vectors, models and settings " in caplog.text
    caplog.clear()


def _truncated_copy(vectors_dir: str, out: Path, dim: int) -> Path:
    """The encoding job's folder as if encoded with dense.truncate_dim: ``dim`` (the first
    dimensions of the same vectors, unit length again, as the job truncates then normalizes)."""
    import hashlib
    import json
    import shutil

    shutil.copytree(vectors_dir, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for shard in manifest["shards"]:
        table = pq.read_table(out / shard["file"])
        dense = np.stack(table.column("dense").to_numpy(zero_copy_only=False))[:, :dim]
        dense = (dense / np.linalg.norm(dense, axis=1, keepdims=True)).astype(np.float32)
        column = pa.FixedSizeListArray.from_arrays(pa.array(dense.ravel()), dim)
        table = table.set_column(table.column_names.index("dense"), "dense", column)
        pq.write_table(table, out / shard["file"])
        shard["sha256"] = hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest()
    manifest["dense"].update(dim=dim, truncate_dim=dim)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_dense_mining_over_matryoshka_truncated_vectors_scores_as_they_were_encoded(positives_vectors, pairs_file,
                                                                                    s3_store, tmp_path):
    """Corpus vectors encoded with dense.truncate_dim failed at the search (queries of 384
    dimensions against 64); mining now encodes queries and positives as the corpus was. The
    vectors lie in an object store (tests/object_store.py's S3 server): corpus_vectors was made a
    local path ("s3:/...") before the index was built from it."""
    from raytrieve.encoders import DenseEncoder
    from raytrieve.inference.mine import run_mine

    vectors = _truncated_copy(positives_vectors["corpus_vectors"], tmp_path / "cut", 64)
    s3_store.put(vectors, f"mine/{tmp_path.name}/cut")
    cfg = _cfg(pairs_file, tmp_path, output_format="n-tuple-scores", corpus=positives_vectors["corpus"],
               corpus_vectors=s3_store.uri(f"mine/{tmp_path.name}/cut"), selection={"num_negatives": 2, "range_max": 10})
    result = run_mine(cfg)
    table = pq.read_table(cfg.output_path).to_pydict()
    assert result.rows == len(table["query"]) > 0.9 * result.pairs
    model = DenseEncoder("all-minilm-l6-v2")
    model.max_seq_length = 128
    for i in range(0, len(table["query"]), 7):
        q = model.encode_query(table["query"][i], normalize_embeddings=True, truncate_dim=64)
        docs = model.encode_document([table[k][i] for k in ("positive", "negative_1", "negative_2")],
                                     normalize_embeddings=True, truncate_dim=64)
        np.testing.assert_allclose(table["score"][i], docs @ q, atol=1e-4)


def test_corpus_vectors_of_another_length_than_the_retrievers_are_refused(positives_vectors, pairs_file, tmp_path,
                                                                         monkeypatch):
    """Positives are encoded at retriever.max_seq_length and compared with candidates encoded at
    the corpus vectors' length: at 64 against 128 their scores were on two scales, unnoticed."""
    from raytrieve import ray_cluster
    from raytrieve.inference.mine import run_mine

    monkeypatch.setattr(ray_cluster, "connect", lambda *a, **k: pytest.fail("Ray started before the check"))
    cfg = _cfg(pairs_file, tmp_path, **positives_vectors)
    cfg.retriever.max_seq_length = 64
    with pytest.raises(ConfigError, match=r"retriever.max_seq_length: 64, but corpus_vectors .* were encoded at 128; "
                                          r"set retriever.max_seq_length: 128"):
        run_mine(cfg)
    # Vectors encoded as queries, or with a prompt the positives are not encoded with: their
    # candidates' scores and the positives' were on two scales too.
    import shutil

    cfg.retriever.max_seq_length = 128
    for change, message in (({"side": "query"}, r"encoded as side: query; mining's candidates are documents"),
                            ({"dense": {"prompt": "passage: "}}, r"encoded with the prompt 'passage: ', but positives "
                                                                  r"are encoded with the model's document prompt None"),
                            # Made with another model (its folder is not on this machine).
                            ({"dense": {"model": "s3://KEY:SECRET@b/other", "model_path": "/elsewhere/other",
                                        "weights": "0" * 16}},
                             r"made with 's3://b/other', not with retriever.model 'all-minilm-l6-v2'; encode the "
                             r"corpus with the retriever's model")):
        copy = tmp_path / f"copy-{len(list(tmp_path.glob('copy-*')))}"
        shutil.copytree(positives_vectors["corpus_vectors"], copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        for key, value in change.items():
            manifest[key] = {**manifest[key], **value} if isinstance(value, dict) else value
        (copy / "manifest.json").write_text(json.dumps(manifest))
        cfg.corpus_vectors = str(copy)
        with pytest.raises(ConfigError, match=message):
            run_mine(cfg)
    # The same files under another name and path (a copy on another machine) made them: the model
    # check passes, and the next check (the length) speaks.
    from raytrieve.model_ref import resolve_model

    cfg.corpus_vectors = positives_vectors["corpus_vectors"]
    cfg.retriever.model = str(shutil.copytree(resolve_model("all-minilm-l6-v2"), tmp_path / "minilm-copy"))
    cfg.retriever.max_seq_length = 64
    with pytest.raises(ConfigError, match=r"retriever.max_seq_length: 64, but corpus_vectors"):
        run_mine(cfg)


@pytest.mark.slow
def test_positives_that_are_not_corpus_texts_are_counted_and_warned_of(positives_vectors, pairs_file, tmp_path, caplog):
    """A new user's trial mined BEIR pairs whose positive was the text alone against a corpus of
    title + text: the positive's own document came back as its hard negative, silently."""
    from raytrieve.inference.mine import run_mine

    table = pq.read_table(pairs_file).slice(0, 12).to_pydict()
    titled = [f"Title {i}. {p}" if i < 5 else p for i, p in enumerate(table["positive"])]
    pairs = tmp_path / "titled.parquet"
    pq.write_table(pa.table({"query": table["query"], "positive": titled}), pairs)
    cfg = _cfg(pairs, tmp_path, **positives_vectors, selection={"num_negatives": 1})
    with caplog.at_level("WARNING", logger="raytrieve.mine"):
        result = run_mine(cfg)
    assert result.positives_not_in_corpus == 5 and result.pairs == 12
    assert "5 of 12 positives are not in the corpus by exact text" in caplog.text


@pytest.mark.slow
def test_reranked_mining_writes_the_cross_encoders_scores_of_positives_and_negatives(positives_vectors, pairs_file, tmp_path, monkeypatch, capfd):
    from raytrieve.encoders import CrossEncoder
    from raytrieve.inference import lookup
    from raytrieve.inference.mine import run_mine

    # The corpus is one shard: in pieces of 16 pairs it is many rows, which come back in any order
    # and must be put back in the shard's order (each negative's score is checked below).
    monkeypatch.setattr(lookup, "RERANK_PIECE", 16)
    cfg = _cfg(pairs_file, tmp_path, output_format="n-tuple-scores", **positives_vectors,
               reranker={"model": "ms-marco-minilm-l12-v2", "cpus_per_actor": 0.5, "max_seq_length": 64,
                         "token_budget": 512, "dtype": "float32"},
               selection={"num_negatives": 2, "range_max": 4, "max_score": 0.5})
    capfd.readouterr()
    result = run_mine(cfg)
    # The rerank's count, as lines (stderr is not a terminal here): every candidate and positive.
    n_pairs = pq.read_table(pairs_file).num_rows
    n_queries = len(set(pq.read_table(pairs_file).column("query").to_pylist()))
    err = capfd.readouterr().err
    done = [line for line in err.splitlines() if line.startswith("rerank: ") and "(100%)" in line]
    assert len(done) == 1, err[-3000:]
    total = int(done[0].split()[1].split("/")[0])
    assert n_pairs + n_queries < total <= n_pairs + 4 * n_queries, done  # positives + up to range_max each
    table = pq.read_table(cfg.output_path).to_pydict()
    assert list(table) == ["query", "positive", "negative_1", "negative_2", "score"]
    assert len(table["query"]) == result.rows >= 10
    positives = _positives(pairs_file)
    negatives = [(q, n) for j in (1, 2) for q, n in zip(table["query"], table[f"negative_{j}"])]
    assert all(n not in positives[q] for q, n in negatives)
    # Every score written is the cross-encoder's, positives' included (they are scored in the
    # candidates' pool, in pieces of their own that come back in any order).
    reranker = CrossEncoder("ms-marco-minilm-l12-v2")
    reranker.max_seq_length = 64  # as mined: the 12-layer model at 64 tokens (half the cost of 128)
    expected = np.stack([reranker.predict(list(zip(table["query"], table[c])))
                         for c in ("positive", "negative_1", "negative_2")], axis=1)
    np.testing.assert_allclose(np.array(table["score"]), expected, atol=1e-4, rtol=1e-4)
    assert expected[:, 1:].max() <= 0.5 + 1e-4  # max_score applies to the cross-encoder's scores
    # Candidates are re-ordered by the cross-encoder: each pair's negatives come best first by its
    # score (the retriever's order would not give this).
    assert (expected[:, 1] >= expected[:, 2] - 1e-6).all(), expected


@pytest.mark.slow
def test_sparse_labeled_list_random(ray_cluster, pairs_file, tmp_path, monkeypatch, caplog):
    from raytrieve.inference.mine import run_mine

    cfg = _cfg(pairs_file, tmp_path, output_format="labeled-list",
               retriever={"model": "splade-tiny", "kind": "sparse", "max_seq_length": 128},
               selection={"num_negatives": 4, "range_min": 1, "range_max": 15, "sampling_strategy": "random"})
    result = run_mine(cfg)
    _rerun_changes_nothing(cfg, result, monkeypatch, caplog)  # the encoding job finds its vectors complete
    table = pq.read_table(cfg.output_path).to_pydict()
    assert list(table) == ["query", "documents", "labels"] and len(table["query"]) == result.pairs
    positives = _positives(pairs_file)
    source = pq.read_table(pairs_file).to_pydict()
    for q, p, docs, labels in zip(table["query"], source["positive"], table["documents"], table["labels"]):
        assert docs[0] == p and labels == [1] + [0] * (len(docs) - 1) and len(docs) <= 5
        assert not set(docs[1:]) & positives[q] and len(set(docs[1:])) == len(docs) - 1
    assert result.negatives > 3 * result.pairs  # most pairs found 4 negatives in the corpus
    work = Path(f"{cfg.output_path}.work")  # the encoded positives stay; the index built from them goes
    assert (work / "vectors" / "manifest.json").is_file() and not (work / "index").exists()


def test_scored_pieces_are_joined_in_request_order_whatever_order_they_come_back_in():
    """A reranked shard goes to the actors in pieces that come back in any order (lookup._run)."""
    import random

    from raytrieve.inference.lookup import by_shard

    want = {0: list(range(10)), 3: list(range(100, 105))}
    pieces = {(s, i): values[at : at + 3] for s, values in want.items() for i, at in enumerate(range(0, len(values), 3))}
    shuffled = list(pieces.items())
    random.Random(0).shuffle(shuffled)
    assert list(pieces) != [k for k, _ in shuffled]
    assert by_shard(dict(shuffled)) == want


def test_select_negatives_rules():
    rng = np.random.default_rng(0)
    cands, scores = list(range(10)), np.linspace(0.9, 0.0, 10).astype(np.float32)
    s = SelectionConfig(num_negatives=3, range_min=2, range_max=10)
    assert select_negatives(cands, scores, 1.0, s, rng) == [2, 3, 4]
    s = SelectionConfig(num_negatives=3, absolute_margin=0.5)  # keep score <= 0.5
    assert select_negatives(cands, scores, 1.0, s, rng) == [4, 5, 6]
    s = SelectionConfig(num_negatives=3, relative_margin=0.2)  # keep score <= 0.8 * 0.6 = 0.48
    assert select_negatives(cands, scores, 0.6, s, rng) == [5, 6, 7]
    s = SelectionConfig(num_negatives=5, max_score=0.6, min_score=0.3)
    assert select_negatives(cands, scores, 1.0, s, rng) == [3, 4, 5, 6]
    s = SelectionConfig(num_negatives=3, sampling_strategy="random", seed=1)
    first = select_negatives(cands, scores, 1.0, s, np.random.default_rng(1))
    assert first == select_negatives(cands, scores, 1.0, s, np.random.default_rng(1))
    assert len(set(first)) == 3 and first == sorted(first)
    assert {tuple(select_negatives(cands, scores, 1.0, s, rng)) for _ in range(20)} != {tuple(first)}


def test_a_model_of_another_kind_is_refused_before_ray(pairs_file, tmp_path, monkeypatch):
    """A dense model as the sparse retriever mined (meaningless) negatives to the end; a dense
    model as the reranker failed in a Ray actor after the corpus was encoded. Both are refused
    before Ray starts, naming the key and the fix."""
    from raytrieve import ray_cluster
    from raytrieve.inference.mine import run_mine

    monkeypatch.setattr(ray_cluster, "connect", lambda *a, **k: pytest.fail("Ray started before the check"))
    cases = [
        ({"retriever": {"model": "all-minilm-l6-v2", "kind": "sparse"}},
         r"m.yaml.retriever.model: all-minilm-l6-v2 is a dense model \(SentenceTransformer, .*\); "
         r"set retriever.kind: dense, or name a sparse model"),
        ({"retriever": {"model": "splade-tiny"}},
         r"m.yaml.retriever.model: splade-tiny is a sparse model .*set retriever.kind: sparse, or name a dense model"),
        ({"reranker": {"model": "all-minilm-l6-v2"}},
         r"m.yaml.reranker.model: all-minilm-l6-v2 is a dense model .*; name a cross-encoder"),
        # retriever.kind takes dense or sparse: "set retriever.kind: reranker" could not be followed.
        ({"retriever": {"model": "ms-marco-minilm-l12-v2"}},
         r"m.yaml.retriever.model: ms-marco-minilm-l12-v2 is a cross model .*; move it to reranker.model, and name "
         r"a dense model here$"),
        # Lengths past a model's positions, and vectors that are not there, name their keys (they did not).
        ({"retriever": {"model": "all-minilm-l6-v2", "max_seq_length": 1000}},
         r"^m.yaml.retriever.max_seq_length: 1000 is more than the 512 positions"),
        ({"reranker": {"model": "ms-marco-minilm-l12-v2", "max_seq_length": 1000}},
         r"^m.yaml.reranker.max_seq_length: 1000 is more than the 512 positions"),
    ]
    for extra, message in cases:
        with pytest.raises(ConfigError, match=message):
            run_mine(_cfg(pairs_file, tmp_path, **extra), where="m.yaml")
    with pytest.raises(DataError, match=r"^m.yaml.corpus_vectors: .*nope: no such folder; give the output folder"):
        run_mine(_cfg(pairs_file, tmp_path, corpus_vectors=str(tmp_path / "nope")), where="m.yaml")


def test_an_output_path_that_is_not_an_earlier_output_is_refused_before_ray(pairs_file, tmp_path, monkeypatch):
    """A new user's trial: mine replaced an unrelated parquet file, and its own pairs file when
    output_path named it. Only an earlier output of mine (its schema's mark) is replaced."""
    from raytrieve import _io, ray_cluster
    from raytrieve.errors import DataError
    from raytrieve.inference.mine import MINE, run_mine

    monkeypatch.setattr(ray_cluster, "connect", lambda *a, **k: pytest.fail("Ray started before the check"))
    theirs = tmp_path / "theirs.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), theirs)
    before = theirs.read_bytes()
    (tmp_path / "folder.parquet").mkdir()
    cases = {
        str(pairs_file): rf"m.yaml.output_path {pairs_file}: is this run's input {pairs_file}; name another file",
        str(theirs): r"m.yaml.output_path .*theirs.parquet: the file exists and is not an earlier output of "
                     r"raytrieve mine; name a new file, or delete it first",
        str(tmp_path / "folder.parquet"): r"folder.parquet: is a folder",
    }
    for out, message in cases.items():
        with pytest.raises(DataError, match=message):
            run_mine(_cfg(pairs_file, tmp_path, output_path=out), where="m.yaml")
    assert theirs.read_bytes() == before and pq.read_table(pairs_file).column_names == ["query", "positive"]
    earlier = tmp_path / "earlier.parquet"
    pq.write_table(_io.mark_written_by(pa.table({"query": ["q"]}), MINE), earlier)
    _io.check_output_file(earlier, MINE, "output_path")  # what a rerun replaces


def test_the_pairs_may_lie_at_a_uri(pairs_file, tmp_path):
    """pairs.path was read as a local path only; it reads any location the datasets do."""
    from raytrieve.inference.mine import read_pairs

    local = read_pairs(_cfg(pairs_file, tmp_path))
    assert read_pairs(_cfg(f"file://{pairs_file}", tmp_path)) == local and len(local[0]) > 10
    with pytest.raises(DataError, match=r"pairs.path file://.*/nowhere.parquet: file not found"):
        read_pairs(_cfg(f"file://{tmp_path}/nowhere.parquet", tmp_path))
    # A folder of jsonl files is one file too many (its size read as an empty file's: no pairs).
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "a.jsonl").write_text('{"query": "q", "positive": "p"}\n')
    with pytest.raises(DataError, match=r"pairs: a folder; name one file of it"):
        read_pairs(_cfg(f"file://{tmp_path}/pairs", tmp_path, pairs={"path": f"file://{tmp_path}/pairs",
                                                                     "format": "jsonl"}))
    # The output is refused as the run's own input, named by a URI too.
    from raytrieve import _io

    with pytest.raises(DataError, match=r"output_path .*: is this run's input file://"):
        _io.check_output_file(pairs_file, "mine", "output_path", (f"file://{pairs_file}",))


def test_mine_config_errors(pairs_file, tmp_path):
    with pytest.raises(ConfigError, match="range_min < range_max"):
        _cfg(pairs_file, tmp_path, selection={"range_min": 5, "range_max": 5}).check()
    with pytest.raises(ConfigError, match="relative_margin must be < 1"):
        _cfg(pairs_file, tmp_path, selection={"relative_margin": 1.5}).check()
    with pytest.raises(ConfigError, match="output_format.*not one of"):
        _cfg(pairs_file, tmp_path, output_format="quads")
    with pytest.raises(ConfigError, match=r"output_path must name a \.parquet file"):
        _cfg(pairs_file, tmp_path, output_path=str(tmp_path / "x.csv")).check()
    with pytest.raises(ConfigError, match=r"reranker\.token_budget must be >= 1"):
        _cfg(pairs_file, tmp_path, reranker={"model": "m", "token_budget": 0}).check()
