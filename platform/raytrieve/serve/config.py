"""The Serve application's config: which models and indices, replicas and batching per
deployment, request limits, host and port. YAML maps onto these pydantic models (unknown keys
are errors that name the key).

    cfg = load_serve_config("jobs/configs/serve_pydocs.yaml", ["port=8300"])
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from raytrieve.config import ConfigModel, Dtype, dtype_field, invalid, load_yaml


class DeploymentConfig(ConfigModel):
    model: str = Field(description="a models/ variant, a local folder, or models:/NAME/VERSION (MLflow)")
    name: str | None = Field(
        default=None, description='the name clients use (/v1/models, "model" fields); default: model'
    )
    max_seq_length: int | None = None
    dtype: Dtype = dtype_field()
    num_replicas: int = 1
    autoscaling: dict[str, Any] | None = Field(
        default=None, description="Ray Serve autoscaling_config; replaces num_replicas"
    )
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    torch_threads: int | None = Field(default=None, description="default: num_cpus, at least 1")
    max_batch_tokens: int = Field(
        default=8192,
        description=(
            "Dynamic batching: requests are grouped until their texts' estimated tokens reach the budget (or"
            " the wait runs out); a single request over the budget still runs alone."
        ),
    )
    batch_wait_timeout_s: float = 0.005
    max_ongoing_requests: int = 32
    trust_remote_code: bool = False

    @property
    def public_name(self) -> str:
        return self.name or self.model


class LimitsConfig(ConfigModel):
    max_body_bytes: int = 1_000_000
    max_inputs: int = Field(
        default=128, description="texts per /v1/embeddings, /embed, /embed_sparse or /tokenize request"
    )
    max_text_chars: int = Field(default=8_000, description="per text, query or document")
    max_documents: int = Field(default=256, description="per /rerank, /v1/rerank or /v2/rerank request")
    max_top_k: int = 100
    max_recall: int = Field(default=1000, description="candidates per retriever in /search")
    max_rerank_depth: int = 200
    max_queued_requests: int = Field(default=64, description="at the HTTP proxy, per ingress replica; more get 503")
    retry_after_s: int = 1


class ServeConfig(ConfigModel):
    dense: DeploymentConfig | None = None
    sparse: DeploymentConfig | None = None
    reranker: DeploymentConfig | None = None
    index: str | None = Field(
        default=None,
        description=(
            "A folder from `raytrieve index build`; /search needs it. Its source.json says which corpus the "
            "vectors came from; the documents' texts are read from there."
        ),
    )
    host: str = "127.0.0.1"
    port: int = 8100
    route_prefix: str = "/"
    app_name: str = "raytrieve"
    ingress_replicas: int = 1
    auth_token_env: str = Field(
        default="RAYTRIEVE_API_TOKEN",
        description=(
            "Name of an environment variable; when it is set, every endpoint but /healthz wants "
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
    limits: LimitsConfig = Field(default_factory=LimitsConfig)

    @model_validator(mode="after")
    def _rules(self) -> ServeConfig:
        if self.dense is None and self.sparse is None and self.reranker is None:
            invalid("", ": set at least one of dense:, sparse:, reranker:")
        if self.index is not None and self.dense is None and self.sparse is None:
            invalid("index", " needs a dense: or sparse: model to encode queries with")
        if not 0 < self.port < 65536:
            invalid("port", f" must be 1-65535, got {self.port}")
        names = [d.public_name for d in (self.dense, self.sparse, self.reranker) if d is not None]
        if len(set(names)) != len(names):
            invalid("", f": two deployments share the name {names}; set name: on one of them")
        for key, d in (("dense", self.dense), ("sparse", self.sparse), ("reranker", self.reranker)):
            if d is None:
                continue
            if d.num_replicas < 1 or d.max_batch_tokens < 1 or d.max_ongoing_requests < 1:
                invalid(key, ": num_replicas, max_batch_tokens and max_ongoing_requests must be >= 1")
            if d.num_cpus < 0 or d.num_gpus < 0:
                invalid(f"{key}", ": num_cpus and num_gpus must be >= 0")
        for name, value in self.limits.model_dump().items():
            if value < 1:
                invalid(f"limits.{name}", f" must be >= 1, got {value}")
        return self


def load_serve_config(path: str, overrides: list[str] | None = None) -> ServeConfig:
    return load_yaml(ServeConfig, path, overrides)
