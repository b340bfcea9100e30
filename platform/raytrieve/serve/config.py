"""The Serve application's config: which models and indices, replicas and batching per
deployment, request limits, host and port. YAML maps onto these dataclasses (unknown keys
are errors that name the key).

    cfg = load_serve_config("jobs/configs/serve_pydocs.yaml", ["port=8300"])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raytrieve.config import load_yaml
from raytrieve.errors import ConfigError


@dataclass
class DeploymentConfig:
    model: str  # a models/ variant, a local folder, or models:/NAME/VERSION (MLflow)
    name: str | None = None  # the name clients use (/v1/models, "model" fields); default: model
    max_seq_length: int | None = None
    num_replicas: int = 1
    autoscaling: dict[str, Any] | None = None  # Ray Serve autoscaling_config; replaces num_replicas
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    torch_threads: int | None = None  # default: num_cpus, at least 1
    # Dynamic batching: requests are grouped until their texts' estimated tokens reach the
    # budget (or the wait runs out); a single request over the budget still runs alone.
    max_batch_tokens: int = 8192
    batch_wait_timeout_s: float = 0.005
    max_ongoing_requests: int = 32
    trust_remote_code: bool = False

    @property
    def public_name(self) -> str:
        return self.name or self.model


@dataclass
class LimitsConfig:
    max_body_bytes: int = 1_000_000
    max_inputs: int = 128  # texts per /v1/embeddings or /embed_sparse request
    max_text_chars: int = 8_000  # per text, query or document
    max_documents: int = 256  # per /rerank request
    max_top_k: int = 100
    max_recall: int = 1000  # candidates per retriever in /search
    max_rerank_depth: int = 200
    max_queued_requests: int = 64  # at the HTTP proxy, per ingress replica; more get 503
    retry_after_s: int = 1


@dataclass
class ServeConfig:
    dense: DeploymentConfig | None = None
    sparse: DeploymentConfig | None = None
    reranker: DeploymentConfig | None = None
    # A folder from `raytrieve index build`; /search needs it. Its source.json says which
    # corpus the vectors came from; the documents' texts are read from there.
    index: str | None = None
    host: str = "127.0.0.1"
    port: int = 8100
    route_prefix: str = "/"
    app_name: str = "raytrieve"
    ingress_replicas: int = 1
    # Name of an environment variable; when it is set, every endpoint but /healthz wants
    # "Authorization: Bearer <its value>".
    auth_token_env: str = "RAYTRIEVE_API_TOKEN"
    # Where models:/NAME/VERSION and runs:/ model URIs are looked up; passed to every replica.
    # None: MLFLOW_TRACKING_URI of the process that builds the app, else ./mlruns.
    mlflow_tracking_uri: str | None = None
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    def check(self, where: str = "config") -> None:
        if self.dense is None and self.sparse is None and self.reranker is None:
            raise ConfigError(f"{where}: set at least one of dense:, sparse:, reranker:")
        if self.index is not None and self.dense is None and self.sparse is None:
            raise ConfigError(f"{where}.index needs a dense: or sparse: model to encode queries with")
        if not 0 < self.port < 65536:
            raise ConfigError(f"{where}.port must be 1-65535, got {self.port}")
        names = [d.public_name for d in (self.dense, self.sparse, self.reranker) if d is not None]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: two deployments share the name {names}; set name: on one of them")
        for key, d in (("dense", self.dense), ("sparse", self.sparse), ("reranker", self.reranker)):
            if d is None:
                continue
            if d.num_replicas < 1 or d.max_batch_tokens < 1 or d.max_ongoing_requests < 1:
                raise ConfigError(
                    f"{where}.{key}: num_replicas, max_batch_tokens and max_ongoing_requests must be >= 1"
                )
            if d.num_cpus < 0 or d.num_gpus < 0:
                raise ConfigError(f"{where}.{key}: num_cpus and num_gpus must be >= 0")
        for name, value in vars(self.limits).items():
            if value < 1:
                raise ConfigError(f"{where}.limits.{name} must be >= 1, got {value}")


def load_serve_config(path: str, overrides: list[str] | None = None) -> ServeConfig:
    cfg = load_yaml(ServeConfig, path, overrides)
    cfg.check(str(path))
    return cfg
