"""The HTTP application: a FastAPI ingress composing the model and index deployments, and the
app builder.

    app = build_app(load_serve_config("jobs/configs/serve_pydocs.yaml"))   # a bound Application
    serve.run(app, name="raytrieve", route_prefix="/")

The endpoints check requests against the config's limits, call the deployments (``/search``
runs serve/search.py's pipeline over them) and shape the answers. Tokens, body bounds, metrics
and the error shape (4xx JSON naming the field) are serve/http_guard.py's. Overload gives 503
with Retry-After (Serve's ``max_queued_requests`` at the proxy).

Besides raytrieve's own routes, the ingress answers in the shapes of the clients people have:
OpenAI's embeddings, Cohere's v1/v2 and Jina's rerank, and TEI's routes (schemas.py has their
request bodies, shapes.py the checks of texts and the answers' bodies).
"""

import asyncio
import os
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from raytrieve.serve import cluster_metrics, http_guard, shapes
from raytrieve.serve.config import ServeConfig
from raytrieve.serve.deployments import ModelReplica, Retriever
from raytrieve.serve.http_guard import ApiError, SafeJSONResponse
from raytrieve.serve.schemas import (
    CohereRerankV1Request,
    CohereRerankV2Request,
    EmbeddingsRequest,
    RerankBody,
    RerankRequest,
    SearchRequest,
    SparseBody,
    TeiEmbedRequest,
    TeiSparseRequest,
    TokenizeRequest,
)
from raytrieve.serve.search import Retrieval, SearchError, SearchPipeline, with_defaults

api = FastAPI(
    title="raytrieve",
    description="Hybrid retrieval, embeddings and reranking.",
    version="1",
    default_response_class=SafeJSONResponse,
)
http_guard.install(api)

# The model /info and /tokenize describe (TEI serves one model; this app up to three).
PRIMARY_ORDER = ("dense", "sparse", "reranker")


def _search_pipeline(handles: dict[str, DeploymentHandle | None], retriever: DeploymentHandle) -> SearchPipeline:
    """/search over the deployments: each served encoder's query side with its index, the
    retriever's texts, and the reranker when one is served."""

    def retrieval(kind: str, encoder: DeploymentHandle) -> Retrieval:
        async def encode(query: str) -> Any:
            outputs, _ = await encoder.remote([query], "query")
            return outputs[0]

        async def search(vector: Any, k: int) -> list[tuple[str, float]]:
            return await getattr(retriever, kind).remote(vector, k)

        return Retrieval(encode, search)

    async def lookup(ids: list[str]) -> list[str]:
        return await retriever.lookup.remote(ids)

    reranker = handles["reranker"]

    async def rerank(pairs: list[tuple[str, str]]) -> list[float]:
        assert reranker is not None, "passed to the pipeline only when a reranker is served"
        scores, _ = await reranker.remote(pairs)
        return scores

    retrievers = {k: retrieval(k, h) for k in ("dense", "sparse") if (h := handles[k]) is not None}
    return SearchPipeline(retrievers, lookup, rerank if reranker is not None else None)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("raytrieve")
    except PackageNotFoundError:
        return "unknown"


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
        self.cfg, self.limits = cfg, cfg.limits
        self.search_defaults = cfg.search.model_dump()
        self.handles = {"dense": dense, "sparse": sparse, "reranker": reranker}
        self.retriever = retriever
        self.searcher = _search_pipeline(self.handles, retriever) if retriever is not None else None
        self.names = {k: getattr(cfg, k).public_name for k, h in self.handles.items() if h is not None}
        self.primary = next(k for k in PRIMARY_ORDER if self.handles[k] is not None)
        self.token = token
        self.info: dict[str, dict[str, Any]] = {}
        self.version = _version()
        api.state.ingress = self  # for http_guard's middleware (one ingress per replica process)
        # Ray Serve metrics, not a registry of this replica: see serve/cluster_metrics.py.
        self.requests, self.latency = cluster_metrics.request_metrics()

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

    async def _prompt(self, kind: str, prompt_name: str | None) -> str | None:
        """TEI's prompt_name: a key of the model's prompts, else 422."""
        known = (await self._describe(kind)).get("prompts") or []
        if prompt_name is not None and prompt_name not in known:
            raise ApiError(422, "prompt_name", f"prompt_name: {prompt_name!r} is not a prompt of this model: {known}")
        return prompt_name

    async def _dense(
        self, texts: list[str], dimensions: int | None, task: str | None = None, prompt_name: str | None = None
    ) -> tuple[np.ndarray, list[int]]:
        """Float32 vectors of a checked request, and the tokens each text cost."""
        dim = (await self._describe("dense"))["dimensions"]
        if dimensions is not None and not 1 <= dimensions <= dim:
            raise ApiError(422, "dimensions", f"dimensions: {dimensions} is out of range 1..{dim}")
        handle = self._model("dense", None)
        emb, tokens = await handle.remote(texts, task, prompt_name)
        return np.asarray(emb, dtype=np.float32), tokens

    async def _scores(
        self, model: str | None, query: str, documents: list[str], logits: bool, field: str = "documents"
    ) -> tuple[np.ndarray, int]:
        """Reranker scores of (query, document) pairs after the limits, and the tokens they cost.
        ``logits``: the raw logits instead of the model's own activation."""
        handle = self._model("reranker", model, "model" if field == "documents" else "path")
        query = shapes.checked_texts(query, "query", 1, self.limits.max_text_chars)[0]
        docs = shapes.checked_texts(documents, field, self.limits.max_documents, self.limits.max_text_chars)
        scores, tokens = await handle.remote([(query, d) for d in docs], "logits" if logits else None)
        return np.asarray(scores, dtype=np.float32), sum(tokens)

    # -- raytrieve's own endpoints ----------------------------------------------------------------
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
        from prometheus_client import CONTENT_TYPE_LATEST

        # ray.nodes() and the agents' pages are blocking calls: off the event loop.
        urls = await asyncio.to_thread(cluster_metrics.agent_urls)
        if not urls:
            raise ApiError(503, None, "no Ray node exports metrics (Ray's metrics agent is off)", "unavailable")
        text, failed = await asyncio.to_thread(cluster_metrics.gather, urls)
        notes = "".join(f"# raytrieve: no answer from the metrics agent at {url}\n" for url in failed)
        return PlainTextResponse(notes + text, media_type=CONTENT_TYPE_LATEST)

    @api.post("/v1/embeddings")
    async def embeddings(self, body: EmbeddingsRequest) -> dict[str, Any]:
        """OpenAI's embeddings (the openai SDK's client.embeddings.create)."""
        self._model("dense", body.model)
        texts = shapes.checked_texts(body.input, "input", self.limits.max_inputs, self.limits.max_text_chars)
        emb, tokens = await self._dense(texts, body.dimensions, task=body.input_type)
        # OpenAI's dimensions: truncated, then unit length again.
        emb = shapes.shape_vectors(emb, body.dimensions, normalize=body.dimensions is not None)
        data = [
            {"object": "embedding", "index": i, "embedding": shapes.encode_vector(v, body.encoding_format)}
            for i, v in enumerate(emb)
        ]
        usage = {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)}
        return {"object": "list", "data": data, "model": self.names["dense"], "usage": usage}

    @api.post("/embed_sparse")
    async def embed_sparse(self, body: SparseBody) -> Any:
        """raytrieve's body ("input") or TEI's ("inputs")."""
        tei = isinstance(body, TeiSparseRequest)
        handle = self._model("sparse", None if tei else body.model, "path" if tei else "model")
        field = "inputs" if tei else "input"
        texts = shapes.checked_texts(getattr(body, field), field, self.limits.max_inputs, self.limits.max_text_chars)
        if isinstance(body, TeiSparseRequest):
            rows, _ = await handle.remote(texts, None, await self._prompt("sparse", body.prompt_name))
            return shapes.tei_sparse(rows)
        rows, _ = await handle.remote(texts, body.input_type)
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
    async def rerank(self, body: RerankBody) -> Any:
        """raytrieve's body ("documents": the model's own scores) or TEI's ("texts")."""
        if not isinstance(body, RerankRequest):
            logits, _ = await self._scores(None, body.query, body.texts, logits=True, field="texts")
            return shapes.tei_rerank(logits, body.texts, body.raw_scores, body.return_text)
        scores, _ = await self._scores(body.model, body.query, body.documents, logits=False)
        results = []
        for i in shapes.best_first(scores, body.top_n):
            hit = {"index": i, "relevance_score": float(scores[i])}
            if body.return_documents:
                hit["document"] = {"text": body.documents[i]}
            results.append(hit)
        return {"model": self.names["reranker"], "results": results}

    @api.post("/search")
    async def search(self, body: SearchRequest) -> dict[str, Any]:
        if self.searcher is None:
            raise ApiError(404, "path", "no index is served here (set index: in the serve config)", "not_found")
        body = with_defaults(body, self.search_defaults)
        shapes.check_search_limits(body, self.limits)
        try:
            return await self.searcher.search(body)
        except SearchError as e:
            raise ApiError(422, e.field, str(e)) from None

    # -- Cohere's and Jina's rerank -------------------------------------------------------------
    @api.post("/v1/rerank")
    async def rerank_v1(self, body: CohereRerankV1Request) -> dict[str, Any]:
        """Cohere's v1 rerank (cohere.Client().rerank) and Jina's: documents are strings or
        objects with "text"; the answer carries Cohere's id/meta and Jina's model/usage."""
        if body.rank_fields is not None and body.rank_fields != ["text"]:
            raise ApiError(422, "rank_fields", 'rank_fields: only ["text"] is ranked here')
        texts = [d if isinstance(d, str) else d.text for d in body.documents]
        scores, tokens = await self._scores(body.model, body.query, texts, logits=True)
        scores = shapes.sigmoid(scores)
        results = []
        for i in shapes.best_first(scores, body.top_n):
            hit: dict[str, Any] = {"index": i, "relevance_score": float(scores[i])}
            if body.return_documents:
                doc = body.documents[i]
                hit["document"] = {"text": doc} if isinstance(doc, str) else doc.model_dump()
            results.append(hit)
        answer = shapes.cohere_answer(results, len(texts), tokens, "1")
        return {**answer, "model": self.names["reranker"], "usage": {"total_tokens": tokens}}

    @api.post("/v2/rerank")
    async def rerank_v2(self, body: CohereRerankV2Request) -> dict[str, Any]:
        """Cohere's v2 rerank (cohere.ClientV2().rerank); ``priority`` is accepted and has no effect."""
        scores, tokens = await self._scores(body.model, body.query, body.documents, logits=True)
        scores = shapes.sigmoid(scores)
        results = [{"index": i, "relevance_score": float(scores[i])} for i in shapes.best_first(scores, body.top_n)]
        return shapes.cohere_answer(results, len(body.documents), tokens, "2")

    # -- TEI (text-embeddings-inference) --------------------------------------------------------
    @api.post("/embed")
    async def embed(self, body: TeiEmbedRequest) -> list[list[float]]:
        self._model("dense", None, "path")
        texts = shapes.checked_texts(body.inputs, "inputs", self.limits.max_inputs, self.limits.max_text_chars)
        emb, _ = await self._dense(texts, body.dimensions, prompt_name=await self._prompt("dense", body.prompt_name))
        return shapes.shape_vectors(emb, body.dimensions, body.normalize).tolist()

    @api.post("/tokenize")
    async def tokenize(self, body: TokenizeRequest) -> list[list[dict[str, Any]]]:
        """TEI's tokenize, with the tokenizer of the model /info describes."""
        texts = shapes.checked_texts(body.inputs, "inputs", self.limits.max_inputs, self.limits.max_text_chars)
        handle = self._model(self.primary, None, "path")
        prompt_name = await self._prompt(self.primary, body.prompt_name)
        return await handle.tokenize.remote(texts, body.add_special_tokens, prompt_name)

    @api.get("/info")
    async def tei_info(self) -> dict[str, Any]:
        """TEI's /info, for the first served of dense, sparse, reranker."""
        kind = self.primary
        info = await self._describe(kind)
        return shapes.tei_info(kind, self.names[kind], info, getattr(self.cfg, kind), self.limits, self.version)

    @api.get("/health")
    async def health(self) -> Response:
        """TEI's liveness probe: 200, empty body."""
        return Response(status_code=200)


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
