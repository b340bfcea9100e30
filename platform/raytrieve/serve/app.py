"""The HTTP application: a FastAPI ingress composing the model and index deployments, and the
app builder.

    app = build_app(load_serve_config("jobs/configs/serve_pydocs.yaml"))   # a bound Application
    serve.run(app, name="raytrieve", route_prefix="/")

The endpoints check requests against the config's limits, call the deployments (``/search``
runs serve/search.py's pipeline over them) and shape the answers. Tokens, body bounds, metrics
and the error shape (4xx JSON naming the field) are serve/http_guard.py's. Overload gives 503
with Retry-After (Serve's ``max_queued_requests`` at the proxy).
"""

import base64
import os
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from raytrieve.serve import http_guard
from raytrieve.serve.config import LimitsConfig, ServeConfig
from raytrieve.serve.deployments import ModelReplica, Retriever
from raytrieve.serve.http_guard import ApiError, SafeJSONResponse
from raytrieve.serve.schemas import EmbeddingsRequest, RerankRequest, SearchRequest, SparseRequest
from raytrieve.serve.search import Retrieval, SearchError, SearchPipeline

api = FastAPI(
    title="raytrieve",
    description="Hybrid retrieval, embeddings and reranking.",
    version="1",
    default_response_class=SafeJSONResponse,
)
http_guard.install(api)


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


def _check_search_limits(body: SearchRequest, limits: LimitsConfig) -> None:
    """The config's bounds on a /search request; what the pipeline cannot serve it refuses itself."""
    _texts(body.query, "query", 1, limits.max_text_chars)
    if body.top_k > limits.max_top_k:
        raise ApiError(422, "top_k", f"top_k: {body.top_k}, at most {limits.max_top_k}")
    for name in ("dense", "sparse"):
        if getattr(body.recall, name) > limits.max_recall:
            raise ApiError(422, f"recall.{name}", f"recall.{name}: at most {limits.max_recall}")
    if body.rerank and body.rerank_depth > limits.max_rerank_depth:
        raise ApiError(422, "rerank_depth", f"rerank_depth: at most {limits.max_rerank_depth}")


def _search_pipeline(handles: dict[str, DeploymentHandle | None], retriever: DeploymentHandle) -> SearchPipeline:
    """/search over the deployments: each served encoder's query side with its index, the
    retriever's texts, and the reranker when one is served."""

    def retrieval(kind: str, encoder: DeploymentHandle) -> Retrieval:
        async def encode(query: str) -> Any:
            return (await encoder.remote([query], "query"))[0]

        async def search(vector: Any, k: int) -> list[tuple[str, float]]:
            return await getattr(retriever, kind).remote(vector, k)

        return Retrieval(encode, search)

    async def lookup(ids: list[str]) -> list[str]:
        return await retriever.lookup.remote(ids)

    reranker = handles["reranker"]

    async def rerank(pairs: list[tuple[str, str]]) -> list[float]:
        assert reranker is not None, "passed to the pipeline only when a reranker is served"
        return await reranker.remote(pairs)

    retrievers = {k: retrieval(k, h) for k in ("dense", "sparse") if (h := handles[k]) is not None}
    return SearchPipeline(retrievers, lookup, rerank if reranker is not None else None)


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
        self.searcher = _search_pipeline(self.handles, retriever) if retriever is not None else None
        self.names = {k: getattr(cfg, k).public_name for k, h in self.handles.items() if h is not None}
        self.token = token
        self.info: dict[str, dict[str, Any]] = {}
        api.state.ingress = self  # for http_guard's middleware (one ingress per replica process)
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
        if self.searcher is None:
            raise ApiError(404, "path", "no index is served here (set index: in the serve config)", "not_found")
        _check_search_limits(body, self.limits)
        try:
            return await self.searcher.search(body)
        except SearchError as e:
            raise ApiError(422, e.field, str(e)) from None


def build_app(cfg: ServeConfig, where: str = "config") -> Any:
    """The bound Serve application: one deployment per configured model, the retriever when
    an index is set, and the ingress over them. On a running cluster, what the config leaves
    unset is sized from it first, and a config the cluster cannot hold is refused."""
    import ray
    from ray.serve.config import BackpressureConfig

    from raytrieve.model_ref import is_model_uri
    from raytrieve.serve.config import check_fits, sized
    from raytrieve.sizing import LIGHT_ACTOR_CPUS, cluster_shape
    from raytrieve.tracking import mlflow_run

    if ray.is_initialized():  # `serve build` may import the app without a cluster
        shape = cluster_shape()
        cfg = sized(cfg, shape)
        check_fits(cfg, shape, where)

    def options(kind: str) -> dict[str, Any]:
        d = getattr(cfg, kind)
        actor: dict[str, Any] = {"num_cpus": d.num_cpus if d.num_cpus is not None else 1.0, "num_gpus": d.num_gpus}
        if is_model_uri(d.model):  # the replica downloads it from the same store
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
        Retriever.options(name="retriever", ray_actor_options={"num_cpus": LIGHT_ACTOR_CPUS}).bind(cfg.index)  # pyright: ignore[reportFunctionMemberAccess]
        if cfg.index
        else None
    )
    ingress = serve.deployment(Ingress).options(  # pyright: ignore[reportFunctionMemberAccess]
        name="ingress",
        num_replicas=cfg.ingress_replicas,
        ray_actor_options={"num_cpus": LIGHT_ACTOR_CPUS},
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
    return build_app(cfg, "serve args")


def check_before_start(cfg: ServeConfig, where: str = "config") -> None:
    """What can fail before Ray starts: the config, each model path, the index folder."""
    from raytrieve.errors import ConfigError, RaytrieveError
    from raytrieve.index.build import load_indices
    from raytrieve.kinds import MODEL_KINDS
    from raytrieve.model_ref import is_model_uri, resolve_model
    from raytrieve.tracking import mlflow_run

    cfg.check(where)
    for kind in (k.serve_field for k in MODEL_KINDS.values()):
        d = getattr(cfg, kind)
        if d is not None:
            try:
                with mlflow_run.environment(mlflow_run.tracking_uri(cfg.mlflow_tracking_uri)):
                    resolve_model(d.model)
            except RaytrieveError as e:
                # tracking/model_uri.py turns every MLflow error into a ModelLoadError; here the
                # store comes from this config, so the fix names its key too.
                hint = (
                    f" (store: {mlflow_run.tracking_uri(cfg.mlflow_tracking_uri)}; set {where}.mlflow_tracking_uri "
                    "to the store the model is registered in)"
                    if is_model_uri(d.model)
                    else ""
                )
                raise ConfigError(f"{where}.{kind}.model: {e}{hint}") from None
    if cfg.index:
        indices = load_indices(cfg.index)
        for k in MODEL_KINDS.values():
            if k.vectors and getattr(cfg, k.serve_field) is not None and getattr(indices, k.vectors) is None:
                raise ConfigError(
                    f"{where}.index {cfg.index}: has no {k.vectors}/ index for the {k.serve_field} model; build "
                    f"it from vectors encoded with that model, or drop {k.serve_field}:"
                )


def start(cfg: ServeConfig, where: str = "config", ray_address: str | None = "local", blocking: bool = False) -> str:
    """Check, start Serve on cfg.host:cfg.port and deploy; returns the base URL."""

    check_before_start(cfg, where)
    from raytrieve.ray_cluster import connect

    connect(ray_address)
    app = build_app(cfg, where)  # sized from the cluster and checked to fit before Serve starts
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=blocking)
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
