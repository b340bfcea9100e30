"""The Serve application over real HTTP on 127.0.0.1 with the shipped pretrained models on
real text (docstrings of installed packages): answers equal the in-process encoders and a
reference fusion, bad and hostile requests (also chunked, also fuzzed) get named 4xx JSON
errors, overload gives 503 + Retry-After."""

from __future__ import annotations

import base64
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from raytrieve.config import from_dict
from raytrieve.serve.client import wait_healthy
from raytrieve.serve.config import ServeConfig
from tests.conftest import free_port, sockets_on

pytestmark = pytest.mark.slow
PACKAGES = ("yaml", "tqdm", "safetensors", "pyarrow", "mlflow")





@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory, tiny_models):
    """The app with the shipped models; the sparse one is served from a real MLflow registry
    (sqlite) as models:/NAME/VERSION, so every test here proves that path too. A second dense
    model (tiny, with its own index) and a second reranker (tiny) are served beside them, named
    tiny-dense and tiny-cross (test_several_models_each_answer_by_name), both in ONNX Runtime."""
    import shutil

    from ray import serve

    from raytrieve.data.pydocs import package_pairs
    from raytrieve.index.build import build_indices
    from raytrieve.inference.config import EncodeConfig
    from raytrieve.inference.encode import run_encode
    from raytrieve.model_ref import resolve_model
    from raytrieve.serve.launch import start
    from raytrieve.tracking import mlflow_run

    root = tmp_path_factory.mktemp("serve")
    # Registered as training does it: the folder is a run's `model` artifact, then a version.
    # The artifact location is explicit: sqlite's default would write ./mlruns into the checkout.
    registry = f"sqlite:///{root}/mlflow.db"
    mlflow_run.client(registry).create_experiment("serve-tests", artifact_location=(root / "artifacts").as_uri())
    run_id = mlflow_run.start_run(registry, "serve-tests", "splade-tiny", {}, {})
    mlflow_run.MetricLogger(registry, run_id).log_model_dir(resolve_model("splade-tiny"))
    mlflow_run.end_run(registry, run_id, "FINISHED")
    sparse_uri = f"models:/serve-sparse/{mlflow_run.register_model(registry, run_id, 'serve-sparse')}"
    pairs = list({p.document: p for pkg in PACKAGES for p in package_pairs(pkg, limit=60)}.values())
    ids = [f"d{i}" for i in range(len(pairs))]
    pq.write_table(pa.table({"id": ids, "text": [p.document for p in pairs]}), root / "corpus.parquet")
    run_encode(from_dict(EncodeConfig, {
        "corpus": {"path": str(root / "corpus.parquet")}, "output_dir": str(root / "vectors"), "rows_per_shard": 100,
        "dense": {"model": "all-minilm-l6-v2", "max_seq_length": 128, "dtype": "float32"},
        "sparse": {"model": "splade-tiny", "max_seq_length": 128, "dtype": "float32"},
        "compute": {"cpus_per_encode_actor": 1.0, "torch_threads": 2}}))
    build_indices(root / "vectors", root / "index")
    run_encode(from_dict(EncodeConfig, {
        "corpus": {"path": str(root / "corpus.parquet")}, "output_dir": str(root / "vectors_tiny"),
        "rows_per_shard": 1000, "dense": {"model": str(tiny_models["dense"]), "dtype": "float32"},
        "compute": {"cpus_per_encode_actor": 1.0, "torch_threads": 2}}))
    build_indices(root / "vectors_tiny", root / "index_tiny")
    port = free_port(pair=True)
    # The tiny models run in ONNX Runtime (backend onnx): test_several_models_each_answer_by_name
    # holds them to their in-process torch encoders. direct_ingress: every test here talks to the
    # ingress replica's own HTTP server; the apps other tests deploy beside it are reached through
    # Serve's proxy, on the next port (``proxy``).
    tiny = {"num_cpus": 0.05, "torch_threads": 1, "dtype": "float32", "backend": "onnx"}
    cfg = from_dict(ServeConfig, {
        # float32: the tests compare every model with its in-process float32 encoder (the
        # default, auto, is what the reduced demo serves).
        "dense": [{"model": "all-minilm-l6-v2", "max_seq_length": 128, "num_cpus": 0.5, "torch_threads": 1,
                   "dtype": "float32"},
                  {"model": str(tiny_models["dense"]), "name": "tiny-dense", "index": str(root / "index_tiny"),
                   **tiny}],
        "sparse": {"model": sparse_uri, "name": "splade-tiny", "max_seq_length": 128, "num_cpus": 0.4,
                   "torch_threads": 1, "dtype": "float32"},
        "reranker": [{"model": "ms-marco-minilm-l12-v2", "max_seq_length": 256, "num_cpus": 0.5, "torch_threads": 1,
                      "dtype": "float32"},
                     # Its output cache on: test_several_models_each_answer_by_name's rerank requests
                     # repeat their pairs, and every answer is checked against the in-process model.
                     {"model": str(tiny_models["cross"]), "name": "tiny-cross", "cache_entries": 16, **tiny}],
        "index": str(root / "index"), "port": port, "direct_ingress": True, "mlflow_tracking_uri": registry,
        "limits": {"max_inputs": 16, "max_documents": 32, "max_text_chars": 2000, "max_queued_requests": 4,
                   "retry_after_s": 2, "max_body_bytes": 1_000_000, "max_tokenize_chars": 10_000},
        # /search's defaults for what a request leaves out (test_search_fusion_equals_reference).
        "search": {"recall": {"dense": 30, "sparse": 30}},
    })
    url = start(cfg, ray_address=None)
    wait_healthy(url)
    yield {"url": url, "proxy": f"http://127.0.0.1:{port + 1}", "pairs": pairs, "ids": ids, "root": root, "cfg": cfg}
    serve.shutdown()
    # The version was downloaded into the user's cache (keyed by this tmp registry): drop it.
    with mlflow_run.environment(registry):
        shutil.rmtree(resolve_model(sparse_uri), ignore_errors=True)


@pytest.fixture(scope="module")
def models():
    from raytrieve.encoders import CrossEncoder, DenseEncoder, SparseEncoder

    dense, sparse = DenseEncoder("all-minilm-l6-v2"), SparseEncoder("splade-tiny")
    dense.max_seq_length = 128
    sparse.max_seq_length = 128
    reranker = CrossEncoder("ms-marco-minilm-l12-v2")
    reranker.max_seq_length = 256
    return {"dense": dense, "sparse": sparse, "reranker": reranker}


def _post(url: str, path: str, body) -> requests.Response:
    return requests.post(f"{url}{path}", json=body, timeout=120)

def test_a_direct_ingress_replica_restarted_while_connections_linger_gets_its_port_back(served):
    """First in this module: it kills the fixture's ingress, before the other tests' connections
    (those the server closed first linger on the port for 60 s). Ray binds a direct-ingress replica's
    port without SO_REUSEADDR and blocks a port whose bind failed for good; a replica killed
    with a client's keep-alive connection open leaves that connection holding the port (up to
    60 s), so the replica Serve started in its place failed its bind and the app never answered
    on its port again (found by helper-83's trial). The new replica now waits for the port in its
    constructor: it says so in its log, and once the client lets go the port answers again, with
    the same answers. The client lets go by a reset (SO_LINGER 0), which frees the killed
    replica's side of the connection at once instead of after Linux's 60 s."""
    import http.client
    import socket
    import struct

    import ray

    url, cfg = served["url"], served["cfg"]
    body = {"input": "where the port goes", "model": "all-minilm-l6-v2"}
    # A keep-alive connection the server's side will have closed first. (The one request before
    # the kill goes over it: a connection of its own could close server side first too, and linger.)
    lingering = http.client.HTTPConnection(cfg.host, cfg.port, timeout=60)
    lingering.request("POST", "/v1/embeddings", json.dumps(body), {"Content-Type": "application/json"})
    answer = lingering.getresponse()
    assert answer.status == 200 and answer.getheader("connection", "keep-alive").lower() != "close"
    want = json.loads(answer.read())["data"][0]["embedding"]
    # Nothing but the listener and this connection on the port (an earlier client's connection
    # the server closed first would hold it 60 s more whatever this test does).
    mine = lingering.sock.getsockname()[1]
    deadline = time.monotonic() + 90
    while (held := sockets_on(cfg.port)) != {("LISTEN", 0), ("ESTABLISHED", mine)}:
        assert time.monotonic() < deadline, held
        time.sleep(1)
    ingress = [a for a in ray.util.list_named_actors(all_namespaces=True)
               if a["name"].startswith(f"SERVE_REPLICA::{cfg.app_name}#ingress#")]
    assert len(ingress) == 1, ingress
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    waiting = f"raytrieve: waiting for {cfg.host}:{cfg.port} to be released"
    killed_at = time.time()
    ray.kill(ray.get_actor(ingress[0]["name"], namespace=ingress[0]["namespace"]), no_restart=True)
    time.sleep(1)
    with socket.socket() as probe, pytest.raises(OSError):  # the kernel's word: Ray's bind would fail now
        probe.bind((cfg.host, cfg.port))
    deadline = time.monotonic() + 50  # the port is held for 60 s: the new replica must say it waits before
    while not [f for f in logs.glob("worker-*.err")  # the new replica's: written since the kill
               if f.stat().st_mtime >= killed_at - 1 and waiting in f.read_text(errors="replace")]:
        assert time.monotonic() < deadline, "no new ingress replica said it waits for the port"
        time.sleep(0.5)
    assert lingering.sock is not None
    lingering.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    lingering.close()  # a reset: the killed replica's side of the connection is gone, the port free
    deadline = time.monotonic() + 120
    while True:
        try:
            r = requests.post(f"{url}/v1/embeddings", json=body, timeout=30)
            if r.status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "the port did not answer again within 120 s of its release"
        time.sleep(0.5)
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], want, atol=1e-6)
    wait_healthy(url)


def test_embeddings_equal_dense_encoder(served, models):
    texts = [p.query for p in served["pairs"][:5]]
    r = _post(served["url"], "/v1/embeddings", {"input": texts, "model": "all-minilm-l6-v2"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "all-minilm-l6-v2" and body["usage"]["total_tokens"] > 0
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    np.testing.assert_allclose(got, models["dense"].encode(texts), atol=1e-5)

    r = _post(served["url"], "/v1/embeddings", {"input": texts[0], "dimensions": 64, "encoding_format": "base64"})
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, models["dense"].encode(texts[0], truncate_dim=64, normalize_embeddings=True),
                               atol=1e-5)
    r = _post(served["url"], "/v1/embeddings", {"input": texts[:2], "encoding_format": "binary", "input_type": "query"})
    packed = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.uint8)
    np.testing.assert_array_equal(packed, np.packbits(models["dense"].encode_query(texts[:2]) > 0, axis=1))
    r = _post(served["url"], "/v1/embeddings", {"input": texts[:2], "encoding_format": "int8"})
    codes = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.int16)
    unit = models["dense"].encode(texts[:2], normalize_embeddings=True)
    assert np.abs(codes - unit * 127).max() <= 0.5 + 1e-3


def test_sparse_and_rerank_equal_in_process(served, models):
    texts = [p.query for p in served["pairs"][:3]]
    r = _post(served["url"], "/embed_sparse", {"input": texts, "input_type": "document", "return_tokens": True})
    assert r.status_code == 200, r.text
    expected = models["sparse"].encode_document(texts, as_dicts=True)
    for row, exp in zip(r.json()["data"], expected):
        assert [e["index"] for e in row["embedding"]] == exp["indices"].tolist()
        np.testing.assert_allclose([e["value"] for e in row["embedding"]], exp["values"], atol=1e-5)
    tokens = models["sparse"].tokenizer.convert_ids_to_tokens(expected[0]["indices"].tolist())
    assert [e["token"] for e in r.json()["data"][0]["embedding"]] == tokens

    query = served["pairs"][7].query
    docs = [p.document for p in served["pairs"][:12]]
    r = _post(served["url"], "/rerank", {"query": query, "documents": docs, "top_n": 5, "return_documents": True})
    assert r.status_code == 200, r.text
    ranked = models["reranker"].rank(query, docs, top_k=5)
    assert [h["index"] for h in r.json()["results"]] == [h["corpus_id"] for h in ranked]
    np.testing.assert_allclose([h["relevance_score"] for h in r.json()["results"]], [h["score"] for h in ranked],
                               atol=1e-5)
    assert r.json()["results"][0]["document"]["text"] == docs[ranked[0]["corpus_id"]]


def _cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _sigmoid(x) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))


def test_openai_sdk(served, models):
    """The openai package's embeddings.create against /v1/embeddings: float, dimensions, base64
    (its default, decoded by the SDK) and usage counted in the model's tokens."""
    import openai

    client = openai.OpenAI(base_url=f"{served['url']}/v1", api_key="unused", max_retries=0)
    # One text past max_seq_length (128): usage counts what the model ran on, after truncation.
    texts = [p.query for p in served["pairs"][:4]] + [" ".join(p.document for p in served["pairs"][:6])[:1900]]
    expected = models["dense"].encode(texts)
    got = client.embeddings.create(model="all-minilm-l6-v2", input=texts, encoding_format="float")
    assert got.model == "all-minilm-l6-v2" and [d.index for d in got.data] == list(range(len(texts)))
    assert _cosine([d.embedding for d in got.data], expected).min() > 0.999999
    tokens = [len(ids) for ids in models["dense"].tokenizer(texts, truncation=True, max_length=128)["input_ids"]]
    assert tokens[-1] == 128 and sum(tokens) != sum(len(t.split()) for t in texts)  # truncated; not words
    assert got.usage.prompt_tokens == got.usage.total_tokens == sum(tokens)

    small = client.embeddings.create(model="all-minilm-l6-v2", input=texts[0], dimensions=64)  # SDK: base64
    np.testing.assert_allclose(small.data[0].embedding, models["dense"].encode(texts[0], truncate_dim=64,
                                                                               normalize_embeddings=True), atol=1e-5)
    raw = client.embeddings.create(model="all-minilm-l6-v2", input=texts[:2], encoding_format="base64")
    vectors = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in raw.data]
    np.testing.assert_allclose(vectors, expected[:2], atol=1e-5)
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert e.value.param == "model" and e.value.code == "model_not_found"  # OpenAI's error fields, read by its SDK
    # A chunk of whitespace only (a blank page) is embedded as OpenAI's API does; only "" is refused.
    blank = client.embeddings.create(model="all-minilm-l6-v2", input=[texts[0], " \n "], encoding_format="float")
    np.testing.assert_allclose(blank.data[1].embedding, models["dense"].encode(" \n "), atol=1e-5)
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.embeddings.create(model="all-minilm-l6-v2", input=[texts[0], ""])
    assert e.value.param == "input[1]"
    # At the bare host, as Infinity and TEI are called (LangChain's InfinityEmbeddings posts /embeddings).
    bare = openai.OpenAI(base_url=served["url"], api_key="unused", max_retries=0)
    assert [m.id for m in bare.models.list()] == [m.id for m in client.models.list()]
    # OpenAI's Model type requires `created`; models.retrieve is GET /v1/models/{model}.
    for m in client.models.list():
        assert openai.types.Model.model_validate(m.model_dump()).created > 1.7e9
        assert client.models.retrieve(m.id).model_dump() == m.model_dump()
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("text-embedding-3-small")
    assert e.value.code == "model_not_found" and "all-minilm-l6-v2" in str(e.value)
    again = bare.embeddings.create(model="all-minilm-l6-v2", input=texts, encoding_format="float")
    assert [d.embedding for d in again.data] == [d.embedding for d in got.data]


def _logits(models, query: str, docs: list[str]) -> np.ndarray:
    """The cross-encoder's raw scores (its configured activation, sigmoid here, left out)."""
    import torch

    return models["reranker"].predict([(query, d) for d in docs], activation_fn=torch.nn.Identity())


def _pair_tokens(models, query: str, docs: list[str]) -> int:
    ids = models["reranker"].tokenizer([query] * len(docs), docs, truncation="longest_first", max_length=256)
    return sum(len(x) for x in ids["input_ids"])


def test_cohere_and_jina_rerank(served, models):
    """cohere.ClientV2().rerank (POST /v2/rerank) and cohere.Client().rerank (POST /v1/rerank),
    and Jina's body on /v1/rerank: the cross-encoder's ranking, sigmoid scores, token counts."""
    import cohere

    query = served["pairs"][7].query
    docs = [p.document for p in served["pairs"][:12]]
    logits = _logits(models, query, docs)
    order = np.argsort(-logits, kind="stable")[:5].tolist()

    v2 = cohere.ClientV2(base_url=served["url"], api_key="unused").rerank(
        model="ms-marco-minilm-l12-v2", query=query, documents=docs, top_n=5)
    assert [r.index for r in v2.results] == order
    np.testing.assert_allclose([r.relevance_score for r in v2.results], _sigmoid(logits[order]), atol=1e-5)
    assert v2.id and v2.meta.tokens.input_tokens == _pair_tokens(models, query, docs)
    assert v2.meta.billed_units.search_units == 1 and v2.meta.api_version.version == "2"
    # LangChain's CohereRerank calls rerank(..., top_n=..., max_tokens_per_doc=None): the SDK sends
    # both as JSON null (a 422 on every call before). Cohere's default length (4096) is at least
    # the served pair length (256), so it changes nothing.
    for max_tokens in (None, 4096, 256):
        again = cohere.ClientV2(base_url=served["url"], api_key="unused").rerank(
            model="ms-marco-minilm-l12-v2", query=query, documents=docs, top_n=None, max_tokens_per_doc=max_tokens)
        assert [r.index for r in again.results][:5] == order and len(again.results) == len(docs)

    # v1: documents as strings or objects; extra string fields come back with the document.
    mixed = [d if i % 2 else {"text": d, "title": f"doc {i}"} for i, d in enumerate(docs)]
    v1 = cohere.Client(base_url=served["url"], api_key="unused").rerank(
        query=query, documents=mixed, top_n=5, return_documents=True, max_chunks_per_doc=None, rank_fields=None)
    assert [r.index for r in v1.results] == order
    np.testing.assert_allclose([r.relevance_score for r in v1.results], _sigmoid(logits[order]), atol=1e-5)
    assert [r.document.text for r in v1.results] == [docs[i] for i in order]
    assert [getattr(r.document, "title", None) for r in v1.results] == [
        None if i % 2 else f"doc {i}" for i in order]
    assert v1.meta.tokens.input_tokens == _pair_tokens(models, query, docs)

    jina = _post(served["url"], "/v1/rerank", {"model": "ms-marco-minilm-l12-v2", "query": query,
                                               "documents": [{"text": d} for d in docs[:4]], "top_n": 2,
                                               "return_documents": True})
    assert jina.status_code == 200, jina.text
    body = jina.json()
    top = np.argsort(-logits[:4], kind="stable")[:2].tolist()
    assert body["model"] == "ms-marco-minilm-l12-v2" and [r["index"] for r in body["results"]] == top
    assert body["usage"]["total_tokens"] == _pair_tokens(models, query, docs[:4])
    assert body["results"][0]["document"] == {"text": docs[top[0]]}


def test_tei_routes(served, models, monkeypatch):
    """TEI's bodies and answers over plain HTTP: /embed, /embed_sparse and /rerank with TEI's
    keys, /similarity, /tokenize, /info, /health; values from the in-process encoders. Then TEI's
    client, huggingface_hub's InferenceClient, which posts to the server's root."""
    url, texts = served["url"], [p.query for p in served["pairs"][:4]]
    r = _post(url, "/embed", {"inputs": texts})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json(), models["dense"].encode(texts), atol=1e-5)
    r = _post(url, "/embed", {"inputs": texts[0], "dimensions": 32, "normalize": False, "truncate": True})
    np.testing.assert_allclose(r.json(), [models["dense"].encode(texts[0], truncate_dim=32)], atol=1e-5)
    assert abs(np.linalg.norm(r.json()[0]) - 1) > 1e-3  # cut and not normalized again

    r = _post(url, "/embed_sparse", {"inputs": texts[:2]})
    assert r.status_code == 200, r.text
    for row, exp in zip(r.json(), models["sparse"].encode(texts[:2], as_dicts=True)):
        assert [e["index"] for e in row] == sorted(exp["indices"].tolist())  # TEI: by index
        weights = dict(zip(exp["indices"].tolist(), exp["values"].tolist()))
        np.testing.assert_allclose([e["value"] for e in row], [weights[e["index"]] for e in row], atol=1e-5)

    query, docs = served["pairs"][7].query, [p.document for p in served["pairs"][:6]]
    logits = _logits(models, query, docs)
    order = np.argsort(-logits, kind="stable").tolist()
    r = _post(url, "/rerank", {"query": query, "texts": docs, "return_text": True})
    assert r.status_code == 200, r.text
    assert [h["index"] for h in r.json()] == order and [h["text"] for h in r.json()] == [docs[i] for i in order]
    np.testing.assert_allclose([h["score"] for h in r.json()], _sigmoid(logits[order]), atol=1e-5)
    raw = _post(url, "/rerank", {"query": query, "texts": docs, "raw_scores": True}).json()
    np.testing.assert_allclose([h["score"] for h in raw], logits[order], atol=1e-4)
    assert "text" not in raw[0]

    sample = ["Grüße, naïve café!", texts[0]]
    r = _post(url, "/tokenize", {"inputs": sample})
    assert r.status_code == 200, r.text
    tok = models["dense"].tokenizer
    for text, row in zip(sample, r.json()):
        assert [t["id"] for t in row] == tok(text)["input_ids"]
        assert row[0] == {"id": tok.cls_token_id, "text": "[CLS]", "special": True, "start": None, "stop": None}
        for t in row[1:-1]:  # byte offsets into the text, as TEI's
            assert text.encode()[t["start"]:t["stop"]].decode() == t["text"] and not t["special"]
    plain = _post(url, "/tokenize", {"inputs": sample[0], "add_special_tokens": False}).json()
    assert [t["id"] for t in plain[0]] == tok(sample[0], add_special_tokens=False)["input_ids"]

    info = requests.get(f"{url}/info", timeout=30).json()
    assert info["model_id"] == "all-minilm-l6-v2" and info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_input_length"] == 128 and info["max_client_batch_size"] == 16 and info["model_dtype"] == "float32"
    assert info["auto_truncate"] is True and isinstance(info["max_batch_tokens"], int) and info["version"]
    r = requests.get(f"{url}/health", timeout=30)
    assert r.status_code == 200 and r.content == b""

    unit = models["dense"].encode(texts, normalize_embeddings=True)
    r = _post(url, "/similarity", {"inputs": {"source_sentence": texts[0], "sentences": texts[1:]}, "parameters": {}})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json(), unit[1:] @ unit[0], atol=1e-5)
    # InferenceClient(model=URL) posts to "/" (a 404 here before); the test session's offline
    # flag (no hub) would stop it before it sends anything, whatever the host.
    import huggingface_hub
    from huggingface_hub import InferenceClient

    huggingface_hub.utils.build_hf_headers()  # offline still: its agent registry resolves empty, not from the Hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    client = InferenceClient(model=url, timeout=60)
    np.testing.assert_allclose(client.feature_extraction(texts), models["dense"].encode(texts), atol=1e-5)
    np.testing.assert_allclose(client.sentence_similarity(texts[0], texts[1:]), unit[1:] @ unit[0], atol=1e-5)
    # A refusal reaches TEI's client as its message (TEI's error shape), not as a dict's repr.
    from huggingface_hub.errors import HfHubHTTPError

    said = _error_of(_post(url, "/", {"inputs": ["ok", ""]}), "/", {"inputs": ["ok", ""]})
    with pytest.raises(HfHubHTTPError) as refused:
        client.feature_extraction(["ok", ""])
    assert refused.value.response.status_code == 422 and refused.value.server_message == said["message"]
    assert said["field"] == "inputs[1]" and said["message"].startswith("inputs[1]: ")
    root = _post(url, "/invocations", {"query": query, "texts": docs, "raw_scores": True}).json()
    assert root == raw  # TEI's other root route; a rerank body is a rerank
    # A key sent as null is no key: an embedding body with query: null is an embedding.
    r = _post(url, "/", {"inputs": texts[:1], "query": None, "normalize": None})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json(), models["dense"].encode(texts[:1]), atol=1e-5)


def _reference_lists(served, models, query: str, k: int):
    """Dense and sparse top-k by brute force over in-process vectors (ties: lower row)."""
    docs = [p.document for p in served["pairs"]]
    d = models["dense"].encode_document(docs) @ models["dense"].encode_query(query)
    s = models["sparse"].encode_document(docs, convert_to_sparse_tensor=False).numpy() @ \
        models["sparse"].encode_query(query, convert_to_sparse_tensor=False).numpy()
    out = []
    for scores in (d, s):
        order = np.argsort(-scores, kind="stable")[:k]
        out.append([(served["ids"][i], float(scores[i])) for i in order if scores[i] > 0 or scores is d])
    return out


def test_search_fusion_equals_reference(served, models):
    query = served["pairs"][3].query
    dense, sparse = _reference_lists(served, models, query, 20)
    body = {"query": query, "top_k": 10, "recall": {"dense": 20, "sparse": 20}, "return_text": False}
    r = _post(served["url"], "/search", {**body, "fusion": {"method": "rrf", "k": 60}})
    assert r.status_code == 200, r.text
    rrf: dict[str, float] = {}
    for ranked in (dense, sparse):
        for rank, (doc, _) in enumerate(ranked, start=1):
            rrf[doc] = rrf.get(doc, 0) + 1 / (60 + rank)
    hits = r.json()["hits"]
    np.testing.assert_allclose([h["score"] for h in hits], sorted(rrf.values(), reverse=True)[:10], atol=1e-9)
    assert all(abs(rrf[h["id"]] - h["score"]) < 1e-9 for h in hits)
    assert set(r.json()["timings_ms"]) >= {"encode_dense_ms", "recall_dense_ms", "encode_sparse_ms", "fusion_ms"}
    assert "stages" not in r.json()

    # The model replicas' own recall (one call per model): the same lists, and the texts of the
    # first n hits.
    from ray import serve

    texts = dict(zip(served["ids"], [p.document for p in served["pairs"]]))
    for deployment, ranked in (("dense", dense), ("sparse", sparse)):
        handle = serve.get_deployment_handle(deployment, app_name=served["cfg"].app_name)
        hits, along, search_ms = handle.recall.remote(query, 20, 5).result()
        assert [d for d, _ in hits] == [d for d, _ in ranked] and search_ms >= 0
        np.testing.assert_allclose([x for _, x in hits], [x for _, x in ranked], atol=1e-4)
        assert along == {d: texts[d] for d, _ in ranked[:5]}

    # return_stages: each stage's whole candidate list, as the reference computes it.
    r = _post(served["url"], "/search", {**body, "fusion": {"method": "rrf", "k": 60}, "return_stages": True})
    stages = r.json()["stages"]
    for name, ranked in (("dense", dense), ("sparse", sparse)):
        assert [d for d, _ in stages[name]] == [d for d, _ in ranked]
        np.testing.assert_allclose([x for _, x in stages[name]], [x for _, x in ranked], atol=1e-4)
    assert {d for d, _ in stages["fused"]} == set(rrf)  # ties may order either way
    np.testing.assert_allclose([x for _, x in stages["fused"]], sorted(rrf.values(), reverse=True), atol=1e-9)
    assert [h["id"] for h in r.json()["hits"]] == [d for d, _ in stages["fused"]][:10]

    r = _post(served["url"], "/search", {**body, "fusion": {"method": "convex", "dense_weight": 0.7,
                                                             "sparse_weight": 0.3, "normalization": "minmax"}})
    norm = []
    for ranked in (dense, sparse):
        lo, hi = min(s for _, s in ranked), max(s for _, s in ranked)
        norm.append({doc: (s - lo) / (hi - lo) for doc, s in ranked})
    convex = {doc: 0.7 * norm[0].get(doc, 0) + 0.3 * norm[1].get(doc, 0) for doc in set(norm[0]) | set(norm[1])}
    for h in r.json()["hits"]:
        assert abs(convex[h["id"]] - h["score"]) < 1e-5
        np.testing.assert_allclose(h["scores"]["dense"], dict(dense).get(h["id"], np.nan), atol=1e-4)
    assert [h["score"] for h in r.json()["hits"]] == sorted([h["score"] for h in r.json()["hits"]], reverse=True)

    # The config's search: defaults fill what a request leaves out, recall field by field.
    deep = _post(served["url"], "/search", {**body, "recall": {"dense": 100, "sparse": 100}, "return_stages": True})
    found = {k: len(deep.json()["stages"][k]) for k in ("dense", "sparse")}  # sparse: docs sharing a term
    r = _post(served["url"], "/search", {"query": query, "return_stages": True, "return_text": False})
    assert [len(r.json()["stages"][k]) for k in ("dense", "sparse")] == [min(30, found[k]) for k in found]
    r = _post(served["url"], "/search", {"query": query, "recall": {"dense": 20}, "return_stages": True})
    assert [len(r.json()["stages"][k]) for k in ("dense", "sparse")] == [20, min(30, found["sparse"])]
    assert found["dense"] > 30


def test_several_models_each_answer_by_name(served, models, tiny_models):
    """The fixture serves two dense models (each with its own index) and two rerankers: every
    endpoint that takes a model answers with the named one's outputs (its in-process encoder is
    the reference), /search with each dense model finds its own index's documents, and names
    that are unknown or of another kind are 4xx naming the field and listing what is served."""
    import torch

    from raytrieve.encoders import CrossEncoder, DenseEncoder

    url, texts = served["url"], [p.query for p in served["pairs"][:3]]
    dense, cross = DenseEncoder(str(tiny_models["dense"])), CrossEncoder(str(tiny_models["cross"]))
    r = _post(url, "/v1/embeddings", {"input": texts, "model": "tiny-dense"})
    assert r.status_code == 200 and r.json()["model"] == "tiny-dense", r.text
    np.testing.assert_allclose([d["embedding"] for d in r.json()["data"]], dense.encode(texts), atol=1e-5)
    assert _post(url, "/v1/embeddings", {"input": texts[0]}).json()["model"] == "all-minilm-l6-v2"  # the default
    r = _post(url, "/embed", {"inputs": texts, "model": "tiny-dense"})  # TEI's normalize: true by default
    np.testing.assert_allclose(r.json(), dense.encode(texts, normalize_embeddings=True), atol=1e-5)

    query, docs = served["pairs"][7].query, [p.document for p in served["pairs"][:6]]
    logits = cross.predict([(query, d) for d in docs], activation_fn=torch.nn.Identity())
    order = np.argsort(-logits, kind="stable").tolist()
    r = _post(url, "/rerank", {"query": query, "texts": docs, "raw_scores": True, "model": "tiny-cross"})
    np.testing.assert_allclose([h["score"] for h in r.json()], logits[order], atol=1e-4)
    for path in ("/v1/rerank", "/v2/rerank"):
        r = _post(url, path, {"query": query, "documents": docs, "model": "tiny-cross"})
        assert [h["index"] for h in r.json()["results"]] == order, (path, r.text)
        np.testing.assert_allclose([h["relevance_score"] for h in r.json()["results"]], _sigmoid(logits[order]),
                                   atol=1e-5)
    r = _post(url, "/rerank", {"query": query, "documents": docs, "model": "tiny-cross"})
    assert r.json()["model"] == "tiny-cross" and [h["index"] for h in r.json()["results"]] == order
    assert _post(url, "/tokenize", {"inputs": "x", "model": "tiny-cross"}).status_code == 200
    assert requests.get(f"{url}/info", params={"model": "tiny-cross"}).json()["model_id"] == "tiny-cross"

    listed = {m["id"]: m for m in requests.get(f"{url}/v1/models").json()["data"]}
    assert sorted(listed) == sorted(["all-minilm-l6-v2", "tiny-dense", "splade-tiny", "ms-marco-minilm-l12-v2",
                                     "tiny-cross"])
    assert (listed["tiny-dense"]["kind"], listed["tiny-dense"]["default"], listed["tiny-dense"]["index"]) == \
        ("dense", False, True)
    assert listed["tiny-dense"]["dimensions"] == 32 and listed["ms-marco-minilm-l12-v2"]["default"] is True
    assert {name: m["backend"] for name, m in listed.items()} == {
        "all-minilm-l6-v2": "torch", "tiny-dense": "onnx", "splade-tiny": "torch", "ms-marco-minilm-l12-v2": "torch",
        "tiny-cross": "onnx"}
    assert {name: m["cache_entries"] for name, m in listed.items()} == {
        "all-minilm-l6-v2": 0, "tiny-dense": 0, "splade-tiny": 0, "ms-marco-minilm-l12-v2": 0, "tiny-cross": 16}

    # /search with each dense model: its own index's ranking (brute force over in-process vectors).
    corpus = [p.document for p in served["pairs"]]
    for name, encoder in (("tiny-dense", dense), ("all-minilm-l6-v2", models["dense"])):
        # The models' similarity (cosine; the index built from each one's vectors searches by it).
        scores = encoder.encode_document(corpus, normalize_embeddings=True) @ \
            encoder.encode_query(query, normalize_embeddings=True)
        expected = [served["ids"][i] for i in np.argsort(-scores, kind="stable")[:5]]
        r = _post(url, "/search", {"query": query, "top_k": 5, "recall": {"dense": 5, "sparse": 0},
                                   "dense_model": name, "return_text": False})
        assert r.status_code == 200, r.text
        assert [h["id"] for h in r.json()["hits"]] == expected and r.json()["models"] == {"dense": name}
    r = _post(url, "/search", {"query": query, "top_k": 3, "dense_model": "tiny-dense", "rerank": True,
                               "reranker_model": "tiny-cross", "rerank_depth": 3})
    assert r.json()["models"] == {"dense": "tiny-dense", "sparse": "splade-tiny", "reranker": "tiny-cross"}
    hits = r.json()["hits"]
    np.testing.assert_allclose([h["scores"]["rerank"] for h in hits],
                               cross.predict([(query, h["text"]) for h in hits]), atol=1e-5)

    wrong = [("/v1/embeddings", {"input": "a", "model": "tiny-cross"}, 404, "model",
              "['all-minilm-l6-v2', 'tiny-dense']"),
             ("/embed", {"inputs": "a", "model": "nope"}, 404, "model", "tiny-dense"),
             ("/embed_sparse", {"input": "a", "model": "tiny-dense"}, 404, "model", "['splade-tiny']"),
             ("/v2/rerank", {"query": "q", "documents": ["d"], "model": "tiny-dense"}, 404, "model", "tiny-cross"),
             ("/tokenize", {"inputs": "a", "model": "nope"}, 404, "model", "tiny-cross"),
             ("/search", {"query": "q", "dense_model": "nope"}, 422, "dense_model", "tiny-dense"),
             ("/search", {"query": "q", "sparse_model": "tiny-dense"}, 422, "sparse_model", "splade-tiny"),
             ("/search", {"query": "q", "reranker_model": "tiny-dense"}, 422, "reranker_model", "tiny-cross")]
    for path, body, status, field, listing in wrong:
        r = _post(url, path, body)
        error = _error_of(r, path, body)
        assert r.status_code == status and error["field"] == field and listing in error["message"], (path, r.text)


# Plainly worded needs -> the start of the one docstring that answers each. CLEAR queries
# come back first with and without rerank; NEAR ones (the small models confuse them with
# the general tqdm class or a sibling function) within the top 5.
CLEAR = {
    "copy files from one filesystem to another": "def copy_files(",
    "write a table into an ORC file": "def write(self, table):",
    "generate random numbers between 0 and 1": "def random(n,",
    # None from mlflow, whose docstrings change with its monthly releases: 3.18 dropped
    # auto_detect_tracking_uri and detect_failure_patterns, two documents queried here before.
    "replace every null value with a fill value": "def fill_null(",
    "convert a JVM memory buffer into an Arrow buffer": "def jvm_buffer(",
    "add a path based resolver for a given YAML tag": "def add_path_resolver(",
    "add a multi-constructor for a YAML tag prefix": "def add_multi_constructor(",
}
NEAR = {
    "progress bar that sends its updates to a Telegram bot": "class tqdm_telegram:",
    "progress bar updates posted to Discord": "class tqdm_discord:",
    "read a pandas DataFrame stored in Feather format": "def read_feather(",
    "refresh the display of the progress bar": "def refresh(self, nolock=False",
}


def test_search_finds_the_document_of_clear_queries(served):
    """Clear queries get their document first (hybrid, and hybrid + rerank); known-item search
    (a docstring's summary line -> its docstring) finds the document in the top 10."""
    docs = [p.document for p in served["pairs"]]
    for queries, depth in ((CLEAR, 1), (NEAR, 5)):
        for query, start in queries.items():
            expected = served["ids"][next(i for i, d in enumerate(docs) if d.startswith(start))]
            for rerank in (False, True):
                # Depth 10 holds every expected document (each is in the fused top 5 without rerank), and the
                # 12-layer reranker at 256 tokens costs ~0.35 s a pair on an AVX2-only CPU.
                r = _post(served["url"], "/search", {"query": query, "top_k": 5, "rerank": rerank, "rerank_depth": 10})
                assert r.status_code == 200, r.text
                hits = r.json()["hits"]
                assert expected in [h["id"] for h in hits[:depth]], (query, rerank, [h["text"][:40] for h in hits])
                assert all(h["text"] == docs[served["ids"].index(h["id"])] for h in hits)
                assert all((h["scores"]["rerank"] is not None) == rerank for h in hits)

    counts: dict[str, int] = {}
    for p in served["pairs"]:
        counts[p.query] = counts.get(p.query, 0) + 1
    known = [(p.query, served["ids"][i]) for i, p in enumerate(served["pairs"]) if counts[p.query] == 1][:30]
    found = sum(doc in [h["id"] for h in _post(served["url"], "/search", {"query": q, "top_k": 10}).json()["hits"]]
                for q, doc in known)
    assert found >= 0.8 * len(known), (found, len(known))


def test_models_health_metrics(served):
    url = served["url"]
    assert requests.get(f"{url}/healthz").json()["status"] == "ok"
    models = {m["id"]: m for m in requests.get(f"{url}/v1/models").json()["data"]}
    assert models["all-minilm-l6-v2"]["dimensions"] == 384 and models["splade-tiny"]["kind"] == "sparse"
    assert {m["dtype"] for m in models.values()} == {"float32"}  # each replica reports its format
    # Where /search encodes each indexed model's queries and searches its index.
    assert {k: m["recall_in"] for k, m in models.items()} == {
        "all-minilm-l6-v2": "replica", "tiny-dense": "replica", "splade-tiny": "replica",
        "ms-marco-minilm-l12-v2": None, "tiny-cross": None}
    assert not any("recall_backend" in m for m in models.values())
    # Ray Serve's metrics from every node's agent, tagged by route and replica; Ray sends a
    # replica's values to its agent every few seconds.
    from prometheus_client.parser import text_string_to_metric_families

    assert _post(url, "/search", {"query": served["pairs"][0].query}).status_code == 200  # one to count
    # A client that gives up (a timeout) is a 499, not a server error: 32 long pairs (a query no
    # cache holds) on the 12-layer reranker take far longer than the 10 ms the client waits for
    # an answer once connected.
    long_docs = [" ".join(p.document for p in served["pairs"][i:i + 8])[:1900] for i in range(32)]  # max_text_chars
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{url}/rerank", json={"query": f"q {time.time()}", "texts": long_docs}, timeout=(10, 0.01))

    deadline, found = time.monotonic() + 60, []
    while not found and time.monotonic() < deadline:
        r = requests.get(f"{url}/metrics", timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text[:300]
        found = [s for f in text_string_to_metric_families(r.text) for s in f.samples
                 if s.name == "ray_raytrieve_requests_total" and s.labels.get("route") == "/search"
                 and s.labels.get("status") == "200" and s.value > 0]
        time.sleep(0 if found else 2)
    assert found, r.text[:2000]
    assert all(s.labels["deployment"] == "ingress" and s.labels["replica"] for s in found)
    rerank_statuses = {}
    while "499" not in rerank_statuses and time.monotonic() < deadline + 60:
        families = text_string_to_metric_families(requests.get(f"{url}/metrics", timeout=30).text)
        rerank_statuses = {s.labels.get("status") for f in families for s in f.samples
                           if s.name == "ray_raytrieve_requests_total" and s.labels.get("route") == "/rerank"}
        time.sleep(0 if "499" in rerank_statuses else 2)
    assert "499" in rerank_statuses and not any(x.startswith("5") for x in rerank_statuses), rerank_statuses
    assert "ray_raytrieve_request_seconds_bucket" in r.text


BAD = [
    ("/tokenize", {"inputs": ["x" * 2000] * 6}, 422, "inputs"),  # past max_tokenize_chars (10,000)
    ("/similarity", {"inputs": {"source_sentence": "q", "sentences": ["a"]}, "parameters": {"prompt_name": "nope"}},
     422, "parameters.prompt_name"),
    ("/similarity", {"inputs": {"source_sentence": "q", "sentences": ["a"]},
                     "parameters": {"truncation_direction": "left"}}, 422, "parameters.truncation_direction"),
    ("/search", b"{not json", 400, "body"),
    ("/search", {}, 422, "query"),
    ("/search", {"query": ""}, 422, "query"),
    ("/search", {"query": "   "}, 422, "query"),
    ("/search", {"query": 5}, 422, "query"),
    ("/search", {"query": "x", "top_k": 0}, 422, "top_k"),
    ("/search", {"query": "x", "top_k": 1000}, 422, "top_k"),
    ("/search", {"query": "x", "top_k": "3"}, 422, "top_k"),
    ("/search", {"query": "x", "recall": {"dense": 0, "sparse": 0}}, 422, "recall"),
    ("/search", {"query": "x", "recall": {"dense": 10**6}}, 422, "recall.dense"),
    ("/search", {"query": "x", "fusion": {"method": "max"}}, 422, "fusion.method"),
    ("/search", {"query": "x", "fusion": {"method": "convex", "dense_weight": 0.0, "sparse_weight": 0.0}}, 422, "fusion"),
    ("/search", {"query": "x", "rerank": True, "rerank_depth": 10**4}, 422, "rerank_depth"),
    ("/search", {"query": "x" * 3000}, 422, "query"),
    ("/search", {"query": "x", "surprise": 1}, 422, "surprise"),
    ("/v1/embeddings", {"input": []}, 422, "input"),
    ("/v1/embeddings", {"input": ["a", ""]}, 422, "input[1]"),
    ("/v1/embeddings", {"input": ["a"] * 17}, 422, "input"),
    ("/v1/embeddings", {"input": "a", "dimensions": 0}, 422, "dimensions"),
    ("/v1/embeddings", {"input": "a", "dimensions": 385}, 422, "dimensions"),
    ("/v1/embeddings", {"input": "a", "model": "gpt-4"}, 404, "model"),
    ("/v1/embeddings", {"input": "a", "encoding_format": "hex"}, 422, "encoding_format"),
    ("/v1/embeddings", {"input": [1, 2]}, 422, "input"),  # token ids: refused as such
    ("/embed_sparse", {"input": "a", "top_k": -1}, 422, "top_k"),
    ("/rerank", {"query": "q", "documents": []}, 422, "documents"),
    ("/rerank", {"query": "q", "documents": ["d"] * 33}, 422, "documents"),
    ("/rerank", {"query": "", "documents": ["d"]}, 422, "query"),
    ("/rerank", {"query": "q", "documents": "d"}, 422, "documents"),
    ("/embed", {"inputs": []}, 422, "inputs"),
    ("/embed", {"inputs": ["a"] * 17}, 422, "inputs"),
    ("/embed", {"inputs": "a", "prompt_name": "nope"}, 422, "prompt_name"),
    ("/embed", {"inputs": "a", "dimensions": 385}, 422, "dimensions"),
    ("/embed", {"inputs": "a", "truncation_direction": "left"}, 422, "truncation_direction"),
    ("/embed", {"inputs": [17]}, 422, "inputs"),
    ("/embed_sparse", {"inputs": ["a"] * 17}, 422, "inputs"),
    ("/embed_sparse", {"inputs": "a", "input": "b"}, 422, "input"),
    ("/embed_sparse", {"inputs": "a", "top_k": 3}, 422, "top_k"),
    ("/rerank", {"query": "q", "texts": ["d"] * 33}, 422, "texts"),
    ("/rerank", {"query": "q", "texts": ["d"], "documents": ["d"]}, 422, "documents"),
    ("/rerank", {"query": "q", "texts": ["d", ""]}, 422, "texts[1]"),
    ("/tokenize", {"inputs": "a", "add_special_tokens": "yes"}, 422, "add_special_tokens"),
    ("/tokenize", {"inputs": ["a"] * 17}, 422, "inputs"),
    ("/v1/rerank", {"query": "q", "documents": [{"title": "t"}]}, 422, "documents[0].text"),
    ("/v1/rerank", {"query": "q", "documents": [{"text": "d", "year": 1999}]}, 422, "documents[0].year"),
    ("/v1/rerank", {"query": "q", "documents": ["d"] * 33}, 422, "documents"),
    ("/v1/rerank", {"query": "q", "documents": ["d"], "rank_fields": ["title"]}, 422, "rank_fields"),
    ("/v1/rerank", {"query": "q", "documents": ["d"], "max_chunks_per_doc": 2}, 422, "max_chunks_per_doc"),
    ("/v2/rerank", {"query": "q", "documents": ["d"], "relevant_spans": {"mode": "enabled"}}, 422, "relevant_spans"),
    ("/v2/rerank", {"query": "q", "documents": ["d"], "model": "rerank-v3.5"}, 404, "model"),
    ("/v2/rerank", {"query": "q", "documents": [{"text": "d"}]}, 422, "documents[0]"),
    ("/v2/rerank", {"query": "", "documents": ["d"]}, 422, "query"),
    ("/nope", {}, 404, "path"),
]


def test_bad_requests_get_named_4xx(served):
    wrong = []  # every row checked, all mismatches reported at once
    for path, body, status, field in BAD:
        if isinstance(body, bytes):
            r = requests.post(f"{served['url']}{path}", data=body, headers={"content-type": "application/json"})
        else:
            r = _post(served["url"], path, body)
        error = _error_of(r, path, body if isinstance(body, dict) else None)
        if (r.status_code, error["field"]) != (status, field) or not error["message"]:
            wrong.append((path, body, r.status_code, error))
    assert not wrong, "\n".join(map(str, wrong))
    # A near miss of a field's name is answered with the field it was meant to be, at its depth.
    near = [("/search", {"query": "x", "rerank_model": "m"}, "rerank_model", "; did you mean reranker_model?"),
            ("/search", {"query": "x", "fusion": {"dense_wieght": 0.3}}, "fusion.dense_wieght",
             "; did you mean dense_weight?"),
            ("/v1/rerank", {"query": "q", "documents": ["d"], "top_k": 3}, "top_k", "; did you mean top_n?"),
            # Both forms of /rerank's body at once: it suggested the very field it refused.
            ("/rerank", {"query": "q", "documents": ["d"], "texts": ["d"]}, "documents",
             "; it belongs to another client's form of this body, and a body is one form: send only its fields"),
            ("/search", {"query": "x", "surprise": 1}, "surprise", "Extra inputs are not permitted"),
            # What other servers' clients send and raytrieve refuses on purpose: why, and the fix.
            ("/v1/rerank", {"query": "q", "documents": ["d"], "max_chunks_per_doc": 2}, "max_chunks_per_doc",
             "not split into chunks; leave max_chunks_per_doc out"),
            ("/v2/rerank", {"query": "q", "documents": ["d"], "max_tokens_per_doc": 64}, "max_tokens_per_doc",
             "(256 tokens, query and document together); leave it out or send at least 256"),
            ("/embed", {"inputs": "a", "truncation_direction": "Left"}, "truncation_direction",
             "send right or leave it out"),
            ("/v1/embeddings", {"input": [[101, 2023], [7592]]}, "input",
             "send the texts (LangChain's OpenAIEmbeddings: check_embedding_ctx_length=False)")]
    for path, body, field, ending in near:
        error = _error_of(_post(served["url"], path, body), path, body)
        assert error["field"] == field and error["message"].endswith(ending), (path, body, error)
    big = b'{"query": "' + b"x" * 1_100_000 + b'"}'
    r = requests.post(f"{served['url']}/search", data=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"
    wrong_method = requests.get(f"{served['url']}/search")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"  # RFC 9110 15.5.6
    put = requests.put(f"{served['url']}/healthz")
    assert put.status_code == 405 and "GET" in put.headers["allow"] and put.json()["error"]["field"] == "method"
    # HEAD is GET without the body (load balancers' and uptime monitors' probes)
    for path in ("/healthz", "/health", "/v1/models", "/info"):
        head, get = requests.head(f"{served['url']}{path}"), requests.get(f"{served['url']}{path}")
        assert head.status_code == get.status_code == 200 and head.content == b"", path
    # A compressed body is not decoded: 415 naming the header, not "the body is not UTF-8".
    import gzip

    zipped = requests.post(f"{served['url']}/v1/embeddings", data=gzip.compress(b'{"input": "hello"}'),
                           headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert zipped.status_code == 415 and zipped.json()["error"]["field"] == "content-encoding", zipped.text
    assert _post(served["url"], "/v2/rerank", {"query": "q", "documents": ["d"],  # spans not asked for: fine
                                               "relevant_spans": {"mode": "disabled"}}).status_code == 200


# -- Hostile requests ------------------------------------------------------------------------
# One request at a time, so nothing here can be backpressure: any 5xx (503 included) is a bug,
# and every bad request gets a 4xx JSON error body within the socket timeout (a hang fails).

HOSTILE_TIMEOUT_S = 60
# The endpoints the design names, and one OpenAI-compatible servers have that raytrieve does not
# (chat completions): that one must still answer every body with a JSON 404.
NAMED_POSTS = ("/v1/embeddings", "/v1/rerank", "/v2/rerank", "/embed", "/embed_sparse", "/rerank", "/tokenize",
               "/search", "/v1/chat/completions")
# A valid body per POST body shape and the kind of each field; wrong values are drawn per kind.
# Routes with two bodies (raytrieve's and TEI's, told apart by their keys) have one entry each,
# "path#tei" for TEI's. test_hostile_fields_get_4xx_json checks this table against the app's
# OpenAPI schema, so a new endpoint or field cannot go unfuzzed.
SIMILARITY = {"inputs": {"source_sentence": "q", "sentences": ["a", "b"]}}
VALID = {
    "/v1/embeddings": {"input": "hello"},
    "/embeddings": {"input": "hello"},
    "/similarity": SIMILARITY,
    # TEI's root routes: an embedding, a rerank or a similarity, told apart by the body's keys.
    **{f"{root}#{kind}": body for root in ("/", "/invocations")
       for kind, body in (("embed", {"inputs": "hello"}), ("rerank", {"query": "q", "texts": ["a", "b"]}),
                          ("similarity", SIMILARITY))},
    "/embed_sparse": {"input": "hello"},
    "/embed_sparse#tei": {"inputs": "hello"},
    "/rerank": {"query": "q", "documents": ["a", "b"]},
    "/rerank#tei": {"query": "q", "texts": ["a", "b"]},
    "/search": {"query": "q", "top_k": 2, "return_text": False},
    "/embed": {"inputs": "hello"},
    "/tokenize": {"inputs": "hello"},
    "/v1/rerank": {"query": "q", "documents": ["a", {"text": "b"}]},
    "/v2/rerank": {"query": "q", "documents": ["a", "b"]},
}
# Other servers' bodies read null as the field left out (their SDKs send None so): "bool?".
TEI_TRUNCATION = {"truncate": "bool?", "truncation_direction": "enum"}
OPENAI_EMBEDDINGS = {"input": "texts", "model": "text", "dimensions": "int", "encoding_format": "enum",
                     "input_type": "enum", "user": "text"}
TEI_EMBED = {"inputs": "texts", "normalize": "bool?", "prompt_name": "text", "dimensions": "int", "model": "text",
             **TEI_TRUNCATION}
TEI_RERANK = {"query": "text", "texts": "list", "raw_scores": "bool?", "return_text": "bool?", "model": "text",
              **TEI_TRUNCATION}
TEI_SIMILARITY = {"inputs": "similar", "parameters": "object", "model": "text"}
FIELD_KINDS = {
    "/v1/embeddings": OPENAI_EMBEDDINGS,
    "/embeddings": OPENAI_EMBEDDINGS,
    "/similarity": TEI_SIMILARITY,
    **{f"{root}#{kind}": kinds for root in ("/", "/invocations")
       for kind, kinds in (("embed", TEI_EMBED), ("rerank", TEI_RERANK), ("similarity", TEI_SIMILARITY))},
    "/embed_sparse": {"input": "texts", "model": "text", "input_type": "enum", "return_tokens": "bool", "top_k": "int"},
    "/embed_sparse#tei": {"inputs": "texts", "prompt_name": "text", "model": "text", **TEI_TRUNCATION},
    "/rerank": {"query": "text", "documents": "list", "model": "text", "top_n": "int", "return_documents": "bool"},
    "/rerank#tei": TEI_RERANK,
    "/search": {"query": "text", "top_k": "int", "recall": "object", "fusion": "object", "rerank": "bool",
                "rerank_depth": "int", "rerank_weight": "share", "return_text": "bool", "return_stages": "bool", "dense_model": "text",
                "sparse_model": "text", "reranker_model": "text"},
    "/embed": TEI_EMBED,
    "/tokenize": {"inputs": "texts", "add_special_tokens": "bool?", "prompt_name": "text", "model": "text"},
    "/v1/rerank": {"query": "text", "documents": "list", "model": "text", "top_n": "int", "return_documents": "bool?",
                   "rank_fields": "list"},
    "/v2/rerank": {"query": "text", "documents": "list", "model": "text", "top_n": "int", "priority": "int>=0",
                   "max_tokens_per_doc": "int", "relevant_spans": "spans"},
}


def _path(name: str) -> str:
    return name.split("#")[0]


class RawJSON(str):
    """JSON text sent as it is (1e400, 100k nested arrays): json.dumps cannot write these."""


def _to_json(value) -> bytes:
    """json.dumps' own output for NaN/Infinity literals, \\ud800 escapes and big integers."""
    def text(v) -> str:
        if isinstance(v, RawJSON):
            return str(v)
        if isinstance(v, dict):
            return "{" + ",".join(f"{json.dumps(k)}:{text(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ",".join(text(x) for x in v) + "]"
        return json.dumps(v)
    return text(value).encode("ascii")


DEEP = RawJSON("[" * 100_000 + "]" * 100_000)  # past any parser's recursion limit
NESTED = RawJSON("[" * 500 + "]" * 500)  # parses, then fits no field
# Wrong for every field: not finite, not Unicode, too deep, of no field's type.
WRONG_ANYWHERE = [float("nan"), float("inf"), float("-inf"), RawJSON("1e400"), RawJSON("-1e400"), "\ud800",
                  "ok\udfff", DEEP, NESTED]
WRONG = {
    "text": [5, 1.5, True, [], ["x"], {}],
    "texts": [5, True, {}, [], [5], [None], [["x"]], ["ok", "\udc00"], ["ok", ""], ["x"] * 17],
    "list": ["d", 5, {}, [], [5], [None], ["ok", "\ud83d"], ["d"] * 33],
    "int": ["3", 1.5, True, [], {}, 0, -1, -(10**400)],
    "bool": ["true", 1, 0, None, []],
    "bool?": ["true", 1, 0, []],  # null is valid: "not set"
    "int>=0": ["3", 1.5, True, [], {}, -1, -(10**400)],
    # Cohere's relevant_spans: only {"mode": "disabled"} (asking for none) is served.
    "spans": ["disabled", 1, [], {}, {"mode": "enabled"}, {"mode": "disabled", "x": 1}, {"mode": "disabled",
                                                                                        "max_spans": "3"}],
    "share": ["0.5", True, [], {}, 0, 0.0, -0.1, 1.5, 2],  # in (0, 1]
    "enum": ["nope", "", 1, ["float"], {}],
    # A similarity's inputs: never valid (a string or list of texts would be an embedding's).
    "similar": [1, [], {}, {"source_sentence": "q"}, {"sentences": ["a"]}, {"source_sentence": 5, "sentences": ["a"]},
                {"source_sentence": "q", "sentences": []}, {"source_sentence": "q", "sentences": ["a"], "x": 1}],
    "object": ["x", 1, [], {"surprise": 1}, {"dense": -1}, {"dense": 10**400}, {"sparse": 1.5},
               {"method": "convex", "dense_weight": float("inf")}, {"k": float("nan")}, {"k": RawJSON("1e400")},
               {"sparse_weight": 10**400}, {"dense_weight": 2e6}, {"method": "max"}, {"normalization": "\ud800"}],
}
# Integers past every limit: some fields have no upper bound (top_n), so these may also succeed.
HUGE = [10**400, 2**63, 2**64 + 1]


def _request(served, method: str, path: str, body=None, headers: dict[str, str] | None = None):
    """(status, content-type, body) over a fresh http.client connection: bytes go with a
    Content-Length, an iterable of bytes goes chunked (Transfer-Encoding, no Content-Length)."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(served["url"])
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=HOSTILE_TIMEOUT_S)
    try:
        try:
            conn.request(method, path, body=body, headers=headers or {})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer (413) and close before an oversized body is all sent
        response = conn.getresponse()
        return response.status, response.getheader("content-type", ""), response.read()
    finally:
        conn.close()


# Errors come in TEI's shape ({"error": message, "error_type", "field"}, which huggingface_hub
# shows as the message) on TEI's routes, and on the routes it shares with raytrieve's bodies when
# the body is TEI's (it has TEI's own key); in OpenAI's error object everywhere else.
TEI_ROUTES = ("/embed", "/similarity", "/tokenize", "/", "/invocations", "/info", "/health")
TEI_KEYS = {"/embed_sparse": "inputs", "/rerank": "texts"}


def _tei_shaped(path: str, body=None) -> bool:
    """Whether an error for ``body`` (a dict; None: unreadable, or none) at ``path`` is TEI's."""
    return path in TEI_ROUTES or (isinstance(body, dict) and body.get(TEI_KEYS.get(path, "")) is not None)


def _assert_json_error(answer, context, status: int | None = None, tei: bool | None = None) -> dict:
    """A 4xx JSON error in the shape ``tei`` says (None: either); its message and field, and
    OpenAI's other keys when it has them."""
    code, content_type, data = answer
    assert 400 <= code < 500, (context, code, data[:300])
    assert status is None or code == status, (context, code, data[:300])
    assert content_type.startswith("application/json"), (context, code, content_type, data[:300])
    body = json.loads(data)
    if isinstance(body["error"], str):
        assert tei in (None, True), (context, "TEI's shape where OpenAI's was due", body)
        assert set(body) == {"error", "error_type", "field"} and body["error"], (context, body)
        assert body["error_type"] == ("Overloaded" if code in (429, 503) else "Validation"), (context, body)
        return {"message": body["error"], "field": body["field"]}
    assert tei in (None, False), (context, "OpenAI's shape where TEI's was due", body)
    error = body["error"]
    assert set(error) == {"type", "message", "field", "param", "code"} and error["message"], (context, error)
    assert (error["param"], error["code"]) == (error["field"], error["type"]), (context, error)
    return error


def _error_of(r, path: str, body=None) -> dict:
    """``_assert_json_error`` of a requests answer to ``body`` at ``path``."""
    answer = (r.status_code, r.headers.get("content-type", ""), r.content)
    return _assert_json_error(answer, (path, body), tei=_tei_shaped(path, body))


JSON_HEADERS = {"content-type": "application/json"}


def test_hostile_bodies_get_4xx_json(served):
    """Whole bodies no endpoint can accept, on every endpoint the design names: malformed JSON,
    NaN/Infinity, lone surrogates (escaped, and as raw bytes), 100k-deep nesting, an integer of
    5,000 digits, invalid UTF-8, empty bodies and the wrong Content-Type."""
    known = {_path(name) for name in VALID}
    raw_bodies = {
        "malformed": (b"{not json", 400), "trailing comma": (b'{"query": "x",}', 400),
        "truncated": (b'{"query": "x', 400),
        "nul byte": (b"\x00", 400), "invalid utf-8": (b'{"input": "\xff\xfe", "query": "\xc3("}', 400),
        # json.loads decodes bytes with surrogatepass: these arrive as a lone surrogate.
        "utf-8 encoded surrogate": (b'{"input": "\xed\xa0\x80", "query": "\xed\xa0\x80"}', 422),
        "deep arrays": (str(DEEP).encode(), 400), "deep objects": (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, 400),
        "deep field": (b'{"input": ' + str(DEEP).encode() + b', "query": ' + str(DEEP).encode() + b"}", 400),
        "5000-digit integer": (b'{"top_k": ' + b"9" * 5000 + b', "top_n": ' + b"9" * 5000 + b"}", 400),
        "NaN": (b"NaN", 422), "Infinity": (b'{"input": Infinity, "query": -Infinity}', 422),
        "lone surrogates": (b'{"input": "\\ud800", "query": "\\udfff", "documents": ["\\ud800"]}', 422),
        "surrogate key": (b'{"\\ud800": 1}', 422), "null": (b"null", 422), "array": (b"[]", 422),
        "string": (b'"query"', 422), "number": (b"123", 422), "empty": (b"", 400),
    }
    # What the client must change, in its terms (Python's messages name server-side remedies).
    said = {"deep arrays": "nested too deeply; send a flatter body", "deep objects": "nested too deeply",
            "5000-digit integer": "an integer has more than 4300 digits; send fewer digits",
            "invalid utf-8": "the body is not UTF-8 (invalid start byte at byte 11)",
            "empty": "the body is empty; send a JSON object"}
    for path in NAMED_POSTS:
        for name, (body, status) in raw_bodies.items():
            answer = _request(served, "POST", path, body, JSON_HEADERS)
            error = _assert_json_error(answer, (path, name), status if path in known else 404, _tei_shaped(path))
            if path in known and name in said:
                assert said[name] in error["message"], (path, name, error)
                assert not re.search(r"sys\.|RecursionError|recursion depth", error["message"]), (path, name, error)
        valid = _to_json(VALID.get(path, {"input": "hello"}))
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                             None):
            headers = {"content-type": content_type} if content_type else {}
            error = _assert_json_error(_request(served, "POST", path, valid, headers), (path, content_type),
                                       415 if path in known else 404, _tei_shaped(path, VALID.get(path)))
            assert path not in known or error["field"] == "content-type"
        _assert_json_error(_request(served, "POST", path, None, {}), (path, "no body, no type"),
                           415 if path in known else 404, _tei_shaped(path))
    assert requests.get(f"{served['url']}/healthz", timeout=30).status_code == 200


def test_hostile_fields_get_4xx_json(served):
    """Each field of each endpoint, in an otherwise valid body, set to values of the wrong type,
    out of range, not finite or not Unicode: a 4xx JSON error naming that field. Integers past
    any limit are answered 200 or 4xx, never 5xx."""
    schema = requests.get(f"{served['url']}/openapi.json", timeout=30).json()
    posts = {p for p, ops in schema["paths"].items() if "post" in ops}
    assert posts == {_path(n) for n in VALID} == {_path(n) for n in FIELD_KINDS}, "fuzz table out of date with the app"
    for path in posts:
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        refs = [body["$ref"]] if "$ref" in body else [b["$ref"] for b in body.get("oneOf") or body["anyOf"]]
        shapes = {frozenset(schema["components"]["schemas"][r.rsplit("/", 1)[1]]["properties"]) for r in refs}
        tables = {frozenset(kinds) for name, kinds in FIELD_KINDS.items() if _path(name) == path}
        assert shapes == tables, (path, "fuzz table out of date with the request fields", shapes)
    for name, body in VALID.items():
        assert _request(served, "POST", _path(name), _to_json(body), JSON_HEADERS)[0] == 200, name

    for name, kinds in FIELD_KINDS.items():
        path = _path(name)
        for field, kind in kinds.items():
            for value in WRONG_ANYWHERE + WRONG[kind]:
                body = _to_json({**VALID[name], field: value})
                # TEI's body by its name; 100k-deep JSON does not parse, so its body is nobody's
                tei = path in TEI_ROUTES or (name.endswith("#tei") if value is not DEEP else False)
                error = _assert_json_error(_request(served, "POST", path, body, JSON_HEADERS), (name, field, value),
                                           tei=tei)
                if value is not DEEP:  # 100k-deep JSON is refused before any field is read
                    # the field itself or a part of it (texts[1], recall.dense), not another field
                    assert re.fullmatch(rf"{re.escape(field)}(\[\d+\]|\.\w+)*", error["field"]), (path, field, value, error)
            if kind in ("int", "int>=0", "object"):
                for value in HUGE if kind != "object" else [{"dense": n} for n in HUGE]:
                    code, content_type, data = _request(served, "POST", path, _to_json({**VALID[name], field: value}),
                                                        JSON_HEADERS)
                    assert code == 200 or 400 <= code < 500, (path, field, value, code, data[:300])
                    assert content_type.startswith("application/json") and json.loads(data), (path, field, value)


def test_chunked_bodies_are_read_and_bounded(served):
    """Bodies without Content-Length (Transfer-Encoding: chunked): read whole when small, a JSON
    400 when malformed, and a JSON 413 once past the size limit, on every endpoint."""
    limit = served["cfg"].limits.max_body_bytes

    def chunks(data: bytes, size: int):
        return iter([data[i : i + size] for i in range(0, len(data), size)])

    for name, body in VALID.items():
        path = _path(name)
        code, _, data = _request(served, "POST", path, chunks(_to_json(body), 3), JSON_HEADERS)
        assert code == 200, (name, data[:300])
        _assert_json_error(_request(served, "POST", path, chunks(b'{"query": "x", "input": ', 5), JSON_HEADERS),
                           (path, "chunked malformed"), 400, _tei_shaped(path))
    oversized = b"[" + b" " * (limit + 65_536) + b"]"
    for path in (*NAMED_POSTS, "/healthz"):
        error = _assert_json_error(_request(served, "POST", path, chunks(oversized, 65_536), JSON_HEADERS),
                                   (path, "chunked oversized"), 413, _tei_shaped(path))
        assert error["field"] == "body"
    assert requests.get(f"{served['url']}/healthz", timeout=30).status_code == 200


def test_fuzzed_requests_never_5xx(served):
    """Random bodies (NaN, infinities, huge integers, lone surrogates, nesting, random bytes) on
    the POST endpoints: every answer is JSON, 200 or a 4xx error, never a 5xx."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    # The profile's count (tests/conftest.py: 60 by default, HYPOTHESIS_PROFILE=thorough: 2000), x4:
    # ten request bodies on eight endpoints share the examples.
    examples = 4 * settings().max_examples
    texts = st.text(max_size=40) | st.text(st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010), max_size=5)
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.integers(10**20, 10**400) | st.floats() | texts,
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(texts, inner, max_size=5),
        max_leaves=20,
    )
    fields = st.sampled_from(sorted({f for kinds in FIELD_KINDS.values() for f in kinds} | {"surprise"}))
    bodies = st.dictionaries(fields, json_values, max_size=5)
    content_types = st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain"])
    statuses: list[int] = []

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    @given(path=st.sampled_from(sorted({_path(n) for n in VALID})), body=bodies, raw=st.none() | st.binary(max_size=64),
           content_type=content_types)
    def check(path, body, raw, content_type):
        sent = raw if raw is not None else _to_json(body)
        code, got_type, data = _request(served, "POST", path, sent, {"content-type": content_type})
        statuses.append(code)
        assert code == 200 or 400 <= code < 500, (path, sent[:300], code, data[:500])
        assert got_type.startswith("application/json"), (path, sent[:300], code, got_type)
        if code >= 400:
            _assert_json_error((code, got_type, data), (path, sent[:300]))

    check()
    assert len(statuses) >= examples and sum(s >= 400 for s in statuses) > 0.8 * len(statuses)
    assert requests.get(f"{served['url']}/healthz", timeout=30).status_code == 200


def test_overload_gives_503_with_retry_after_and_bounded_memory(served):
    """Many concurrent clients for a fixed time: only 200 and documented 503s; replica memory
    stays bounded; the app is healthy afterwards."""
    import concurrent.futures
    import os

    def rss_mb() -> float:
        total = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read()
                if b"ServeReplica" in cmd:
                    for line in open(f"/proc/{pid}/status"):
                        if line.startswith("VmRSS"):
                            total += int(line.split()[1])
            except OSError:
                continue
        return total / 1024

    texts = [p.query for p in served["pairs"][:16]]

    def client(i: int, seconds: float) -> list[tuple[int, str | None]]:
        seen, stop = [], time.time() + seconds
        with requests.Session() as session:  # closed here, by the client first: nothing lingers on the port
            while time.time() < stop:
                body = {"input": texts[i % 16: i % 16 + 8]} if i % 2 else {"query": texts[i % 16], "rerank": True,
                                                                          "rerank_depth": 5}
                r = session.post(f"{served['url']}{'/v1/embeddings' if i % 2 else '/search'}", json=body, timeout=120)
                seen.append((r.status_code, r.headers.get("retry-after")))
        return seen

    def load(seconds: float) -> list[tuple[int, str | None]]:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            return [x for part in pool.map(client, range(12), [seconds] * 12) for x in part]

    # Warm-up load first: allocator caches and batch buffers reach their working size; then
    # twice as long again must not grow memory much (queues are bounded, nothing piles up).
    results = load(3)
    warmed = rss_mb()
    results += load(6)
    grown = rss_mb() - warmed
    codes = {c for c, _ in results}
    assert codes <= {200, 503}, codes
    assert 200 in codes and 503 in codes  # 12 clients against a queue of 4: backpressure engaged
    assert all(retry == "2" for c, retry in results if c == 503)
    assert grown < 200, (warmed, grown)
    assert requests.get(f"{served['url']}/healthz").status_code == 200


def test_bearer_token_guards_every_endpoint_but_health(served, tiny_models, monkeypatch):
    from ray import serve

    from raytrieve.serve.app import build_app

    monkeypatch.setenv("RAYTRIEVE_TEST_TOKEN", "s3cret-token")
    cfg = from_dict(ServeConfig, {"dense": {"model": str(tiny_models["dense"]), "num_cpus": 0.05, "torch_threads": 1},
                                  "auth_token_env": "RAYTRIEVE_TEST_TOKEN"})
    serve.run(build_app(cfg), name="secured", route_prefix="/secured")
    url = f"{served['proxy']}/secured"
    try:
        assert requests.get(f"{url}/healthz").status_code == 200
        assert requests.get(f"{url}/health").status_code == 200  # TEI's probe, also without the token
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
            r = requests.post(f"{url}/v1/embeddings", json={"input": "hi"}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["field"] == "authorization"
            assert r.headers["www-authenticate"] == "Bearer"
        r = requests.post(f"{url}/embed", json={"inputs": "hi"})  # TEI's route: TEI's shape
        assert r.status_code == 401 and _error_of(r, "/embed", {"inputs": "hi"})["field"] == "authorization"
        assert requests.get(f"{url}/v1/models").status_code == 401
        # Unauthenticated malformed requests learn nothing about the schema.
        assert requests.post(f"{url}/v1/embeddings", data=b"{bad").status_code == 401
        for scheme in ("Bearer", "bearer", "BEARER"):  # the scheme is case-insensitive (RFC 9110), the token not
            r = requests.post(f"{url}/v1/embeddings", json={"input": "hi"}, headers={"Authorization": f"{scheme} s3cret-token"})
            assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 32
        r = requests.post(f"{url}/v1/embeddings", json={"input": "hi"}, headers={"Authorization": "Bearer S3CRET-TOKEN"})
        assert r.status_code == 401
    finally:
        serve.delete("secured")


def test_healthz_and_health_are_503_while_a_model_has_no_replica_that_answers(served, tiny_models):
    """Readiness, not a fixed answer: with its model's replica killed (Serve starts another,
    which loads the model again), /healthz answers 503 naming that model and TEI's /health 503
    with TEI's error body, both without the token; once the new replica answers, 200 again and
    the model serves. (``serve.run`` itself waits for every replica, so a crash is the window a
    client can see; it is the same check at a start.) Serve finds the dead replica by its health
    check, every ``health_check_period_s``: here Serve's 10 s rather than raytrieve's 2, for a
    window a test can see (the tiny model's new replica answers a second or two after it is
    found). Each deployment has that period, as Serve's REST API reports, and how often a
    stopping replica looks whether its requests are done (Serve's 2 s made every stop take 2 s
    per tier of deployments)."""
    from concurrent.futures import ThreadPoolExecutor

    import ray
    from ray import serve

    from raytrieve.serve.app import DRAIN_POLL_S, HEALTH_CACHE_S, build_app
    from tests.conftest import state_address

    cfg = from_dict(ServeConfig, {"dense": {"model": str(tiny_models["dense"]), "num_cpus": 0.05,
                                            "torch_threads": 1}, "health_check_period_s": 10})
    name = cfg.dense.public_name
    serve.run(build_app(cfg), name="readiness", route_prefix="/readiness")
    url = f"{served['proxy']}/readiness"
    try:
        apps = requests.get(f"{state_address()}/api/serve/applications/", timeout=30).json()["applications"]
        periods = {d: (v["deployment_config"]["health_check_period_s"],
                       v["deployment_config"]["graceful_shutdown_wait_loop_s"])
                   for d, v in apps["readiness"]["deployments"].items()}
        assert periods == {"ingress": (10.0, DRAIN_POLL_S), "dense": (10.0, DRAIN_POLL_S)}, periods
        r = requests.get(f"{url}/healthz", timeout=30)
        assert r.status_code == 200 and r.json()["status"] == "ok" and "not_ready" not in r.json(), r.text
        r = requests.get(f"{url}/health", timeout=30)
        assert r.status_code == 200 and r.content == b""
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith("SERVE_REPLICA::readiness#dense#")]
        assert len(replicas) == 1, replicas
        time.sleep(HEALTH_CACHE_S)  # past the round of pings that answered the 200s
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
        deadline = time.monotonic() + 30
        while replicas[0]["name"] in {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}:
            assert time.monotonic() < deadline, "the killed replica is still alive"
            time.sleep(0.05)
        with ThreadPoolExecutor(2) as pool:  # both at once: each waits at most HEALTH_TIMEOUT_S
            healthz, health = pool.map(lambda path: requests.get(f"{url}/{path}", timeout=30), ("healthz", "health"))
        assert healthz.status_code == 503, healthz.text
        assert healthz.json() == {"status": "not_ready", "models": {"dense": [name]}, "index": False,
                                  "not_ready": {"dense": [name]}}
        assert health.status_code == 503 and health.json() == {"error": f"not ready: dense {name}",
                                                               "error_type": "unhealthy"}
        deadline = time.monotonic() + 180
        while requests.get(f"{url}/healthz", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "no new replica answered within 180 s"
            time.sleep(0.5)
        assert requests.get(f"{url}/health", timeout=30).status_code == 200
        assert requests.post(f"{url}/v1/embeddings", json={"input": "hi"}, timeout=60).status_code == 200
    finally:
        serve.delete("readiness")


def _same_hits(a: list[dict], b: list[dict]) -> None:
    """Equal answers up to float noise: scores within 1e-4, ids in the same order where no two
    neighbouring scores are that close (a near-tie may order either way)."""
    np.testing.assert_allclose([h["score"] for h in a], [h["score"] for h in b], atol=1e-4)
    scores = [h["score"] for h in a]
    if all(abs(x - y) > 1e-4 for x, y in zip(scores, scores[1:])):
        assert [h["id"] for h in a] == [h["id"] for h in b]
    else:
        assert {h["id"] for h in a} == {h["id"] for h in b}


def test_concurrent_searches_equal_the_same_searches_one_at_a_time(served):
    """Queries that arrive together can batch in each model replica (its recall takes the batched
    path when another query is in the replica): the answers equal those of the queries alone."""
    import concurrent.futures

    queries = [p.query for p in served["pairs"][10:22]]
    body = {"top_k": 10, "return_text": False, "recall": {"dense": 20, "sparse": 20}}
    alone = [_post(served["url"], "/search", {**body, "query": q}).json()["hits"] for q in queries]
    # Three at a time: the fixture queues at most 4 requests (limits.max_queued_requests; more get 503).
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda q: _post(served["url"], "/search", {**body, "query": q}), queries))
    assert [r.status_code for r in together] == [200] * len(queries), [r.text for r in together if r.status_code != 200]
    for a, r in zip(alone, together):
        _same_hits(a, r.json()["hits"])


def test_recall_in_ingress_answers_as_the_replicas_do(served, tiny_models, s3_store):
    """A second app whose ingress encodes and searches itself (recall_in_ingress) with the query
    model in ONNX Runtime there (ingress_backend) and in torch in its deployment: /search answers
    as the main app's tiny-dense (ONNX Runtime in its replicas), and /v1/models says where. Its
    index is the same folder in an object store (tests/object_store.py's S3 server, named by the
    URI alone), which the ingress replica downloads into its node's cache."""
    import shutil

    from ray import serve

    from raytrieve.index.build import local_index
    from raytrieve.serve.app import build_app

    s3_store.put(served["root"] / "index_tiny", f"serve/{served['root'].name}/index_tiny")
    index = s3_store.uri(f"serve/{served['root'].name}/index_tiny")
    cfg = from_dict(ServeConfig, {
        "dense": {"model": str(tiny_models["dense"]), "num_cpus": 0.05, "torch_threads": 1, "dtype": "float32"},
        "index": index, "recall_in_ingress": True, "ingress_backend": "onnx"})
    serve.run(build_app(cfg), name="in-ingress", route_prefix="/in-ingress")
    url = f"{served['proxy']}/in-ingress"
    try:
        (model,) = requests.get(f"{url}/v1/models", timeout=30).json()["data"]
        assert (model["recall_in"], model["recall_backend"], model["recall_dtype"]) == ("ingress", "onnx", "float32")
        assert model["backend"] == "torch"  # the deployment keeps its own for /v1/embeddings
        body = {"top_k": 10, "recall": {"dense": 20}}
        for pair in served["pairs"][:4]:
            got = _post(url, "/search", {**body, "query": pair.query})
            want = _post(served["url"], "/search", {**body, "query": pair.query, "dense_model": "tiny-dense",
                                                    "recall": {"dense": 20, "sparse": 0}})
            assert got.status_code == 200 and want.status_code == 200, (got.text, want.text)
            _same_hits(got.json()["hits"], want.json()["hits"])
            assert [h["text"] for h in got.json()["hits"]] == [h["text"] for h in want.json()["hits"]]
            assert got.json()["timings_ms"]["recall_dense_ms"] >= 0
    finally:
        serve.delete("in-ingress")
        shutil.rmtree(local_index(index))  # the replica's copy, in this machine's (the user's) cache


def test_served_query_models_must_be_the_ones_that_encoded_the_index(served, tiny_models):
    """The fixture serves splade-tiny from its registered MLflow copy against an index encoded with
    the shipped folder (other path, equal weights: it started). Another dense model is refused at
    start, naming both, unless the config allows the mismatch."""
    from raytrieve.errors import ConfigError
    from raytrieve.serve.launch import check_before_start

    cfg = served["cfg"].model_copy(deep=True)
    cfg.dense = cfg.dense[0].model_copy(update={"model": str(tiny_models["dense"])})  # one dense: "dense.model"
    with pytest.raises(ConfigError) as e:
        check_before_start(cfg, "serve.yaml")
    msg = str(e.value)
    assert msg.startswith(f"serve.yaml.dense.model: serves {str(tiny_models['dense'])!r}, but the index's dense")
    assert "encoded with 'all-minilm-l6-v2'" in msg and "dense.allow_index_model_mismatch: true" in msg
    cfg.dense = cfg.dense.model_copy(update={"allow_index_model_mismatch": True})
    check_before_start(cfg, "serve.yaml")  # allowed explicitly
    # Per model: the second dense model searching the first's index is refused by its own key.
    check_before_start(served["cfg"], "serve.yaml")
    cfg = served["cfg"].model_copy(deep=True)
    cfg.dense[1] = cfg.dense[1].model_copy(update={"index": served["cfg"].index})
    with pytest.raises(ConfigError, match=r"^serve.yaml.dense\[1\].model: serves .* dense\[1\].allow_index_model_mism"):
        check_before_start(cfg, "serve.yaml")
    # A length past the model's position embeddings, by its key, before Ray is touched.
    cfg = served["cfg"].model_copy(deep=True)
    cfg.reranker[0] = cfg.reranker[0].model_copy(update={"max_seq_length": 600})
    with pytest.raises(ConfigError, match=r"^serve.yaml.reranker\[0\].max_seq_length: 600 is more than the 512 "
                       r"positions .*at most 512"):
        check_before_start(cfg, "serve.yaml")
