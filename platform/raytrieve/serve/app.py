"""The HTTP application: a FastAPI ingress composing the model and index deployments, and the
app builder.

    app = build_app(load_serve_config("jobs/configs/serve_pydocs.yaml"))   # a bound Application
    serve.run(app, name="raytrieve", route_prefix="/")

Errors are JSON ``{"error": {"type", "message", "field"}}`` with a 4xx status that says what
was wrong: 400 unreadable body, 401 missing token, 404 unknown model or path, 413 body too
large (declared or chunked), 415 a body that is not JSON, 422 a field out of its limits or of
the wrong type. Overload gives 503 with Retry-After (Serve's ``max_queued_requests`` at the
proxy); anything else is a bug, answered 500 in the same JSON shape.
"""

import asyncio
import base64
import hmac
import json
import os
import re
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message

from raytrieve.serve import fusion
from raytrieve.serve.config import ServeConfig
from raytrieve.serve.deployments import ModelReplica, Retriever
from raytrieve.serve.schemas import EmbeddingsRequest, RerankRequest, SearchRequest, SparseRequest


class ApiError(Exception):
    def __init__(self, status: int, field: str | None, message: str, kind: str = "invalid_request") -> None:
        super().__init__(message)
        self.status, self.field, self.message, self.kind = status, field, message, kind


class SafeJSONResponse(JSONResponse):
    """JSON that always renders: a string that is not valid Unicode (a lone surrogate, which
    JSON escapes may carry in) comes back \\u-escaped instead of failing the answer with a 500."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(
    status: int, kind: str, message: str, field: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return SafeJSONResponse(
        {"error": {"type": kind, "message": message, "field": field}}, status_code=status, headers=headers
    )


api = FastAPI(
    title="raytrieve",
    description="Hybrid retrieval, embeddings and reranking.",
    version="1",
    default_response_class=SafeJSONResponse,
)


@api.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError) -> JSONResponse:
    return error_response(e.status, e.kind, e.message, e.field)


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


# pydantic names the member of a union it tried ("input.list[str].0", "input.function-after[...]"):
# clients want the field, so those parts are dropped from the location.
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|function-[a-z-]+\[.*\])$")


def _field_of(loc: tuple[Any, ...]) -> tuple[str, int]:
    """("body", "input", "list[str]", 1) -> ("input[1]", 3): the field and how deep it lies."""
    parts: list[str] = []
    for i, x in enumerate(loc):
        if isinstance(x, int) and parts:
            parts[-1] += f"[{x}]"
        elif (i == 0 and x == "body") or (i > 0 and _UNION_MEMBER.match(str(x))):
            continue
        else:
            parts.append(str(x))
    return ".".join(parts), len(loc)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    errors = e.errors() or [{}]
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ())]
    if first.get("type") == "json_invalid" or (len(loc) <= 2 and "JSON" in str(first.get("msg", ""))):
        return error_response(400, "invalid_json", f"the body is not valid JSON: {first.get('msg', '')}", "body")
    if loc == ["body"] and not _is_json(request.headers.get("content-type")):
        # FastAPI leaves a body of another media type unparsed; say what to send rather than
        # "Input should be a valid dictionary".
        return error_response(
            415,
            "unsupported_media_type",
            f"the body must be JSON sent with Content-Type: application/json, "
            f"got {request.headers.get('content-type') or 'no Content-Type'}",
            "content-type",
        )
    # The error that got deepest into the value says most ("input[0]: should be a string" for
    # a list of numbers), and a refused value more than a union member of another type; a value
    # no member of a union accepts lists what each wanted.
    located = [
        (*_field_of(tuple(err.get("loc", ()))), str(err.get("type", "")), str(err.get("msg", "invalid value")))
        for err in errors
    ]
    depth = max(d for _, d, _, _ in located)
    field = next(f for f, d, _, _ in located if d == depth)
    here = [(t, m) for f, d, t, m in located if f == field and d == depth]
    refused = [(t, m) for t, m in here if not t.endswith("_type")]
    messages = list(dict.fromkeys(m for _, m in refused or here))
    return error_response(422, "invalid_request", f"{field or 'body'}: {', or '.join(messages)}", field or "body")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """Routing and body errors raised by FastAPI itself, in our error shape."""
    if e.status_code == 404:
        return error_response(404, "not_found", f"no endpoint {request.url.path}", "path")
    if e.status_code == 405:
        return error_response(
            405, "method_not_allowed", f"{request.method} is not allowed on {request.url.path}", "method"
        )
    if e.status_code == 400:
        # FastAPI hides why json.loads failed (nesting too deep, an integer of too many digits,
        # bytes that are not UTF-8); the cause is what the client needs to fix.
        cause = e.__cause__
        why = f"{e.detail} ({type(cause).__name__}: {str(cause)[:200]})" if cause is not None else e.detail
        return error_response(400, "invalid_json", f"the body could not be read: {why}", "body")
    return error_response(e.status_code, "http_error", str(e.detail), None)


@api.exception_handler(Exception)
async def _unexpected(request: Request, e: Exception) -> JSONResponse:
    """A bug or a failed replica is still a 500, but in the error shape clients parse."""
    return error_response(
        500, "internal_error", f"{type(e).__name__} while serving {request.url.path}; see the ingress log", None
    )


class _Guard:
    """Before the app sees a request: the bearer token, then the body, read whole and bounded
    (a declared Content-Length is checked before reading; a chunked body has none, so its bytes
    are counted as they arrive). After: metrics. Pure ASGI rather than @app.middleware, so the
    body can be bounded while it streams in."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        ingress = getattr(scope["app"].state, "ingress", None) if scope["type"] == "http" else None
        if ingress is None:
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [500]

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal, body = _check_headers(ingress, scope), b""
            if refusal is None:
                refusal, body = await _read_body(receive, ingress.limits.max_body_bytes)
            if refusal is not None:
                await refusal(scope, receive, send_counted)
            elif body is not None:
                await self.app(scope, _replay(body, receive), send_counted)
            else:  # the client went away mid-body: nobody to answer, and not a server error
                status[0] = 499
        finally:
            # Known routes only: fuzzed paths must not grow the metrics registry.
            path = getattr(scope.get("route"), "path", "other")
            ingress.requests.labels(path, str(status[0])).inc()
            ingress.latency.labels(path).observe(time.perf_counter() - started)


def _check_headers(ingress: "Ingress", scope: dict[str, Any]) -> JSONResponse | None:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    if ingress.token is not None and not scope["path"].rstrip("/").endswith("/healthz"):
        given = headers.get("authorization", "")
        if not hmac.compare_digest(given.encode("latin-1"), f"Bearer {ingress.token}".encode()):
            return error_response(
                401,
                "unauthorized",
                "missing or wrong bearer token (Authorization: Bearer ...)",
                "authorization",
                headers={"WWW-Authenticate": "Bearer"},
            )
    length = headers.get("content-length")
    if length is not None:
        # ASCII digits only: str.isdigit() also accepts "²", which int() then refuses.
        if not (length.isascii() and length.isdigit()):
            return error_response(400, "invalid_request", "Content-Length is not a number", "content-length")
        if int(length) > ingress.limits.max_body_bytes:
            return error_response(
                413, "too_large", f"body of {length} bytes, at most {ingress.limits.max_body_bytes}", "body"
            )
    return None


async def _read_body(receive: Any, limit: int) -> tuple[JSONResponse | None, bytes | None]:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None, None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return error_response(
                413, "too_large", f"body over {limit} bytes (sent without Content-Length)", "body"
            ), b""
        chunks.append(chunk)
        if not message.get("more_body", False):
            return None, b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    """The body already read, as one message; later calls wait on the client (disconnects)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


api.add_middleware(_Guard)


def _texts(value: str | list[str], field: str, limit_count: int, limit_chars: int) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not texts:
        raise ApiError(422, field, f"{field}: give at least one text")
    if len(texts) > limit_count:
        raise ApiError(422, field, f"{field}: {len(texts)} texts, at most {limit_count} per request")
    for i, t in enumerate(texts):
        name = field if isinstance(value, str) else f"{field}[{i}]"
        if not t.strip():
            raise ApiError(422, name, f"{name}: empty text")
        if len(t) > limit_chars:
            raise ApiError(422, name, f"{name}: {len(t)} characters, at most {limit_chars}")
    return texts


def _encode_vector(v: np.ndarray, fmt: str) -> Any:
    if fmt == "base64":  # OpenAI's: little-endian float32 bytes
        return base64.b64encode(v.astype("<f4").tobytes()).decode()
    if fmt == "int8":  # unit vectors: [-1, 1] onto [-127, 127]
        return np.clip(np.round(v * 127), -127, 127).astype(np.int8).tolist()
    if fmt == "binary":  # sign bits, 8 dimensions a byte (uint8), as sentence-transformers' ubinary
        return np.packbits(v > 0).tolist()
    return v.tolist()


# serve.ingress serializes the FastAPI app when the class is decorated: every helper the
# endpoints call must already be defined above this point.
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        cfg: ServeConfig,
        token: str | None,
        dense: DeploymentHandle | None,
        sparse: DeploymentHandle | None,
        reranker: DeploymentHandle | None,
        retriever: DeploymentHandle | None,
    ) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.cfg, self.limits = cfg, cfg.limits
        self.handles = {"dense": dense, "sparse": sparse, "reranker": reranker}
        self.retriever = retriever
        self.names = {k: getattr(cfg, k).public_name for k, h in self.handles.items() if h is not None}
        self.token = token
        self.info: dict[str, dict[str, Any]] = {}
        api.state.ingress = self  # for the middleware below (one ingress per replica process)
        self.registry = CollectorRegistry()
        self.requests = Counter("raytrieve_requests", "HTTP requests", ["path", "status"], registry=self.registry)
        self.latency = Histogram(
            "raytrieve_request_seconds",
            "Request latency",
            ["path"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )

    async def _describe(self, kind: str) -> dict[str, Any]:
        if kind not in self.info:
            handle = self.handles[kind]
            assert handle is not None, "described only for a served model"
            self.info[kind] = await handle.describe.remote()
        return self.info[kind]

    def _model(self, kind: str, requested: str | None, field: str = "model") -> DeploymentHandle:
        handle = self.handles.get(kind)
        if handle is None:
            raise ApiError(
                404, field, f"no {kind} model is served here; served: {sorted(self.names.values())}", "model_not_found"
            )
        if requested is not None and requested != self.names[kind]:
            raise ApiError(
                404,
                field,
                f"model {requested!r} is not served for this endpoint; use {self.names[kind]!r}",
                "model_not_found",
            )
        return handle

    # -- endpoints ------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "models": self.names, "index": self.retriever is not None}

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        data = [
            {"id": name, "object": "model", "owned_by": "raytrieve", **(await self._describe(kind))}
            for kind, name in self.names.items()
        ]
        return {"object": "list", "data": data}

    @api.get("/metrics")
    async def metrics(self) -> PlainTextResponse:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(self.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @api.post("/v1/embeddings")
    async def embeddings(self, body: EmbeddingsRequest) -> dict[str, Any]:
        handle = self._model("dense", body.model)
        texts = _texts(body.input, "input", self.limits.max_inputs, self.limits.max_text_chars)
        info = await self._describe("dense")
        dim = info["dimensions"]
        if body.dimensions is not None and not 1 <= body.dimensions <= dim:
            raise ApiError(422, "dimensions", f"dimensions: {body.dimensions} is out of range 1..{dim}")
        emb = np.asarray(await handle.remote(texts, body.input_type), dtype=np.float32)
        if body.dimensions is not None:  # Matryoshka: truncate, then unit length again
            emb = emb[:, : body.dimensions]
            emb = emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)
        data = [
            {"object": "embedding", "index": i, "embedding": _encode_vector(v, body.encoding_format)}
            for i, v in enumerate(emb)
        ]
        tokens = sum(len(t.split()) for t in texts)
        return {
            "object": "list",
            "data": data,
            "model": self.names["dense"],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    @api.post("/embed_sparse")
    async def embed_sparse(self, body: SparseRequest) -> dict[str, Any]:
        handle = self._model("sparse", body.model)
        texts = _texts(body.input, "input", self.limits.max_inputs, self.limits.max_text_chars)
        rows = await handle.remote(texts, body.input_type)
        data = []
        for i, (indices, values) in enumerate(rows):
            if body.top_k is not None:
                indices, values = indices[: body.top_k], values[: body.top_k]
            entry = [{"index": int(a), "value": float(b)} for a, b in zip(indices, values)]
            if body.return_tokens and entry:
                for e, tok in zip(entry, await handle.tokens.remote([int(a) for a in indices])):
                    e["token"] = tok
            data.append({"object": "sparse_embedding", "index": i, "embedding": entry})
        return {"object": "list", "data": data, "model": self.names["sparse"]}

    @api.post("/rerank")
    async def rerank(self, body: RerankRequest) -> dict[str, Any]:
        handle = self._model("reranker", body.model)
        query = _texts(body.query, "query", 1, self.limits.max_text_chars)[0]
        if not body.documents:
            raise ApiError(422, "documents", "documents: give at least one document")
        docs = _texts(body.documents, "documents", self.limits.max_documents, self.limits.max_text_chars)
        scores = np.asarray(await handle.remote([(query, d) for d in docs]), dtype=np.float32)
        order = np.argsort(-scores, kind="stable")[: body.top_n]
        results = []
        for i in order:
            hit: dict[str, Any] = {"index": int(i), "relevance_score": float(scores[i])}
            if body.return_documents:
                hit["document"] = {"text": docs[i]}
            results.append(hit)
        return {"model": self.names["reranker"], "results": results}

    @api.post("/search")
    async def search(self, body: SearchRequest) -> dict[str, Any]:
        lim = self.limits
        if self.retriever is None:
            raise ApiError(404, "path", "no index is served here (set index: in the serve config)", "not_found")
        query = _texts(body.query, "query", 1, lim.max_text_chars)[0]
        if body.top_k > lim.max_top_k:
            raise ApiError(422, "top_k", f"top_k: {body.top_k}, at most {lim.max_top_k}")
        for name in ("dense", "sparse"):
            if getattr(body.recall, name) > lim.max_recall:
                raise ApiError(422, f"recall.{name}", f"recall.{name}: at most {lim.max_recall}")
        if body.rerank and body.rerank_depth > lim.max_rerank_depth:
            raise ApiError(422, "rerank_depth", f"rerank_depth: at most {lim.max_rerank_depth}")
        if body.rerank and self.handles["reranker"] is None:
            raise ApiError(422, "rerank", "rerank: no reranker is served here")
        sizes = {
            k: getattr(body.recall, k)
            for k in ("dense", "sparse")
            if self.handles[k] is not None and getattr(body.recall, k) > 0
        }
        if not sizes:
            raise ApiError(422, "recall", "recall: every served retriever is switched off (all sizes 0)")

        timings: dict[str, float] = {}

        async def recall(kind: str) -> list[tuple[str, float]]:
            handle, retriever = self.handles[kind], self.retriever
            assert handle is not None and retriever is not None  # sizes has served kinds only; index checked above
            t = time.perf_counter()
            encoded = (await handle.remote([query], "query"))[0]
            timings[f"encode_{kind}_ms"] = (time.perf_counter() - t) * 1000
            t = time.perf_counter()
            method = retriever.dense if kind == "dense" else retriever.sparse
            hits = await method.remote(encoded, sizes[kind])
            timings[f"recall_{kind}_ms"] = (time.perf_counter() - t) * 1000
            return hits

        lists = dict(zip(sizes, await asyncio.gather(*(recall(k) for k in sizes))))
        per_stage = {k: dict(v) for k, v in lists.items()}
        t = time.perf_counter()
        if len(lists) == 1:
            fused = next(iter(lists.values()))
        elif body.fusion.method == "rrf":
            fused = fusion.rrf(list(lists.values()), k=float(body.fusion.k))
        else:
            weights = [float(getattr(body.fusion, f"{k}_weight")) for k in lists]
            fused = fusion.convex(list(lists.values()), weights, body.fusion.normalization)
        timings["fusion_ms"] = (time.perf_counter() - t) * 1000

        rerank_scores: dict[str, float] = {}
        if body.rerank and fused:
            candidates = fused[: body.rerank_depth]
            ids = [d for d, _ in candidates]
            t = time.perf_counter()
            texts = await self.retriever.lookup.remote(ids)
            reranker = self.handles["reranker"]
            assert reranker is not None  # checked above: rerank needs a served reranker
            scores = await reranker.remote([(query, x) for x in texts])
            timings["rerank_ms"] = (time.perf_counter() - t) * 1000
            rerank_scores = dict(zip(ids, (float(s) for s in scores)))
            order = sorted(range(len(ids)), key=lambda i: (-rerank_scores[ids[i]], i))
            final = [(ids[i], rerank_scores[ids[i]]) for i in order]
        else:
            final = fused
        final = final[: body.top_k]
        texts = await self.retriever.lookup.remote([d for d, _ in final]) if body.return_text else []
        fused_scores = dict(fused)
        hits = []
        for rank, (doc, score) in enumerate(final, start=1):
            hit: dict[str, Any] = {
                "id": doc,
                "rank": rank,
                "score": score,
                "scores": {
                    "dense": per_stage.get("dense", {}).get(doc),
                    "sparse": per_stage.get("sparse", {}).get(doc),
                    "fusion": fused_scores.get(doc) if len(lists) > 1 else None,
                    "rerank": rerank_scores.get(doc),
                },
            }
            if body.return_text:
                hit["text"] = texts[rank - 1]
            hits.append(hit)
        answer: dict[str, Any] = {
            "query": query,
            "hits": hits,
            "timings_ms": {k: round(v, 3) for k, v in timings.items()},
        }
        if body.return_stages:
            answer["stages"] = {
                **{k: [[d, s] for d, s in v] for k, v in lists.items()},
                "fused": [[d, s] for d, s in fused],
            }
        return answer


def build_app(cfg: ServeConfig) -> Any:
    """The bound Serve application: one deployment per configured model, the retriever when
    an index is set, and the ingress over them."""
    from ray.serve.config import BackpressureConfig

    from raytrieve import assets
    from raytrieve.tracking import mlflow_run

    def options(kind: str) -> dict[str, Any]:
        d = getattr(cfg, kind)
        actor: dict[str, Any] = {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus}
        if assets.is_model_uri(d.model):  # the replica downloads it from the same store
            actor["runtime_env"] = {
                "env_vars": mlflow_run.process_env(mlflow_run.tracking_uri(cfg.mlflow_tracking_uri))
            }
        opts: dict[str, Any] = {
            "name": f"{kind}",
            "ray_actor_options": actor,
            "max_ongoing_requests": d.max_ongoing_requests,
        }
        if d.autoscaling:
            opts["autoscaling_config"] = d.autoscaling
        else:
            opts["num_replicas"] = d.num_replicas
        return opts

    # Ray types serve.deployment as the decorator factory only: the decorated classes (and
    # serve.deployment(Ingress)) are Deployments, with .options, at runtime.
    bound = {
        k: ModelReplica.options(**options(k)).bind(k, getattr(cfg, k))  # pyright: ignore[reportFunctionMemberAccess]
        if getattr(cfg, k) is not None
        else None
        for k in ("dense", "sparse", "reranker")
    }
    retriever = (
        Retriever.options(name="retriever", ray_actor_options={"num_cpus": 0.1}).bind(cfg.index)  # pyright: ignore[reportFunctionMemberAccess]
        if cfg.index
        else None
    )
    ingress = serve.deployment(Ingress).options(  # pyright: ignore[reportFunctionMemberAccess]
        name="ingress",
        num_replicas=cfg.ingress_replicas,
        ray_actor_options={"num_cpus": 0.1},
        max_queued_requests=cfg.limits.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=cfg.limits.retry_after_s),
    )
    # The token is read where the app is built (the driver, or `serve deploy`'s builder), so
    # replicas need no secret in their environment.
    token = os.environ.get(cfg.auth_token_env) or None
    return ingress.bind(cfg, token, bound["dense"], bound["sparse"], bound["reranker"], retriever)


def app_builder(args: dict[str, Any]) -> Any:
    """For ``serve deploy`` / ``serve run`` (cluster/serve.yaml): ``args`` is the ServeConfig as
    a mapping, or ``{"config": "path/to/serve.yaml"}``."""
    from raytrieve.config import from_dict
    from raytrieve.serve.config import load_serve_config

    if set(args) == {"config"}:
        cfg = load_serve_config(args["config"])
    else:
        cfg = from_dict(ServeConfig, dict(args), where="serve args")
        cfg.check("serve args")
    return build_app(cfg)


def check_before_start(cfg: ServeConfig, where: str = "config") -> None:
    """What can fail before Ray starts: the config, each model path, the index folder."""
    from raytrieve import assets
    from raytrieve.errors import ConfigError, RaytrieveError
    from raytrieve.index.build import load_indices
    from raytrieve.tracking import mlflow_run

    cfg.check(where)
    for kind in ("dense", "sparse", "reranker"):
        d = getattr(cfg, kind)
        if d is not None:
            try:
                with mlflow_run.environment(mlflow_run.tracking_uri(cfg.mlflow_tracking_uri)):
                    assets.resolve_model(d.model)
            except RaytrieveError as e:
                raise ConfigError(f"{where}.{kind}.model: {e}") from None
            except Exception as e:  # an MLflow store or registry error: name the field
                if not assets.is_model_uri(d.model):
                    raise
                raise ConfigError(
                    f"{where}.{kind}.model {d.model!r}: cannot be read from MLflow at "
                    f"{mlflow_run.tracking_uri(cfg.mlflow_tracking_uri)} ({e}); check the name and "
                    f"version, or set mlflow_tracking_uri:"
                ) from None
    if cfg.index:
        indices = load_indices(cfg.index)
        for kind in ("dense", "sparse"):
            if getattr(cfg, kind) is not None and getattr(indices, kind) is None:
                raise ConfigError(
                    f"{where}.index {cfg.index}: has no {kind}/ index for the {kind} model; build it "
                    f"from vectors encoded with that model, or drop {kind}:"
                )


def start(cfg: ServeConfig, where: str = "config", ray_address: str | None = "local", blocking: bool = False) -> str:
    """Check, start Serve on cfg.host:cfg.port and deploy; returns the base URL."""

    check_before_start(cfg, where)
    from raytrieve.ray_cluster import connect

    connect(ray_address)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=blocking)
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
