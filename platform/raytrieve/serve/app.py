"""The HTTP application: a FastAPI ingress composing the model and index deployments, and the
app builder.

    app = build_app(load_serve_config("jobs/configs/serve_pydocs.yaml", ["direct_ingress=false"]))
    serve.run(app, name="raytrieve", route_prefix="/")   # a bound Application, on Serve as it runs

(``direct_ingress`` needs Serve started for it: raytrieve.serve.launch.start does both.)

The endpoints check requests against the config's limits, call the deployments (the one of
each kind a request names, else the default: serve/models.py; ``/search`` runs
serve/search.py's pipeline over the models it picks) and shape the answers. Tokens, body bounds, metrics
and the error shape (4xx JSON naming the field) are serve/http_guard.py's. Overload gives 503
with Retry-After (Serve's ``max_queued_requests`` at the proxy).

Besides raytrieve's own routes, the ingress answers in the shapes of the clients people have:
OpenAI's embeddings, Cohere's v1/v2 and Jina's rerank, and TEI's routes (schemas.py has their
request bodies, shapes.py the checks of texts and the answers' bodies).
"""

import asyncio
import os
import time
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from raytrieve.errors import ConfigError, RaytrieveError
from raytrieve.serve import cluster_metrics, http_guard, shapes
from raytrieve.serve.config import MODEL_FIELDS, ServeConfig, Served
from raytrieve.serve.deployments import ModelReplica, Retriever, quiet_serve_logs
from raytrieve.serve.http_guard import ApiError, SafeJSONResponse
from raytrieve.serve.models import ModelTable
from raytrieve.serve.schemas import (
    COHERE,
    OPENAI,
    RAYTRIEVE,
    TEI,
    CohereRerankV1Request,
    CohereRerankV2Request,
    EmbeddingsRequest,
    RerankBody,
    RerankRequest,
    SearchRequest,
    SparseBody,
    TeiEmbedRequest,
    TeiRerankRequest,
    TeiRootBody,
    TeiSimilarityRequest,
    TeiSparseRequest,
    TokenizeRequest,
)
from raytrieve.serve.search import SearchError, with_defaults

api = FastAPI(
    title="raytrieve",
    description="Hybrid retrieval, embeddings and reranking.",
    version="1",
    default_response_class=SafeJSONResponse,
)
http_guard.install(api)


# The deployments behind the ingress log no access line per call: the ingress logs each request
# (route, status, time), and their lines (two to four per request, one per readiness ping) only
# repeated it on the console and in their log files.
INNER_LOGGING = {"enable_access_log": False}

# How often a stopping replica looks whether its requests have finished. Serve's default is 2 s,
# and it sleeps that long before its first look, so every stop (a redeploy, serve.delete, Ctrl-C
# of `raytrieve serve`) took 2 s per tier of deployments (the ingress, then the models) even when
# idle; a look is a counter read. Serve logs a line at each look while requests are in flight:
# deployments.quiet_serve_logs thins them to one every 2 s.
DRAIN_POLL_S = 0.25

# How long /healthz and /health wait for each deployment to answer its ping: one starting (its
# replica loading the model), restarting after a crash, or with every request slot taken longer
# than this reads as not ready.
HEALTH_TIMEOUT_S = 2.0
# How long one round of pings answers every /healthz and /health call (each joins the round in
# flight): probes from many load balancers cost one round, not one each.
HEALTH_CACHE_S = 1.0


async def _answers(handle: DeploymentHandle) -> bool:
    """Whether a replica of ``handle``'s deployment answers a ping within HEALTH_TIMEOUT_S."""
    response = handle.ping.remote()

    async def answer() -> Any:
        return await response

    try:
        await asyncio.wait_for(answer(), HEALTH_TIMEOUT_S)
        return True
    except asyncio.TimeoutError:
        response.cancel()
        return False
    except Exception:  # a replica that died under the call; Serve starts another
        return False


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("raytrieve")
    except PackageNotFoundError:
        return "unknown"


def _local_runners(cfg: ServeConfig, pins: dict[str, str | None]) -> dict[str, Any]:
    """With ``recall_in_ingress``: a ``ModelRunner`` per dense and sparse model with an index,
    holding it, in this (the ingress's) process; by model name. Else none."""
    models = cfg.ingress_models()
    if not models:
        return {}
    from raytrieve.errors import ModelLoadError
    from raytrieve.serve.deployments import Documents, ModelRunner

    documents = Documents(cfg.index_folders(), pins=pins)  # every index of the app and its texts, once
    runners = {}
    for m in models:
        try:
            runners[m.name] = ModelRunner(m.kind, m.spec, m.index, documents=documents, pins=pins)
        except ModelLoadError as e:
            raise ModelLoadError(
                f"recall_in_ingress: loading {m.path} ({m.spec.public_name}, backend {m.spec.backend}) in the "
                f"ingress: {e}"
                " (ingress_backend sets the ingress's backend; recall_in_ingress: false leaves the query models to"
                " their deployments)"
            ) from e
    return runners


# serve.ingress serializes the FastAPI app when the class is decorated: every helper the
# endpoints call must already be defined above this point.
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        cfg: ServeConfig,
        token: str | None,
        handles: dict[str, list[DeploymentHandle]],
        retriever: DeploymentHandle | None,
        pins: dict[str, str | None] | None = None,
    ) -> None:
        """``handles``: per kind (dense, sparse, reranker), its deployments in ``cfg.served()``'s order;
        ``retriever``: the deployment holding the indices when the models do not (``colocate_index``);
        ``pins``: each index and model URI's content when the app was built (``store_pins``)."""
        if cfg.direct_ingress:
            # Ray binds the port right after this constructor, without SO_REUSEADDR, and one
            # failed bind blocks the port in Serve for good. A replica restarted after a crash
            # with connections open (theirs linger up to 60 s) failed that bind: the app had no
            # port until it was started again. `start` waits so before a deploy; a restart too.
            from raytrieve.serve.launch import wait_port_released

            wait_port_released(cfg.host, cfg.port, "serve.yaml.port", replica_may_linger=True)
        quiet_serve_logs()
        self.cfg, self.limits = cfg, cfg.limits
        self.search_defaults = cfg.search.model_dump()
        self.table = ModelTable(cfg, handles, retriever, _local_runners(cfg, pins or {}))
        self.indexed = any(m.index is not None for m in cfg.served())
        self.token = token
        self.info: dict[str, dict[str, Any]] = {}
        self.version = _version()
        self.created = int(time.time())
        self._health: tuple[float, asyncio.Task[dict[str, list[str]]]] | None = None  # (started, round)
        api.state.ingress = self  # for http_guard's middleware (one ingress per replica process)
        # Ray Serve metrics, not a registry of this replica: see serve/cluster_metrics.py.
        self.requests, self.latency = cluster_metrics.request_metrics()

    async def _describe(self, model: Served, handle: DeploymentHandle) -> dict[str, Any]:
        if model.name not in self.info:
            self.info[model.name] = await handle.describe.remote()
        return self.info[model.name]

    def _recall_format(self, model: Served) -> dict[str, Any]:
        """For a model the ingress runs for /search (recall_in_ingress): its backend and dtype
        there, which ``ingress_backend`` may set apart from its deployment's."""
        runner = self.table.local.get(model.name)
        return {} if runner is None else {"recall_backend": runner.model.backend, "recall_dtype": runner.model.dtype}

    async def _prompt(
        self, model: Served, handle: DeploymentHandle, prompt_name: str | None, field: str = "prompt_name"
    ) -> str | None:
        """TEI's prompt_name: a key of the model's prompts, else 422 naming ``field``."""
        known = (await self._describe(model, handle)).get("prompts") or []
        if prompt_name is not None and prompt_name not in known:
            raise ApiError(422, field, f"{field}: {prompt_name!r} is not a prompt of this model: {known}")
        return prompt_name

    async def _dense(
        self,
        picked: tuple[Served, DeploymentHandle],
        texts: list[str],
        dimensions: int | None,
        task: str | None = None,
        prompt_name: str | None = None,
    ) -> tuple[np.ndarray, list[int]]:
        """Float32 vectors of a checked request from the ``picked`` dense model, and the tokens each text cost."""
        dim = (await self._describe(*picked))["dimensions"]
        if dimensions is not None and not 1 <= dimensions <= dim:
            raise ApiError(422, "dimensions", f"dimensions: {dimensions} is out of range 1..{dim}")
        emb, tokens = await picked[1].remote(texts, task, prompt_name)
        return np.asarray(emb, dtype=np.float32), tokens

    async def _scores(
        self, model: str | None, query: str, documents: list[str], logits: bool, field: str = "documents"
    ) -> tuple[str, np.ndarray, int]:
        """The reranker's name, its scores of (query, document) pairs after the limits, and the tokens
        they cost. ``logits``: the raw logits instead of the model's own activation."""
        picked, handle = self.table.pick(
            "reranker", model, "model" if model is not None or field == "documents" else "path"
        )
        query = shapes.checked_texts(query, "query", 1, self.limits.max_text_chars, query=True)[0]
        docs = shapes.checked_texts(documents, field, self.limits.max_documents, self.limits.max_text_chars)
        scores, tokens = await handle.remote([(query, d) for d in docs], "logits" if logits else None)
        return picked.name, np.asarray(scores, dtype=np.float32), sum(tokens)

    # -- raytrieve's own endpoints ----------------------------------------------------------------
    async def _not_ready(self) -> dict[str, list[str]]:
        """By kind, the served models (and "retriever": the index deployment) none of whose
        replicas answers now: all of them must for the app to answer every request. One round of
        pings at a time, its answer kept HEALTH_CACHE_S."""
        now = time.monotonic()
        if self._health is None or (self._health[1].done() and now - self._health[0] > HEALTH_CACHE_S):
            self._health = (now, asyncio.ensure_future(self._ping_all()))
        return await asyncio.shield(self._health[1])

    async def _ping_all(self) -> dict[str, list[str]]:
        entries = self.table.probed()
        answered = await asyncio.gather(*(_answers(h) for *_, h in entries))
        missing: dict[str, list[str]] = {}
        for (kind, name, _), ok in zip(entries, answered):
            if not ok:
                missing.setdefault(kind, []).append(name)
        return missing

    @api.get("/healthz", tags=[RAYTRIEVE])
    async def healthz(self) -> Response:
        """Readiness: 200 and "ok" when a replica of every deployment answers (within
        HEALTH_TIMEOUT_S each), else 503 and "not_ready" naming the models that do not."""
        models = {kind: self.table.names(kind) for kind in MODEL_FIELDS if self.table.names(kind)}
        missing = await self._not_ready()
        body = {"status": "not_ready" if missing else "ok", "models": models, "index": self.indexed}
        return SafeJSONResponse(body | ({"not_ready": missing} if missing else {}), status_code=503 if missing else 200)

    @api.get("/v1/models", tags=[OPENAI])
    @api.get("/models", tags=[OPENAI])  # OpenAI's clients pointed at the bare host (Infinity's and TEI's way)
    async def models(self) -> dict[str, Any]:
        data = [
            {
                "id": m.name,
                "object": "model",
                "created": self.created,  # OpenAI's Model requires it: when this app started serving
                "owned_by": "raytrieve",
                **(await self._describe(m, h)),
                "default": m.default,
                "index": m.index is not None,
                "recall_in": self.table.recall_in(m),  # ingress, replica, retriever; null: no index
                **self._recall_format(m),
            }
            for m, h in self.table.all()
        ]
        return {"object": "list", "data": data}

    @api.get("/v1/models/{model_id:path}", tags=[OPENAI])
    @api.get("/models/{model_id:path}", tags=[OPENAI])
    async def model(self, model_id: str) -> dict[str, Any]:
        """OpenAI's GET /v1/models/{model} (``client.models.retrieve``): one entry of /v1/models."""
        if not model_id:  # /v1/models/ (the path converter takes an empty id)
            raise ApiError(404, "path", "no model named; GET /v1/models lists them", "not_found")
        listed = (await self.models())["data"]
        found = next((m for m in listed if m["id"] == model_id), None)
        if found is None:
            served = ", ".join(repr(m["id"]) for m in listed)
            raise ApiError(404, "model", f"model {model_id!r} is not served here; served: {served}", "model_not_found")
        return found

    @api.get("/metrics", tags=[RAYTRIEVE])
    async def metrics(self) -> PlainTextResponse:
        from prometheus_client import CONTENT_TYPE_LATEST

        # ray.nodes() and the agents' pages are blocking calls: off the event loop.
        urls = await asyncio.to_thread(cluster_metrics.agent_urls)
        if not urls:
            raise ApiError(503, None, "no Ray node exports metrics (Ray's metrics agent is off)", "unavailable")
        text, failed = await asyncio.to_thread(cluster_metrics.gather, urls)
        notes = "".join(f"# raytrieve: no answer from the metrics agent at {url}\n" for url in failed)
        return PlainTextResponse(notes + text, media_type=CONTENT_TYPE_LATEST)

    @api.post("/v1/embeddings", tags=[OPENAI])
    @api.post("/embeddings", tags=[OPENAI])  # LangChain's InfinityEmbeddings, and OpenAI's clients at the bare host
    async def embeddings(self, body: EmbeddingsRequest) -> dict[str, Any]:
        """OpenAI's embeddings (the openai SDK's client.embeddings.create)."""
        picked = self.table.pick("dense", body.model)
        texts = shapes.checked_texts(body.input, "input", self.limits.max_inputs, self.limits.max_text_chars)
        emb, tokens = await self._dense(picked, texts, body.dimensions, task=body.input_type)
        # OpenAI's dimensions: truncated, then unit length again.
        emb = shapes.shape_vectors(emb, body.dimensions, normalize=body.dimensions is not None)
        data = [
            {"object": "embedding", "index": i, "embedding": shapes.encode_vector(v, body.encoding_format)}
            for i, v in enumerate(emb)
        ]
        usage = {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)}
        return {"object": "list", "data": data, "model": picked[0].name, "usage": usage}

    @api.post("/embed_sparse", tags=[RAYTRIEVE, TEI])
    async def embed_sparse(self, body: SparseBody) -> Any:
        """raytrieve's body ("input") or TEI's ("inputs")."""
        tei = isinstance(body, TeiSparseRequest)
        model, handle = self.table.pick("sparse", body.model, "path" if tei and body.model is None else "model")
        field = "inputs" if tei else "input"
        texts = shapes.checked_texts(getattr(body, field), field, self.limits.max_inputs, self.limits.max_text_chars)
        if isinstance(body, TeiSparseRequest):
            rows, _ = await handle.remote(texts, None, await self._prompt(model, handle, body.prompt_name))
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
        return {"object": "list", "data": data, "model": model.name}

    @api.post("/rerank", tags=[RAYTRIEVE, TEI])
    async def rerank(self, body: RerankBody) -> Any:
        """raytrieve's body ("documents": the model's own scores) or TEI's ("texts")."""
        if not isinstance(body, RerankRequest):
            _, logits, _ = await self._scores(body.model, body.query, body.texts, logits=True, field="texts")
            return shapes.tei_rerank(logits, body.texts, body.raw_scores, body.return_text)
        name, scores, _ = await self._scores(body.model, body.query, body.documents, logits=False)
        results = []
        for i in shapes.best_first(scores, body.top_n):
            hit = {"index": i, "relevance_score": float(scores[i])}
            if body.return_documents:
                hit["document"] = {"text": body.documents[i]}
            results.append(hit)
        return {"model": name, "results": results}

    @api.post("/search", tags=[RAYTRIEVE])
    async def search(self, body: SearchRequest) -> dict[str, Any]:
        if not self.indexed:
            raise ApiError(404, "path", "no index is served here (set index: in the serve config)", "not_found")
        body = with_defaults(body, self.search_defaults)
        shapes.check_search_limits(body, self.limits)
        pipeline = self.table.pipeline(body)  # the models the request names, else the defaults
        try:
            return await pipeline.search(body)
        except SearchError as e:
            raise ApiError(422, e.field, str(e)) from None

    # -- Cohere's and Jina's rerank -------------------------------------------------------------
    @api.post("/v1/rerank", tags=[COHERE])
    async def rerank_v1(self, body: CohereRerankV1Request) -> dict[str, Any]:
        """Cohere's v1 rerank (cohere.Client().rerank) and Jina's: documents are strings or
        objects with "text"; the answer carries Cohere's id/meta and Jina's model/usage."""
        if body.rank_fields is not None and body.rank_fields != ["text"]:
            raise ApiError(422, "rank_fields", 'rank_fields: only ["text"] is ranked here')
        texts = [d if isinstance(d, str) else d.text for d in body.documents]
        name, scores, tokens = await self._scores(body.model, body.query, texts, logits=True)
        scores = shapes.sigmoid(scores)
        results = []
        for i in shapes.best_first(scores, body.top_n):
            hit: dict[str, Any] = {"index": i, "relevance_score": float(scores[i])}
            if body.return_documents:
                doc = body.documents[i]
                hit["document"] = {"text": doc} if isinstance(doc, str) else doc.model_dump()
            results.append(hit)
        answer = shapes.cohere_answer(results, len(texts), tokens, "1")
        return {**answer, "model": name, "usage": {"total_tokens": tokens}}

    @api.post("/v2/rerank", tags=[COHERE])
    async def rerank_v2(self, body: CohereRerankV2Request) -> dict[str, Any]:
        """Cohere's v2 rerank (cohere.ClientV2().rerank); ``priority`` is accepted and has no effect."""
        if body.max_tokens_per_doc is not None:
            served = (await self._describe(*self.table.pick("reranker", body.model)))["max_seq_length"]
            if body.max_tokens_per_doc < served:
                raise ApiError(
                    422,
                    "max_tokens_per_doc",
                    f"max_tokens_per_doc: {body.max_tokens_per_doc} would cut documents shorter than the served "
                    f"reranker does ({served} tokens, query and document together); leave it out or send at least "
                    f"{served}",
                )
        _, scores, tokens = await self._scores(body.model, body.query, body.documents, logits=True)
        scores = shapes.sigmoid(scores)
        results = [{"index": i, "relevance_score": float(scores[i])} for i in shapes.best_first(scores, body.top_n)]
        return shapes.cohere_answer(results, len(body.documents), tokens, "2")

    # -- TEI (text-embeddings-inference) --------------------------------------------------------
    @api.post("/embed", tags=[TEI])
    async def embed(self, body: TeiEmbedRequest) -> list[list[float]]:
        picked = self.table.pick("dense", body.model, "model" if body.model is not None else "path")
        texts = shapes.checked_texts(body.inputs, "inputs", self.limits.max_inputs, self.limits.max_text_chars)
        prompt_name = await self._prompt(*picked, body.prompt_name)
        emb, _ = await self._dense(picked, texts, body.dimensions, prompt_name=prompt_name)
        return shapes.shape_vectors(emb, body.dimensions, body.normalize).tolist()

    @api.post("/similarity", tags=[TEI])
    async def similarity(self, body: TeiSimilarityRequest) -> list[float]:
        """TEI's similarity: the cosine of ``source_sentence`` with each of ``sentences``."""
        picked = self.table.pick("dense", body.model, "model" if body.model is not None else "path")
        limit, chars = self.limits.max_inputs, self.limits.max_text_chars
        source = shapes.checked_texts(body.inputs.source_sentence, "inputs.source_sentence", 1, chars)
        texts = source + shapes.checked_texts(body.inputs.sentences, "inputs.sentences", max(1, limit - 1), chars)
        prompt_name = await self._prompt(*picked, body.parameters.prompt_name, "parameters.prompt_name")
        emb, _ = await self._dense(picked, texts, None, prompt_name=prompt_name)
        unit = shapes.shape_vectors(emb, None, normalize=True)
        return (unit[1:] @ unit[0]).tolist()

    @api.post("/", tags=[TEI])
    @api.post("/invocations", tags=[TEI])
    async def tei_root(self, body: TeiRootBody) -> Any:
        """TEI's root routes, where huggingface_hub's InferenceClient(model=URL) posts: TEI answers
        them as its one model's kind; here the body's keys say which (schemas.py ``_root_kind``).
        An embedding is the dense model's, or the sparse model's when no dense one is served."""
        if isinstance(body, TeiRerankRequest):
            return await self.rerank(body)
        if isinstance(body, TeiSimilarityRequest):
            return await self.similarity(body)
        if not self.table.names("dense") and self.table.names("sparse"):
            # TEI's sparse body: what only a dense embedding takes is refused by name, not dropped.
            dense_only = sorted(set(body.model_fields_set) - set(TeiSparseRequest.model_fields))
            if dense_only:
                field = dense_only[0]
                raise ApiError(422, field, f"{field}: the served embedding model is sparse; leave {field} out")
            return await self.embed_sparse(
                TeiSparseRequest(**body.model_dump(include=set(TeiSparseRequest.model_fields)))
            )
        return await self.embed(body)

    @api.post("/tokenize", tags=[TEI])
    async def tokenize(self, body: TokenizeRequest) -> list[list[dict[str, Any]]]:
        """TEI's tokenize, with the tokenizer of the model /info describes."""
        texts = shapes.checked_texts(body.inputs, "inputs", self.limits.max_inputs, self.limits.max_text_chars)
        # Not truncated, a dict per token: bounded by its own total (the other limits allow 16 MiB).
        total = sum(len(t) for t in texts)
        if total > self.limits.max_tokenize_chars:
            raise ApiError(
                422, "inputs", f"inputs: {total} characters to tokenize, at most {self.limits.max_tokenize_chars}"
            )
        model, handle = self.table.pick_any(body.model, "model" if body.model is not None else "path")
        prompt_name = await self._prompt(model, handle, body.prompt_name)
        return await handle.tokenize.remote(texts, body.add_special_tokens, prompt_name)

    @api.get("/info", tags=[TEI])
    async def tei_info(self, model: str | None = None) -> dict[str, Any]:
        """TEI's /info: the default model of the first served of dense, sparse, reranker, or the
        model ``?model=`` names."""
        picked, handle = self.table.pick_any(model)
        info = await self._describe(picked, handle)
        return shapes.tei_info(picked.kind, picked.name, info, picked.spec, self.limits, self.version)

    @api.get("/health", tags=[TEI])
    async def health(self) -> Response:
        """TEI's health probe: 200 with an empty body when every deployment answers, else 503
        with TEI's error body (``error_type`` "unhealthy")."""
        missing = await self._not_ready()
        if not missing:
            return Response(status_code=200)
        names = ", ".join(f"{kind} {name}" for kind, found in missing.items() for name in found)
        return SafeJSONResponse({"error": f"not ready: {names}", "error_type": "unhealthy"}, status_code=503)


def runtime_env(env_vars: dict[str, str]) -> dict[str, Any]:
    """A deployment's runtime_env: the one it would get by default, with ``env_vars`` added. Serve
    copies the app's (``serve deploy``'s) or the job's runtime_env only to deployments that set
    none, so one that sets env vars must carry the rest itself (py_modules, working_dir, ...)."""
    import ray

    base = dict(ray.get_runtime_context().runtime_env or {}) if ray.is_initialized() else {}
    return {**base, "env_vars": {**(base.get("env_vars") or {}), **env_vars}}


def store_pins(cfg: ServeConfig) -> dict[str, str | None]:
    """Each index folder and model URI of the app pinned to what it names now: a folder URI
    (``s3://``, ``gs://``...) to its content (listed, not downloaded), a registry URI to its
    version and that version's run and source (``models:/NAME@ALIAS`` -> ``models:/NAME/3`` and
    a key: ``model_uri.pinned_version``). Every replica, whenever it starts (a
    restart, an autoscaled one, a new node), serves the index and model the app was built and
    checked with, not ones written or aliased there later; deploying the app again takes the new
    ones. Folders on disk and shipped variants map to None (read in place)."""
    from raytrieve.index.build import index_pin
    from raytrieve.model_ref import model_pin
    from raytrieve.tracking import mlflow_run

    pins = {folder: index_pin(folder) for folder in cfg.index_folders()}
    with mlflow_run.environment(mlflow_run.tracking_uri(cfg.mlflow_tracking_uri)):
        return pins | {m.spec.model: model_pin(m.spec.model) for m in cfg.served()}


def build_app(cfg: ServeConfig, where: str = "config", pins: dict[str, str | None] | None = None) -> Any:
    """The bound Serve application: one deployment per configured model (each dense and sparse
    one holding its index, or else a retriever holding them all), and the ingress over them. On a
    running cluster, what the config leaves unset is sized from it first, and a config the
    cluster cannot hold is refused. ``pins``: the index and model URIs' content the start's checks
    read (``launch.check_before_start``); else taken here (``store_pins``) when Ray runs, and
    none without it (`serve build` imports the app without a cluster, nor maybe the store's
    credentials)."""
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

    # What every deployment of the app shares: how often Serve checks its replicas, how often a
    # stopping one looks whether its requests are done.
    lifecycle: dict[str, Any] = {
        "health_check_period_s": cfg.health_check_period_s,
        "graceful_shutdown_wait_loop_s": DRAIN_POLL_S,
    }

    def options(model: Served) -> dict[str, Any]:
        d = model.spec
        actor: dict[str, Any] = {"num_cpus": d.num_cpus if d.num_cpus is not None else 1.0, "num_gpus": d.num_gpus}
        if is_model_uri(d.model):  # the replica downloads it from the same store
            actor["runtime_env"] = runtime_env(mlflow_run.process_env(mlflow_run.tracking_uri(cfg.mlflow_tracking_uri)))
        opts: dict[str, Any] = {
            "name": model.deployment,
            "ray_actor_options": actor,
            "max_ongoing_requests": d.max_ongoing_requests,
            "logging_config": INNER_LOGGING,
            **lifecycle,
        }
        if d.autoscaling:
            opts["autoscaling_config"] = d.autoscaling
        else:
            opts["num_replicas"] = d.num_replicas
        return opts

    # Ray types serve.deployment as the decorator factory only: the decorated classes (and
    # serve.deployment(Ingress)) are Deployments, with .options, at runtime.
    served = cfg.served()
    bound: dict[str, list[Any]] = {kind: [] for kind in MODEL_FIELDS}
    folders = cfg.index_folders()
    if pins is None:
        try:
            pins = store_pins(cfg) if ray.is_initialized() else {}
        except RaytrieveError as e:
            raise type(e)(f"{where}: {e}") from None
    for m in served:
        # The model's own index in its replicas; none when the ingress holds them (recall_in_ingress).
        held = m.index if cfg.colocate_index and not cfg.recall_in_ingress else None
        bound[m.kind].append(ModelReplica.options(**options(m)).bind(m.kind, m.spec, held, folders, pins))  # pyright: ignore[reportFunctionMemberAccess]
    # Else one retriever holds every index the models search (and their texts, once).
    retriever = (
        Retriever.options(  # pyright: ignore[reportFunctionMemberAccess]
            name="retriever",
            ray_actor_options={"num_cpus": LIGHT_ACTOR_CPUS},
            logging_config=INNER_LOGGING,
            **lifecycle,
        ).bind(folders, pins=pins)
        if cfg.retriever_deployed
        else None
    )
    ingress_actor: dict[str, Any] = {"num_cpus": LIGHT_ACTOR_CPUS}
    # Whether the ingress replica answers HTTP itself (direct_ingress, raytrieve.serve.launch), said
    # either way: the setting of a Serve started for another app's direct ingress reaches every
    # replica that does not say (measured: a second app's ingress then failed to start, its port
    # taken by the first's).
    ingress_env = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    if any(is_model_uri(m.spec.model) for m in cfg.ingress_models()):
        # The ingress loads those query models too (recall_in_ingress), from the same store.
        ingress_env.update(mlflow_run.process_env(mlflow_run.tracking_uri(cfg.mlflow_tracking_uri)))
    placement: dict[str, Any] = {}
    if cfg.direct_ingress:  # the replica binds cfg.port itself: one per node
        from raytrieve.serve.launch import DIRECT_INGRESS_REPLICA_ENV

        ingress_env.update(DIRECT_INGRESS_REPLICA_ENV)
        placement["max_replicas_per_node"] = 1
    ingress_actor["runtime_env"] = runtime_env(ingress_env)
    ingress = serve.deployment(Ingress).options(  # pyright: ignore[reportFunctionMemberAccess]
        name="ingress",
        num_replicas=cfg.ingress_replicas,
        ray_actor_options=ingress_actor,
        **lifecycle,
        **placement,
        max_queued_requests=cfg.limits.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=cfg.limits.retry_after_s),
    )
    # The token is read where the app is built (the driver, or `serve deploy`'s builder), so
    # replicas need no secret in their environment.
    token = os.environ.get(cfg.auth_token_env) or None
    return ingress.bind(cfg, token, bound, retriever, pins)


def app_builder(args: dict[str, Any]) -> Any:
    """For ``serve deploy`` / ``serve run`` (cluster/serve.yaml): ``args`` is the ServeConfig as
    a mapping, or ``{"config": "path/to/serve.yaml"}``. Checked as ``raytrieve serve`` checks
    (raytrieve.serve.launch.check_before_start: each model, its max_seq_length, each index and
    the model that built it) before a deployment is made."""
    from raytrieve.config import from_dict
    from raytrieve.serve.config import load_serve_config
    from raytrieve.serve.launch import check_before_start  # launch imports this module

    where = "serve args"
    if set(args) == {"config"}:
        where = args["config"]
        cfg = load_serve_config(where)
    else:
        cfg = from_dict(ServeConfig, dict(args), where=where)
        cfg.check(where)
    if cfg.direct_ingress:
        raise ConfigError(
            f"{where}.direct_ingress: true needs Serve started for it (its controller's port range and the proxy "
            "on port + 1), which `raytrieve serve` and raytrieve.serve.launch.start do; under `serve deploy` set it "
            "to false"
        )
    return build_app(cfg, where, check_before_start(cfg, where))


def route_list() -> str:
    """The app's routes, as `raytrieve serve` announces them ("POST /search, ...; GET ..."):
    read from the app, so a route added is listed."""
    by_method: dict[str, list[str]] = {}
    for path, operations in api.openapi()["paths"].items():
        for method in operations:
            by_method.setdefault(method.upper(), []).append(path)
    by_method.setdefault("GET", []).append("/docs")
    return "; ".join(f"{method} {', '.join(paths)}" for method, paths in sorted(by_method.items(), reverse=True))
