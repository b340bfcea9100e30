"""Which deployment a request names: the app's models by kind and name, and ``/search``'s
pipeline over the dense, sparse and reranker models a request picks.

    table = ModelTable(cfg, {"dense": [handle, ...], "sparse": [...], "reranker": [...]}, retriever)
    model, handle = table.pick("dense", body.model)   # the default when body.model is None
    pipeline = table.pipeline(request)                # /search: the request's *_model fields

A name that is not served, or names a model of another kind, is a 4xx ``ApiError`` naming the
request field and listing the names the endpoint takes (404 ``model_not_found`` for ``model``,
as OpenAI's API answers; 422 for ``/search``'s ``*_model`` fields, which are request settings).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ray.serve.handle import DeploymentHandle

from raytrieve.serve.config import MODEL_FIELDS, ServeConfig, Served
from raytrieve.serve.http_guard import ApiError
from raytrieve.serve.schemas import SearchRequest
from raytrieve.serve.search import Retrieval, SearchPipeline

# The stages /search runs, and the request field that picks each one's model.
SEARCH_STAGES = {"dense": "dense_model", "sparse": "sparse_model", "reranker": "reranker_model"}


class ModelTable:
    def __init__(
        self,
        cfg: ServeConfig,
        handles: Mapping[str, Sequence[DeploymentHandle]],
        retriever: DeploymentHandle | None,
        local: Mapping[str, Any] | None = None,
    ) -> None:
        """``handles``: per kind, the deployments in ``cfg.served()``'s order. ``local``: by model
        name, the ``ModelRunner``s this process holds for /search's recall (``recall_in_ingress``)."""
        self.by_kind: dict[str, dict[str, tuple[Served, DeploymentHandle]]] = {k: {} for k in MODEL_FIELDS}
        served = cfg.served()
        for kind in MODEL_FIELDS:
            models = [m for m in served if m.kind == kind]
            for model, handle in zip(models, handles.get(kind, ()), strict=True):
                self.by_kind[kind][model.name] = (model, handle)
        self.retriever = retriever
        self.colocate = cfg.colocate_index  # each model's replicas hold its index (else: the retriever)
        self.local = dict(local or {})
        self._pipelines: dict[tuple[str | None, ...], SearchPipeline] = {}

    def names(self, kind: str) -> list[str]:
        """The served names of ``kind``, the default first."""
        return list(self.by_kind[kind])

    def all(self) -> list[tuple[Served, DeploymentHandle]]:
        return [entry for models in self.by_kind.values() for entry in models.values()]

    def probed(self) -> list[tuple[str, str, DeploymentHandle]]:
        """(kind, name, handle) of each deployment the readiness probes (/healthz, /health) ping:
        every model's and the retriever's, but a model that autoscales down to no replica
        (``autoscaling: {min_replicas: 0}``): a ping would keep it awake, and its next request
        starts a replica anyway."""
        found = [(m.kind, m.name, h) for m, h in self.all() if (m.spec.autoscaling or {}).get("min_replicas", 1) != 0]
        return found + ([("retriever", "retriever", self.retriever)] if self.retriever is not None else [])

    @property
    def primary(self) -> str:
        """The kind TEI's /info and /tokenize describe by default: the first served of dense,
        sparse, reranker (TEI serves one model)."""
        return next(k for k in MODEL_FIELDS if self.by_kind[k])

    def pick(
        self, kind: str, requested: str | None, field: str = "model", status: int = 404
    ) -> tuple[Served, DeploymentHandle]:
        """The ``kind`` model named ``requested`` (None: the kind's default)."""
        models = self.by_kind[kind]
        if requested is None and models:
            return next(iter(models.values()))
        if requested in models:
            return models[requested]
        if requested is None:
            raise ApiError(
                status, field, f"no {kind} model is served here; served: {self._everything()}", _code(status)
            )
        other = next((k for k, m in self.by_kind.items() if requested in m), None)
        why = f"{requested!r} is a {other} model" if other else f"no model {requested!r} is served here"
        takes = f"{kind} models here: {self.names(kind)}" if models else f"no {kind} model is served here"
        raise ApiError(status, field, f"{field}: {why}; {takes}", _code(status))

    def pick_any(self, requested: str | None, field: str = "model") -> tuple[Served, DeploymentHandle]:
        """The model of any kind named ``requested`` (None: the primary kind's default)."""
        if requested is None:
            return self.pick(self.primary, None, field)
        for models in self.by_kind.values():
            if requested in models:
                return models[requested]
        raise ApiError(
            404,
            field,
            f"{field}: no model {requested!r} is served here; served: {self._everything()}",
            "model_not_found",
        )

    def recall_in(self, model: Served) -> str | None:
        """Where /search encodes ``model``'s queries and searches its index: "ingress", "replica"
        (its own replicas hold the index) or "retriever"; None without an index."""
        if model.index is None:
            return None
        return "ingress" if model.name in self.local else "replica" if self.colocate else "retriever"

    def _everything(self) -> list[str]:
        return [m.name for m, _ in self.all()]

    def pipeline(self, request: SearchRequest) -> SearchPipeline:
        """/search over the models ``request`` names (each unset one: its kind's default), each
        dense and sparse model with its own index."""
        chosen: dict[str, Served] = {}
        for kind in ("dense", "sparse"):
            field, requested = SEARCH_STAGES[kind], getattr(request, SEARCH_STAGES[kind])
            if requested is None:
                default = next(iter(self.by_kind[kind].values()), None)
                if default is not None and default[0].index is not None:
                    chosen[kind] = default[0]
                continue
            model, _ = self.pick(kind, requested, field, 422)
            if model.index is None:
                indexed = [m.name for m, _ in self.by_kind[kind].values() if m.index is not None]
                raise ApiError(
                    422, field, f"{field}: {requested!r} has no index to search; {kind} models with one: {indexed}"
                )
            chosen[kind] = model
        if self.by_kind["reranker"] or request.reranker_model is not None:
            chosen["reranker"] = self.pick("reranker", request.reranker_model, SEARCH_STAGES["reranker"], 422)[0]
        key = tuple(chosen[k].name if k in chosen else None for k in SEARCH_STAGES)
        if key not in self._pipelines:
            self._pipelines[key] = self._build(chosen)
        return self._pipelines[key]

    def _build(self, chosen: Mapping[str, Served]) -> SearchPipeline:
        def holder(model: Served) -> DeploymentHandle:
            """The deployment that holds ``model``'s index: its own (``colocate_index``) or the retriever."""
            if self.colocate:
                return self.by_kind[model.kind][model.name][1]
            assert self.retriever is not None, "build_app deploys a retriever when the models hold no index"
            return self.retriever

        def retrieval(model: Served) -> Retrieval:
            if model.name in self.local:  # this process encodes and searches: no hop at all
                return Retrieval(recall=self.local[model.name].recall)
            encoder = self.by_kind[model.kind][model.name][1]
            if self.colocate:  # the encoder holds its index: one call

                async def recall(query: str, k: int, n: int) -> tuple[list[tuple[str, float]], dict[str, str], float]:
                    return await encoder.recall.remote(query, k, n)

                return Retrieval(recall=recall)
            index = holder(model)

            async def encode(query: str) -> Any:
                outputs, _ = await encoder.remote([query], "query")
                return outputs[0]

            async def search(vector: Any, k: int) -> list[tuple[str, float]]:
                return await index.search.remote(model.index, model.kind, vector, k)

            async def search_with_texts(vector: Any, k: int, n: int) -> tuple[list[tuple[str, float]], dict[str, str]]:
                return await index.search_with_texts.remote(model.index, model.kind, vector, k, n)

            return Retrieval(encode, search, search_with_texts)

        searched = [model for kind, model in chosen.items() if kind != "reranker"]
        texts = holder(searched[0]) if searched else None  # any index's holder opens every folder's texts
        held = next((self.local[m.name] for m in searched if m.name in self.local), None)

        async def lookup(ids: list[str]) -> list[str]:
            if held is not None:  # the documents' texts are in this process
                return held.lookup(ids)
            assert texts is not None, "the pipeline looks up only documents its retrievers found"
            return await texts.lookup.remote(ids)

        reranker = self.by_kind["reranker"][chosen["reranker"].name][1] if "reranker" in chosen else None

        async def rerank(pairs: list[tuple[str, str]]) -> list[float]:
            assert reranker is not None, "passed to the pipeline only when a reranker is served"
            scores, _ = await reranker.remote(pairs)
            return scores

        retrievers = {kind: retrieval(model) for kind, model in chosen.items() if kind != "reranker"}
        names = {kind: model.name for kind, model in chosen.items()}
        return SearchPipeline(retrievers, lookup, rerank if reranker is not None else None, names)


def _code(status: int) -> str:
    return "model_not_found" if status == 404 else "invalid_request"
