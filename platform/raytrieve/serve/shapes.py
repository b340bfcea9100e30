"""What the endpoints (serve/app.py) check of a request's texts, and the bodies they answer in
the shapes of the clients people have: OpenAI's embeddings, Cohere's v1/v2 and Jina's rerank,
TEI's routes (schemas.py has the request bodies). Plain functions over numpy arrays and dicts:
the endpoints call the deployments, these check what goes in and shape what comes out.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

import numpy as np

from raytrieve.serve.config import DeploymentConfig, LimitsConfig, search_limit_error
from raytrieve.serve.http_guard import ApiError
from raytrieve.serve.schemas import SearchRequest


def checked_texts(
    value: str | list[str], field: str, limit_count: int, limit_chars: int, *, query: bool = False
) -> list[str]:
    """``value`` as a list of texts, refused (422 naming ``field`` or its element) when empty, or
    over the count or length limits. A text of whitespace only is embedded and scored as any text
    (OpenAI's API takes it, refusing only ""; one blank chunk failed a client's whole batch); a
    ``query`` of whitespace only is refused (there is nothing to search for)."""
    texts = [value] if isinstance(value, str) else value
    if not texts:
        raise ApiError(422, field, f"{field}: give at least one text")
    if len(texts) > limit_count:
        raise ApiError(422, field, f"{field}: {len(texts)} texts, at most {limit_count} per request")
    for i, t in enumerate(texts):
        name = field if isinstance(value, str) else f"{field}[{i}]"
        if not t or (query and not t.strip()):
            raise ApiError(422, name, f"{name}: empty text")
        if len(t) > limit_chars:
            raise ApiError(422, name, f"{name}: {len(t)} characters, at most {limit_chars}")
    return texts


def check_search_limits(body: SearchRequest, limits: LimitsConfig) -> None:
    """The config's bounds on a /search request; what the pipeline cannot serve it refuses itself."""
    checked_texts(body.query, "query", 1, limits.max_text_chars, query=True)
    problem = search_limit_error(body, limits)
    if problem is not None:
        raise ApiError(422, problem[0], f"{problem[0]}: {problem[1]}")


def encode_vector(v: np.ndarray, fmt: str) -> Any:
    if fmt == "base64":  # OpenAI's: little-endian float32 bytes
        return base64.b64encode(v.astype("<f4").tobytes()).decode()
    if fmt == "int8":  # the unit vector, [-1, 1] onto [-127, 127]: a model without Normalize clipped to ±127
        unit = v / max(float(np.linalg.norm(v)), 1e-12)
        return np.clip(np.round(unit * 127), -127, 127).astype(np.int8).tolist()
    if fmt == "binary":  # sign bits, 8 dimensions a byte (uint8), as sentence-transformers' ubinary
        return np.packbits(v > 0).tolist()
    return v.tolist()


def shape_vectors(emb: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """Matryoshka: keep the first ``dimensions``; then unit length when asked (as
    sentence-transformers' encode(truncate_dim=, normalize_embeddings=))."""
    if dimensions is not None:
        emb = emb[:, :dimensions]
    if normalize:
        emb = emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)
    return emb


def sigmoid(x: np.ndarray) -> np.ndarray:
    # Cohere's, Jina's and TEI's scores are probabilities: sigmoid of the logit (TEI's own rule
    # for one-label models); written with logaddexp so large logits do not overflow.
    return np.exp(-np.logaddexp(0, -x)).astype(np.float32)


def best_first(scores: np.ndarray, top_n: int | None) -> list[int]:
    return [int(i) for i in np.argsort(-scores, kind="stable")[:top_n]]


def tei_sparse(rows: list[tuple[list[int], list[float]]]) -> list[list[dict[str, Any]]]:
    """TEI's /embed_sparse: each vector's entries listed by index."""
    return [[{"index": int(a), "value": float(b)} for a, b in sorted(zip(indices, values))] for indices, values in rows]


def tei_rerank(logits: np.ndarray, texts: list[str], raw_scores: bool, return_text: bool) -> list[dict[str, Any]]:
    """TEI's /rerank: every text best first, its score a probability unless ``raw_scores``."""
    scores = logits if raw_scores else sigmoid(logits)
    hits: list[dict[str, Any]] = []
    for i in best_first(scores, None):
        hit: dict[str, Any] = {"index": i, "score": float(scores[i])}
        if return_text:
            hit["text"] = texts[i]
        hits.append(hit)
    return hits


def cohere_answer(results: list[dict[str, Any]], n_docs: int, tokens: int, version: str) -> dict[str, Any]:
    """What the cohere SDK parses (id, results, meta); Cohere bills a search unit per query
    with up to 100 documents."""
    meta = {
        "api_version": {"version": version},
        "billed_units": {"search_units": -(-n_docs // 100)},
        "tokens": {"input_tokens": tokens, "output_tokens": 0},
    }
    return {"id": str(uuid.uuid4()), "results": results, "meta": meta}


def tei_info(
    kind: str, name: str, info: dict[str, Any], spec: DeploymentConfig, limits: LimitsConfig, version: str
) -> dict[str, Any]:
    """TEI's /info of the served ``kind`` model: ``info`` is what its replica describes."""
    if kind == "reranker":
        labels = info["id2label"]
        model_type: dict[str, Any] = {
            "reranker": {"id2label": labels, "label2id": {v: int(k) for k, v in labels.items()}}
        }
    else:
        model_type = {"embedding": {"pooling": info["pooling"]}}
    return {
        "model_id": name,
        "model_sha": None,
        "model_dtype": info["dtype"],
        "served_model_name": name,
        "model_type": model_type,
        # TEI's bound on waiting requests; here the proxy's queue per ingress replica.
        "max_concurrent_requests": limits.max_queued_requests,
        "max_input_length": info["max_seq_length"],
        "max_batch_tokens": info["max_batch_tokens"],
        "max_batch_requests": None,
        "max_client_batch_size": limits.max_documents if kind == "reranker" else limits.max_inputs,
        "auto_truncate": True,  # texts are always cut at max_input_length
        "tokenization_workers": spec.num_replicas,  # each model replica tokenizes its own batches
        "version": version,
        "sha": None,
        "docker_label": None,
    }
