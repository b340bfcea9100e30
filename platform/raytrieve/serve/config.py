"""The Serve application's config: which models and indices, replicas and batching per
deployment, request limits, host and port. YAML maps onto these pydantic models (unknown keys
are errors that name the key). Each of ``dense:``, ``sparse:`` and ``reranker:`` takes one
deployment or a list of them (the first is the default); every model has its own name.

    cfg = load_serve_config("jobs/configs/serve_pydocs.yaml", ["port=8300"])
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

from pydantic import Field, model_validator

from raytrieve.config import Backend, ConfigModel, Dtype, dtype_field, invalid, load_yaml, trust_remote_code_field
from raytrieve.errors import ConfigError
from raytrieve.kinds import MODEL_KINDS
from raytrieve.serve.schemas import Fusion, Recall, SearchRequest
from raytrieve.sizing import LIGHT_ACTOR_CPUS, ClusterShape, replica_threads, serve_replica_cpus

# The config fields that name a model deployment (the rest are the ingress and the retriever).
MODEL_FIELDS = tuple(k.serve_field for k in MODEL_KINDS.values())


class DeploymentConfig(ConfigModel):
    model: str = Field(
        description="a models/ variant, a local folder, a folder URI (s3://...), or models:/NAME/VERSION (MLflow)"
    )
    name: str | None = Field(
        default=None, description='the name clients use (/v1/models, "model" fields); default: model'
    )
    max_seq_length: int | None = Field(
        default=None,
        description="tokens a text is cut at (a reranker's: query and document together); None: the model's own",
    )
    dtype: Dtype = dtype_field()
    backend: Backend = Field(
        default="torch",
        description=(
            "what runs the transformer: torch, or onnx (ONNX Runtime on CPU, float32; 1.45-1.7x faster than torch "
            "for one short query on an AVX2-only CPU; exported once per machine into $RAYTRIEVE_CACHE/onnx, "
            "default ~/.cache/raytrieve/onnx, and checked against torch float32 at every start)"
        ),
    )
    num_replicas: int = Field(default=1, description="replicas of this deployment, each holding the model")
    autoscaling: dict[str, Any] | None = Field(
        default=None, description="Ray Serve autoscaling_config; replaces num_replicas"
    )
    num_cpus: float | None = Field(
        default=None,
        description=(
            "per replica; default: the cluster's CPUs beside the ingress (and retriever), split evenly among the "
            "model deployments' replicas (at most 4)"
        ),
    )
    num_gpus: float = Field(
        default=0.0, description="GPUs per replica (a fraction shares one); above 0 the model runs on CUDA"
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description=(
            "default: num_cpus rounded, at least 1; a reranker's: at least one node's CPUs shared among the"
            " reranker replicas (at most 4), as it runs after the query encoders, not beside them"
        ),
    )
    max_batch_tokens: int = Field(
        default=8192,
        description=(
            "Dynamic batching: requests are grouped until their texts' estimated tokens reach the budget (or"
            " the wait runs out); a single request over the budget still runs alone."
        ),
    )
    batch_wait_timeout_s: float = Field(
        default=0.005,
        description="seconds a dynamic batch waits for more requests after its first one (a one-text request "
        "to an otherwise idle replica does not wait)",
    )
    cache_entries: int = Field(
        default=0,
        ge=0,
        description=(
            "outputs each replica keeps, least recently used out first: a dense or sparse model's vector per "
            "(text, task, prompt), a reranker's score per (query, document) pair; a repeated input is answered "
            "without running the model (a /search asked twice, pairs two fusions share). 0: off. A dense vector "
            "costs 4 bytes x dimensions, a score a few bytes, each entry about 150 bytes besides"
        ),
    )
    max_ongoing_requests: int = Field(
        default=32,
        description="Ray Serve's bound on the requests a replica holds at once (its batches form from them); "
        "more wait at the caller",
    )
    trust_remote_code: bool = trust_remote_code_field()
    index: str | None = Field(
        default=None,
        description=(
            "dense and sparse models: a folder from `raytrieve index build` of this model's vectors (a path, or a "
            "folder URI such as s3://bucket/index, which each node downloads once into its cache), searched when "
            "/search uses this model; default: the top-level index: for the first (default) model of its kind, "
            "none for the others"
        ),
    )
    allow_index_model_mismatch: bool = Field(
        default=False,
        description=(
            "serve this query model although the index's vectors came from another model (source.json); by "
            "default a mismatch fails at start, naming both"
        ),
    )

    @property
    def public_name(self) -> str:
        """What clients name the model by (``model`` in requests, ids in /v1/models): ``name``,
        else the reference, without the keys a URI may hold (answers are public)."""
        from raytrieve._io import redact

        return self.name or redact(self.model)


class LimitsConfig(ConfigModel):
    max_body_bytes: int = Field(
        default=16 * 2**20,
        description="per request body (16 MiB: LangChain's batch of 1,000 texts of a few thousand characters each)",
    )
    max_inputs: int = Field(
        default=2048,
        description=(
            "texts per /v1/embeddings, /embed, /embed_sparse or /tokenize request (2,048: OpenAI's own limit; "
            "LangChain's OpenAIEmbeddings sends 1,000 a request)"
        ),
    )
    max_text_chars: int = Field(
        default=32_768,
        description=(
            "per text, query or document (texts are cut at the model's max_seq_length tokens anyway: /info's "
            "auto_truncate; 32,768 takes what OpenAI's 8,191-token input limit does)"
        ),
    )
    max_tokenize_chars: int = Field(
        default=1_000_000, description="characters per /tokenize request, all texts together (it answers every token)"
    )
    max_documents: int = Field(default=256, description="per /rerank, /v1/rerank or /v2/rerank request")
    max_top_k: int = Field(default=100, description="/search's top_k at most (search.top_k's too)")
    max_recall: int = Field(default=1000, description="candidates per retriever in /search")
    max_rerank_depth: int = Field(default=200, description="/search's rerank_depth at most, when it reranks")
    max_queued_requests: int = Field(default=64, description="at the HTTP proxy, per ingress replica; more get 503")
    retry_after_s: int = Field(
        default=1, description="the Retry-After (seconds) of the 503 answered past max_queued_requests"
    )


class SearchDefaults(ConfigModel):
    """``/search``'s values for the fields a request leaves out (each of ``recall`` and
    ``fusion`` field by field). ``raytrieve evaluate --tune-on`` writes them as fitted on a
    dev split; the defaults here are the request schema's own."""

    top_k: int = Field(default=10, ge=1, description="hits per answer")
    recall: Recall = Field(default_factory=Recall, description="candidates per retriever (0: off)")
    fusion: Fusion = Field(default_factory=Fusion, description="method rrf (k) or convex (weights, normalization)")
    rerank: bool = Field(default=False, description="rescore the top rerank_depth fused candidates (needs reranker:)")
    rerank_depth: int = Field(default=50, ge=1, description="fused candidates the reranker rescores")
    rerank_weight: float = Field(
        default=1.0,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="the cross-encoder's share of the reranked order (the rest: the fused score); 1: its order alone",
    )


# One deployment, or a list of them: the first is the kind's default (what a request that names
# no model gets).
Deployments = DeploymentConfig | list[DeploymentConfig] | None
ONE_OR_MORE = (
    "one deployment, or a list of them with distinct names; the first is the default (requests that name no "
    "model, /search without {field}_model)"
)


@dataclass(frozen=True)
class Served:
    """One model deployment of the app. ``path``: its key in the config (``dense``, or
    ``dense[1]`` in a list); ``deployment``: its Serve deployment's name; ``index``: the folder
    /search searches with it (its own ``index:``, else the top-level one for a default)."""

    kind: str
    path: str
    deployment: str
    spec: DeploymentConfig
    index: str | None
    default: bool

    @property
    def name(self) -> str:
        return self.spec.public_name


class ServeConfig(ConfigModel):
    dense: Deployments = Field(default=None, description=ONE_OR_MORE.format(field="dense"))
    sparse: Deployments = Field(default=None, description=ONE_OR_MORE.format(field="sparse"))
    reranker: Deployments = Field(default=None, description=ONE_OR_MORE.format(field="reranker"))
    index: str | None = Field(
        default=None,
        description=(
            "A folder from `raytrieve index build` (a path, or a folder URI such as s3://bucket/index, which each "
            "node downloads once into its cache and memory-maps there), searched by /search with the default "
            "(first) dense and sparse models that set no index: of their own. Its source.json says which model "
            "encoded the vectors; its documents/ holds the texts /search returns and reranks (read from the corpus "
            "and checked against the encoding by index build), so serving never reads the corpus."
        ),
    )
    colocate_index: bool = Field(
        default=True,
        description=(
            "Each dense and sparse model with an index opens that index and its documents' texts (memory-mapped: "
            "replicas on one machine share the pages) in its own replicas, so /search encodes a query and "
            "searches in one call per model. false: one retriever deployment holds every index once, and each "
            "recall is two calls (less memory per model replica for a large corpus: each holder keeps the ids, "
            "~8 bytes a document plus their text, and a FAISS index in memory; a hop more per request)"
        ),
    )
    recall_in_ingress: bool = Field(
        default=False,
        description=(
            "Each ingress replica also loads the dense and sparse models that have an index, with their indices "
            "and their documents' texts, and runs /search's query encode and index search in its own process: "
            "one Serve hop less per request. The model deployments then hold no index and serve every other "
            "endpoint. Costs each ingress replica those models' memory and load time; their encodes use the "
            "models' torch_threads on the cores the deployments share (CPU models only), one query at a time per "
            "model and ingress replica (no batching: /search scales with ingress_replicas, not the models' "
            "replicas)"
        ),
    )
    ingress_backend: Backend | None = Field(
        default=None,
        description=(
            "with recall_in_ingress: what runs the ingress's query models (torch / onnx); default: each model's own "
            "backend. onnx was the faster for one query at a time on CPU (measured, BENCHMARKS.md), while the model "
            "deployments keep theirs for batches (bf16 torch on a CPU with AMX)"
        ),
    )
    host: str = Field(
        default="127.0.0.1",
        description="the address HTTP is served on where raytrieve starts Serve (0.0.0.0: every interface, "
        "only behind your own gateway); under `serve deploy`, its file's http_options",
    )
    port: int = Field(
        default=8100,
        description="the HTTP port clients use, where raytrieve starts Serve (Serve's proxy, or the ingress "
        "replica with direct_ingress); under `serve deploy`, its file's http_options",
    )
    route_prefix: str = Field(
        default="/",
        description="the URL path the endpoints are under, where raytrieve deploys the app (`serve deploy` "
        "takes its file's)",
    )
    app_name: str = Field(
        default="raytrieve",
        description="the Serve application's name, where raytrieve deploys it (`serve deploy` takes its "
        "file's); deploying under a running app's name replaces that app",
    )
    ingress_replicas: int = Field(
        default=1,
        description="replicas of the HTTP ingress (0.1 CPU each), which checks requests, calls the models and "
        "fuses /search's lists",
    )
    health_check_period_s: float = Field(
        default=2.0,
        gt=0,
        description=(
            "Seconds between Serve's checks of each replica (ingress, models, retriever): a replica whose "
            "process died is replaced once a check finds it (until then /healthz answers 503 for its model). "
            "Serve's own default is 10 s; a check is one small actor call"
        ),
    )
    direct_ingress: bool = Field(
        default=False,
        description=(
            "The ingress replica answers HTTP on host:port itself (Ray Serve's direct ingress) and Serve's proxy "
            "moves to port + 1: one hop less per request (/search p50 47.6 -> 29.9 ms on 2 cores, 10,000 documents, "
            "BENCHMARKS.md). One ingress replica per node, so ingress_replicas at most the cluster's nodes; Serve "
            "then runs its proxy on the head node only, and it reaches every ingress replica. One such app per "
            "Serve. Set up where raytrieve starts Serve (`raytrieve serve`, raytrieve.serve.launch.start), not "
            "under `serve deploy`"
        ),
    )
    auth_token_env: str = Field(
        default="RAYTRIEVE_API_TOKEN",
        description=(
            "Name of an environment variable; when it is set, every endpoint but /healthz and /health wants "
            '"Authorization: Bearer <its value>".'
        ),
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description=(
            "Where models:/NAME/VERSION and runs:/ model URIs are looked up; passed to every replica. None: "
            "MLFLOW_TRACKING_URI of the process that builds the app, else ./mlruns."
        ),
    )
    limits: LimitsConfig = Field(
        default_factory=LimitsConfig,
        description="bounds on each request (one past a bound is refused with a 4xx naming the field; 413 for "
        "the body) and on the ingress's queue (503 past it)",
    )
    search: SearchDefaults = Field(
        default_factory=SearchDefaults,
        description="/search's values for the fields a request leaves out (`raytrieve evaluate --tune-on` writes them)",
    )

    @property
    def proxy_port(self) -> int:
        """Where Serve's proxy listens: ``port``, or the next one when the ingress replica
        answers ``port`` itself (``direct_ingress``)."""
        return self.port + 1 if self.direct_ingress else self.port

    def deployments(self, kind: str) -> list[DeploymentConfig]:
        """The ``kind`` field's deployments (dense / sparse / reranker), the default first."""
        value = getattr(self, kind)
        return [] if value is None else list(value) if isinstance(value, list) else [value]

    def default(self, kind: str) -> DeploymentConfig | None:
        return next(iter(self.deployments(kind)), None)

    @property
    def retriever_deployed(self) -> bool:
        """Whether a retriever deployment runs: an index is served, and neither the models'
        replicas nor the ingress (``recall_in_ingress``) hold it."""
        held_elsewhere = self.colocate_index or self.recall_in_ingress
        return not held_elsewhere and any(m.index is not None for m in self.served())

    def index_folders(self) -> list[str]:
        """Every index folder the app's models search, once each, in ``served()``'s order."""
        return list(dict.fromkeys(m.index for m in self.served() if m.index is not None))

    def ingress_models(self) -> list[Served]:
        """With ``recall_in_ingress``, the models each ingress replica loads for /search's recall:
        every dense and sparse model with an index, in ``ingress_backend`` when set (onnx then
        computes in float32: an explicit bf16 / fp16 / int8 dtype falls back to auto). Else none."""
        if not self.recall_in_ingress:
            return []
        out = []
        for m in self.served():
            if m.index is None:
                continue
            spec = m.spec
            if self.ingress_backend is not None and self.ingress_backend != spec.backend:
                update: dict[str, Any] = {"backend": self.ingress_backend}
                if self.ingress_backend == "onnx" and spec.dtype not in ("float32", "auto"):
                    update["dtype"] = "auto"
                spec = spec.model_copy(update=update)
            out.append(Served(m.kind, m.path, m.deployment, spec, m.index, m.default))
        return out

    def served(self) -> list[Served]:
        """Every model deployment, by kind (MODEL_FIELDS' order), each kind's default first."""
        out: list[Served] = []
        taken: set[str] = set()
        for kind in MODEL_FIELDS:
            listed = isinstance(getattr(self, kind), list)
            for i, d in enumerate(self.deployments(kind)):
                # Serve's names: the kind for a default (as before several models), else the kind and
                # the model's name in the characters Serve's names and metrics tags take.
                name = kind if i == 0 else f"{kind}-{re.sub(r'[^A-Za-z0-9_-]+', '-', d.public_name).strip('-')}"
                name = name if name not in taken else f"{kind}-{i}"
                taken.add(name)
                index = d.index if d.index is not None else (self.index if i == 0 and kind != "reranker" else None)
                out.append(Served(kind, f"{kind}[{i}]" if listed else kind, name, d, index, i == 0))
        return out

    def with_deployments(self, specs: list[DeploymentConfig]) -> ServeConfig:
        """This config with ``served()``'s deployments replaced, in its order (each field keeps its shape)."""
        given = iter(specs)
        update: dict[str, Any] = {}
        for kind in MODEL_FIELDS:
            value = getattr(self, kind)
            if value is not None:
                update[kind] = [next(given) for _ in value] if isinstance(value, list) else next(given)
        return self.model_copy(update=update)

    @model_validator(mode="after")
    def _rules(self) -> ServeConfig:
        for kind in MODEL_FIELDS:
            if getattr(self, kind) == []:
                invalid(kind, ": an empty list; give at least one deployment, or leave the key out")
        served = self.served()
        if not served:
            invalid("", ": set at least one of dense:, sparse:, reranker:")
        if not 0 < self.port < 65536:
            invalid("port", f" must be 1-65535, got {self.port}")
        if self.direct_ingress and self.port == 65535:
            invalid("port", ": with direct_ingress Serve's proxy takes port + 1; pick a port below 65535")
        paths: dict[str, str] = {}
        for m in served:
            if m.name in paths:
                invalid(
                    "",
                    f": {paths[m.name]} and {m.path} share the name {m.name!r} (name:, else model:); clients pick a"
                    f" model by its name: set a distinct name: on one of them",
                )
            paths[m.name] = m.path
            d = m.spec
            if d.num_replicas < 1 or d.max_batch_tokens < 1 or d.max_ongoing_requests < 1:
                invalid(m.path, ": num_replicas, max_batch_tokens and max_ongoing_requests must be >= 1")
            if (d.num_cpus is not None and d.num_cpus < 0) or d.num_gpus < 0:
                invalid(m.path, ": num_cpus and num_gpus must be >= 0")
            if d.backend == "onnx" and d.dtype not in ("float32", "auto"):
                invalid(
                    f"{m.path}.backend",
                    f": onnx computes in float32; set dtype: float32 (or auto), or backend: torch for {d.dtype}",
                )
            if d.backend == "onnx" and d.num_gpus > 0:
                invalid(f"{m.path}.backend", ": onnx runs on CPU here; set num_gpus: 0, or backend: torch on a GPU")
            if m.kind == "reranker" and d.index is not None:
                invalid(f"{m.path}.index", ": a reranker has no index (it rescores /search's candidates); drop it")
        self._index_rules(served)
        if self.ingress_backend is not None and not self.recall_in_ingress:
            invalid("ingress_backend", ": has no effect without recall_in_ingress: true; set that, or drop it")
        if self.recall_in_ingress:
            indexed = [m for m in served if m.index is not None]
            if not indexed:
                invalid("recall_in_ingress", ": no dense or sparse model has an index to search; drop it")
            on_gpu = [m.path for m in indexed if m.spec.num_gpus > 0]
            if on_gpu:
                invalid(
                    "recall_in_ingress",
                    f": the ingress runs its query models on CPU, and {', '.join(on_gpu)} asks for a GPU; set "
                    "recall_in_ingress: false (the GPU replicas then encode the queries) or num_gpus: 0",
                )
        for name, value in self.limits.model_dump().items():
            if value < 1:
                invalid(f"limits.{name}", f" must be >= 1, got {value}")
        self._search_rules(served)
        return self

    def _index_rules(self, served: list[Served]) -> None:
        if self.index is not None and not any(m.index == self.index and m.spec.index is None for m in served):
            if not any(m.kind != "reranker" for m in served):
                invalid("index", " needs a dense: or sparse: model to encode queries with")
            invalid(
                "index",
                ": no model searches it (the default dense and sparse models set an index: of their own); drop it",
            )
        for m in served:
            if m.index is not None and not m.default and self.default(m.kind) is not None:
                first = next(x for x in served if x.kind == m.kind)
                if first.index is None:
                    invalid(
                        f"{first.path}",
                        f": {m.path} has an index but the default {m.kind} model (the first) has none, so /search "
                        f"without {m.kind}_model could not use it; list an indexed model first or give this one "
                        "index:",
                    )

    def _search_rules(self, served: list[Served]) -> None:
        """The ``search:`` defaults must be requests this app accepts (a request may override them)."""
        s = self.search
        problem = search_limit_error(s, self.limits)
        if problem is None and self.reranker is not None:
            # The default depth is every reranking request's that names none: checked with
            # search.rerank false too, where a reranker is served.
            problem = search_limit_error(s.model_copy(update={"rerank": True}), self.limits)
        if problem is not None:
            invalid(f"search.{problem[0]}", f": {problem[1]}")
        if s.rerank and self.reranker is None:
            invalid("search.rerank", ": true needs a reranker: deployment")
        retrievers = [m.kind for m in served if m.default and m.index is not None]
        if retrievers and not any(getattr(s.recall, k) > 0 for k in retrievers):
            invalid(
                "search.recall",
                f": every served retriever is switched off ({', '.join(f'{k}: 0' for k in retrievers)}), so /search "
                f"would refuse every request that sets no recall; give {' or '.join(retrievers)} a size above 0",
            )


def search_limit_error(s: SearchRequest | SearchDefaults, limits: LimitsConfig) -> tuple[str, str] | None:
    """(the field, why) of the first of /search's settings over the config's ``limits``, or None.
    The ingress checks requests with it, the config its ``search:`` defaults."""
    if s.top_k > limits.max_top_k:
        return "top_k", f"{s.top_k} exceeds limits.max_top_k ({limits.max_top_k})"
    for name in ("dense", "sparse"):
        if getattr(s.recall, name) > limits.max_recall:
            return f"recall.{name}", f"exceeds limits.max_recall ({limits.max_recall}), got {getattr(s.recall, name)}"
    if s.rerank and s.rerank_depth > limits.max_rerank_depth:
        return "rerank_depth", f"exceeds limits.max_rerank_depth ({limits.max_rerank_depth}), got {s.rerank_depth}"
    return None


def replicas(d: DeploymentConfig) -> int:
    """Replicas a deployment starts with (an autoscaling one: its minimum, as Serve does)."""
    if d.autoscaling:
        return int(d.autoscaling.get("initial_replicas") or d.autoscaling.get("min_replicas", 1) or 1)
    return d.num_replicas


def most_replicas(d: DeploymentConfig) -> int:
    """Replicas a deployment can run at once (an autoscaling one: its maximum)."""
    if d.autoscaling:
        return max(replicas(d), int(d.autoscaling.get("max_replicas") or 1))
    return d.num_replicas


def sized(cfg: ServeConfig, shape: ClusterShape) -> ServeConfig:
    """``cfg`` with every model deployment's ``num_cpus`` and ``torch_threads`` set: what the
    config leaves unset is sized from the cluster (raytrieve.sizing)."""
    models = [m.spec for m in cfg.served()]
    unset = sum(replicas(d) for d in models if d.num_cpus is None)
    taken = sum(replicas(d) * d.num_cpus for d in models if d.num_cpus is not None)
    light = cfg.ingress_replicas + (1 if cfg.retriever_deployed else 0)
    free = replace(shape, cpus=max(0.0, shape.cpus - taken))
    # Every reranker replica that can run at once shares the node's threads: an autoscaling
    # one's maximum, or scaling up would oversubscribe the cores.
    rerankers = sum(most_replicas(m.spec) for m in cfg.served() if m.kind == "reranker")
    specs = []
    for m in cfg.served():
        d = m.spec
        cpus = d.num_cpus if d.num_cpus is not None else serve_replica_cpus(free, unset, light)
        threads = replica_threads(cpus)
        if m.kind == "reranker":
            threads = max(threads, reranker_threads(shape, rerankers))
        specs.append(d.model_copy(update={"num_cpus": cpus, "torch_threads": d.torch_threads or threads}))
    return cfg.with_deployments(specs)


def reranker_threads(shape: ClusterShape, rerankers: int) -> int:
    """Torch threads of a reranker replica when the config sets none: one node's CPUs shared
    among all reranker replicas that can run at once, at most 4 (``sized`` keeps its CPU share's
    if more). A reranker runs after the same request's query encoders and recall, not beside
    them; measured on 2 cores (BENCHMARKS.md): /search + rerank@20 1,195 -> 757 ms
    p50 with 2 threads, and plain searches beside a client that reranks were not slower."""
    return max(1, min(4, math.floor(shape.largest_node_cpus / max(1, rerankers))))


def check_fits(cfg: ServeConfig, shape: ClusterShape, where: str = "config") -> None:
    """Refuse, before anything deploys, a sized config whose replicas the cluster cannot hold:
    Ray would otherwise wait forever, logging only that actors cannot be scheduled."""
    served = cfg.served()
    asks = [(m.deployment, replicas(m.spec), m.spec.num_cpus or 0.0, m.spec.num_gpus) for m in served]
    asks.append(("ingress", cfg.ingress_replicas, LIGHT_ACTOR_CPUS, 0.0))
    if cfg.retriever_deployed:
        asks.append(("retriever", 1, LIGHT_ACTOR_CPUS, 0.0))
    cpus = sum(n * c for _, n, c, _ in asks)
    gpus = sum(n * g for _, n, _, g in asks)
    listing = ", ".join(f"{k} {n} x {c:g} CPU" + (f" + {g:g} GPU" if g else "") for k, n, c, g in asks)
    if cfg.direct_ingress and cfg.ingress_replicas > shape.nodes:
        raise ConfigError(
            f"{where}.ingress_replicas: {cfg.ingress_replicas} with direct_ingress, but the cluster has {shape.nodes} "
            f"node(s) and each node holds one ingress replica (it answers port {cfg.port} itself); set "
            "ingress_replicas to at most the nodes, or direct_ingress: false (Serve's proxy then spreads requests "
            "over the replicas)"
        )
    too_big = [k for k, _, c, g in asks if c > shape.largest_node_cpus + 1e-9 or g > shape.largest_node_gpus + 1e-9]
    if cpus > shape.cpus + 1e-9 or gpus > shape.gpus + 1e-9 or too_big:
        what = f"one replica of {', '.join(too_big)} is larger than any node" if too_big else "they do not fit"
        raise ConfigError(
            f"{where}: the deployments ask for {cpus:g} CPU(s) and {gpus:g} GPU(s) ({listing}); the cluster has "
            f"{shape.cpus:g} CPU(s) and {shape.gpus:g} GPU(s), at most {shape.largest_node_cpus:g} CPU(s) and "
            f"{shape.largest_node_gpus:g} GPU(s) on one node: {what}. Lower num_cpus / num_gpus / num_replicas "
            "(or leave num_cpus unset: it is then sized from the cluster) or add nodes"
        )


def load_serve_config(path: str, overrides: list[str] | None = None) -> ServeConfig:
    return load_yaml(ServeConfig, path, overrides)
