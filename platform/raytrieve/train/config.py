"""The training config: YAML onto typed dataclasses, ``key=value`` overrides, errors that
name the key. Everything here is checked before any cluster work starts.

    cfg = load_train_config("jobs/configs/dense_mnrl.yaml", ["training.batch_size=64"])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from raytrieve.config import from_dict, load_yaml
from raytrieve.errors import ConfigError


class Wrapping(NamedTuple):
    example: str  # a base loss to show in errors
    default: str | None  # the base used when a config names none; None: a config must name one


# The losses that wrap a base loss, by name. A table of names here rather than attributes of the
# loss classes because LossSpec.base must work without torch (Ray's controller and Ray Data's
# tasks unpickle specs and never import it). @register (losses/base.py) refuses a class whose
# constructor takes a base loss (``loss``) and is missing here, or the reverse, so the two
# cannot drift apart.
WRAPPING_LOSSES: dict[str, Wrapping] = {
    "SpladeLoss": Wrapping("SparseMultipleNegativesRankingLoss", None),
    "CSRLoss": Wrapping("SparseMultipleNegativesRankingLoss", "SparseMultipleNegativesRankingLoss"),
    "MatryoshkaLoss": Wrapping("MultipleNegativesRankingLoss", None),
    "Matryoshka2dLoss": Wrapping("MultipleNegativesRankingLoss", None),
    "AdaptiveLayerLoss": Wrapping("MultipleNegativesRankingLoss", None),
}


@dataclass
class LossSpec:
    """One loss in a config. ``inner`` is the base loss of a loss that wraps one (SpladeLoss, CSRLoss,
    MatryoshkaLoss, Matryoshka2dLoss, AdaptiveLayerLoss); ``args.loss``, sentence-transformers'
    argument name, is read the same way."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)
    inner: LossSpec | None = None
    matryoshka_dims: list[int] | None = None
    matryoshka_weights: list[float] | None = None

    @property
    def base(self) -> LossSpec:
        """The loss that meets the data: the innermost base through wrapping losses (a wrapper's
        default base if it names none; the wrapper itself if it has no default). Its columns and
        labels are the ones a dataset must have.

        Reading it writes the chain out in place (a base given as ``args.loss`` moves to
        ``inner``, a wrapper's default base is filled in), so the spec returned is the very one
        the registry builds: what a caller sets on it (the trainer's ``gather_across_devices``)
        takes effect. Errors name the keys from ``loss``; ``base_at`` names them from a config path."""
        return self.base_at("loss")

    def base_at(self, where: str) -> LossSpec:
        """``base``, with errors naming the keys under ``where`` (e.g. ``config.datasets[0].loss``)."""
        spec = self
        while spec.name in WRAPPING_LOSSES:
            inner, inner_where = spec.inner_at(where)
            if inner is None:
                default = WRAPPING_LOSSES[spec.name].default
                if default is None:
                    return spec
                inner = LossSpec(default)
            spec.args.pop("loss", None)
            spec.inner = inner
            spec, where = inner, inner_where
        return spec

    def inner_at(self, where: str) -> tuple[LossSpec | None, str]:
        """The base this loss names itself (``inner``, or ``args.loss`` for a wrapping loss) and
        the key it was written at; None when it names none."""
        given = self.args.get("loss") if self.name in WRAPPING_LOSSES else None
        if given is None:
            return self.inner, f"{where}.inner"
        if self.inner is not None:
            raise ConfigError(f"{where}: give the base loss of {self.name} once, in {where}.inner or {where}.args.loss")
        if isinstance(given, LossSpec):
            return given, f"{where}.args.loss"
        if not isinstance(given, dict):
            raise ConfigError(
                f"{where}.args.loss: expected a loss spec such as "
                f"{{name: {WRAPPING_LOSSES[self.name].example}, args: {{...}}}}, got {given!r}"
            )
        return from_dict(LossSpec, given, f"{where}.args.loss"), f"{where}.args.loss"


@dataclass
class ModelConfig:
    name_or_path: str  # a models/ variant, a local sentence-transformers folder
    kind: Literal["dense", "sparse", "cross"]
    max_seq_length: int | None = None
    trust_remote_code: bool = False
    # sparse only: start an inference-free SPLADE Router from the model: queries by a
    # SparseStaticEmbedding (one learned weight per token), documents by the MLM + SpladePooling.
    inference_free: bool = False


@dataclass
class DatasetConfig:
    name: str
    path: str
    loss: LossSpec
    format: Literal["parquet", "jsonl", "csv", "hf"] | None = None  # None: from the file name
    columns: list[str] | None = None  # text columns in the loss's order; None: all but the label
    label_column: str | None = None
    # One prompt for every column, or one per column name.
    prompts: str | dict[str, str] | None = None
    # Column name -> Router route ("query" / "document") for asymmetric models.
    router_mapping: dict[str, str] = field(default_factory=dict)
    weight: float = 1.0  # share of batches under proportional multi-dataset sampling


@dataclass
class OptimizerConfig:
    name: Literal["adamw"] = "adamw"
    learning_rate: float = 2e-5
    weight_decay: float = 0.01
    # Regex over parameter names -> learning rate (first match wins), e.g. {"^stack\\.1\\.": 1e-3}.
    learning_rate_mapping: dict[str, float] = field(default_factory=dict)
    max_grad_norm: float | None = 1.0


@dataclass
class ScheduleConfig:
    name: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = 0.1


@dataclass
class TrainingConfig:
    batch_size: int = 32
    epochs: int = 1
    max_steps: int | None = None
    gradient_accumulation_steps: int = 1
    batch_sampler: Literal["no_duplicates", "group_by_label", "default"] = "no_duplicates"
    multi_dataset_sampler: Literal["proportional", "round_robin"] = "proportional"
    seed: int = 42
    bf16: bool = False


@dataclass
class EvalConfig:
    path: str | None = None
    evaluator: Literal["information_retrieval", "embedding_similarity", "reranking"] | None = None
    every_n_steps: int | None = None


@dataclass
class CheckpointConfig:
    every_n_steps: int | None = None  # None: only the final checkpoint
    keep: int = 2
    dir: str | None = None  # Ray Train storage; default: <output_dir>.checkpoints next to the model
    max_failures: int = 1  # worker failures survived by restarting from the last checkpoint


@dataclass
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    # How workers are placed on nodes: PACK fills a node first; STRICT_SPREAD puts each on its own node.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    strategy: Literal["ddp", "fsdp"] = "ddp"
    torch_threads: int | None = None  # per worker; default: its CPU share, at least 1
    tokenizer_actors: int = 1  # unused: training tokenizes in its read tasks (kept so configs still load)


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, else ./mlruns
    experiment: str = "raytrieve"
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    register_model_as: str | None = None


@dataclass
class TrainConfig:
    model: ModelConfig
    datasets: list[DatasetConfig]
    output_dir: str
    # Prompts for every dataset that sets none: one string for all columns, or per column name.
    prompts: str | dict[str, str] | None = None
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


def check_values(cfg: TrainConfig, where: str = "config") -> TrainConfig:
    """Range checks the types alone cannot express."""
    import re

    t = cfg.training
    for key, value in (
        ("training.batch_size", t.batch_size),
        ("training.epochs", t.epochs),
        ("training.gradient_accumulation_steps", t.gradient_accumulation_steps),
        ("scaling.num_workers", cfg.scaling.num_workers),
        ("checkpoint.keep", cfg.checkpoint.keep),
        ("scaling.tokenizer_actors", cfg.scaling.tokenizer_actors),
    ):
        if value < 1:
            raise ConfigError(f"{where}.{key} must be at least 1, got {value}")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"{where}.training.max_steps must be at least 1 (or null for epochs), got {t.max_steps}")
    if cfg.optimizer.learning_rate <= 0:
        raise ConfigError(f"{where}.optimizer.learning_rate must be positive, got {cfg.optimizer.learning_rate}")
    if not 0 <= cfg.schedule.warmup_ratio < 1:
        raise ConfigError(f"{where}.schedule.warmup_ratio must be in [0, 1), got {cfg.schedule.warmup_ratio}")
    for pattern in cfg.optimizer.learning_rate_mapping:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{where}.optimizer.learning_rate_mapping: bad regex {pattern!r} ({e})") from None
    if not cfg.datasets:
        raise ConfigError(f"{where}.datasets: give at least one dataset")
    names = [d.name for d in cfg.datasets]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}.datasets: dataset names must be unique, got {names}")
    for i, d in enumerate(cfg.datasets):
        if d.weight <= 0:
            raise ConfigError(f"{where}.datasets[{i}].weight must be positive, got {d.weight}")
        if d.router_mapping and set(d.router_mapping.values()) - {"query", "document"}:
            raise ConfigError(f"{where}.datasets[{i}].router_mapping routes must be 'query' or 'document'")
    if cfg.model.inference_free and cfg.model.kind != "sparse":
        raise ConfigError(f"{where}.model.inference_free applies to sparse models only")
    if cfg.checkpoint.max_failures < 0:
        raise ConfigError(f"{where}.checkpoint.max_failures must be 0 or more, got {cfg.checkpoint.max_failures}")
    if cfg.eval.path is not None and cfg.eval.evaluator is None:
        raise ConfigError(f"{where}.eval.evaluator is required when eval.path is set")
    return cfg


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    return check_values(load_yaml(TrainConfig, path, overrides), where=str(path))
