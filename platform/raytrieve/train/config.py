"""The training config: YAML onto pydantic models, ``key=value`` overrides, errors that
name the key. Everything here is checked before any cluster work starts.

    cfg = load_train_config("jobs/configs/dense_mnrl.yaml", ["training.batch_size=64"])

Adding a setting: its default must train as runs made before it did. A run's checkpoints are
stamped with every setting (train/checkpoint.py), and resume across an upgrade only because a
setting the stamp lacks is taken to be at that old behaviour when it holds its default.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from raytrieve.config import ConfigModel, from_dict, invalid, load_yaml, trust_remote_code_field
from raytrieve.data.formats import FORMATS
from raytrieve.errors import ConfigError
from raytrieve.kinds import MODEL_KINDS
from raytrieve.wrapping_losses import WRAPPING_LOSSES

# sentence-transformers' (transformers') training-argument names, and where each lives here: an
# unknown key among them is told its place (config.validation_messages).
_ST_ARGUMENTS = {
    "learning_rate": "optimizer.learning_rate",
    "weight_decay": "optimizer.weight_decay",
    "max_grad_norm": "optimizer.max_grad_norm",
    "optim": "optimizer.name",
    "warmup_ratio": "schedule.warmup_ratio",
    "warmup_steps": "schedule.warmup_ratio (a share of the steps)",
    "lr_scheduler_type": "schedule.name",
    "per_device_train_batch_size": "training.batch_size",
    "train_batch_size": "training.batch_size",
    "batch_size": "training.batch_size",
    "num_train_epochs": "training.epochs",
    "epochs": "training.epochs",
    "max_steps": "training.max_steps",
    "seed": "training.seed",
    "bf16": "training.bf16",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "batch_sampler": "training.batch_sampler",
    "multi_dataset_batch_sampler": "training.multi_dataset_sampler",
    "eval_steps": "eval.every_n_steps",
    "save_steps": "checkpoint.every_n_steps",
    "save_total_limit": "checkpoint.keep",
    "run_name": "mlflow.run_name",
    "evaluator": "eval.evaluator",
    "loss": "datasets[].loss",
}


_LOSS_KEYS = ("name", "args", "inner", "matryoshka_dims", "matryoshka_weights")  # a typo of one is no argument


class LossSpec(ConfigModel):
    """One loss in a config. ``inner`` is the base loss of a loss that wraps one (SpladeLoss, CSRLoss,
    MatryoshkaLoss, Matryoshka2dLoss, AdaptiveLayerLoss); ``args.loss``, sentence-transformers'
    argument name, is read the same way. A name alone (``loss: CoSENTLoss``) is ``{name: ...}``."""

    # Any other key in a loss's mapping is one of its arguments, written one level too high.
    KEYS_ELSEWHERE: ClassVar[Any] = staticmethod(
        lambda key: None if difflib.get_close_matches(key, _LOSS_KEYS, n=1, cutoff=0.8) else f"args.{key}"
    )

    @model_validator(mode="before")
    @classmethod
    def _a_name_alone(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    name: str = Field(
        description="a loss of the model's kind, by its sentence-transformers class name (e.g. "
        "MultipleNegativesRankingLoss)"
    )
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="the loss's arguments by sentence-transformers' names, e.g. {scale: 20}; a wrapping loss's "
        "base may be given as args.loss",
    )
    inner: LossSpec | None = Field(
        default=None,
        description="the base loss of a wrapping loss (SpladeLoss, CSRLoss, MatryoshkaLoss, Matryoshka2dLoss, "
        "AdaptiveLayerLoss), itself a loss spec; None: the wrapper's default base (CSRLoss has one, the others "
        "need it)",
    )
    matryoshka_dims: list[int] | None = Field(
        default=None,
        description="dense only: wrap this loss in a MatryoshkaLoss over these embedding sizes (as name: "
        "MatryoshkaLoss with args.matryoshka_dims would)",
    )
    matryoshka_weights: list[float] | None = Field(
        default=None, description="with matryoshka_dims: one weight per size; None: 1 each"
    )

    def __init__(self, *name_and_args: Any, **fields: Any) -> None:
        # Name and args may come positionally (``LossSpec("CSRLoss", {"beta": 0.2})``), as code
        # builds specs; pydantic calls this with keywords only when it validates a mapping.
        super().__init__(**dict(zip(("name", "args"), name_and_args, strict=False)), **fields)

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
                inner = LossSpec(name=default)
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
        if isinstance(given, str):  # a name alone, as the loss itself may be given
            given = {"name": given}
        if not isinstance(given, dict):
            raise ConfigError(
                f"{where}.args.loss: expected a loss spec such as "
                f"{{name: {WRAPPING_LOSSES[self.name].example}, args: {{...}}}}, got {given!r}"
            )
        return from_dict(LossSpec, given, f"{where}.args.loss"), f"{where}.args.loss"


class ModelConfig(ConfigModel):
    name_or_path: str = Field(
        description="a models/ variant, a local sentence-transformers folder, a folder URI (s3://...) or an MLflow URI "
        "(models:/NAME/VERSION)"
    )
    kind: Literal[tuple(MODEL_KINDS)] = Field(  # pyright: ignore[reportInvalidTypeForm]  (kinds.py's names)
        description="dense (embeddings), sparse (sparse vectors) or cross (a cross-encoder that scores pairs); "
        "it decides the encoder class and the losses a dataset may name"
    )
    max_seq_length: int | None = Field(default=None, ge=1, description="None: the model's own")
    trust_remote_code: bool = trust_remote_code_field()
    inference_free: bool = Field(
        default=False,
        description="sparse only: start an inference-free SPLADE Router from the model: queries by a "
        "SparseStaticEmbedding (one learned weight per token), documents by the MLM + SpladePooling.",
    )

    @model_validator(mode="after")
    def _inference_free_is_sparse(self) -> ModelConfig:
        if self.inference_free and self.kind != "sparse":
            invalid("inference_free", " applies to sparse models only")
        return self


class DatasetConfig(ConfigModel):
    name: str = Field(
        description="unique among the datasets; names the dataset in errors, the model card and (with several "
        "datasets) its <name>_loss metric"
    )
    path: str = Field(
        description="A parquet / jsonl / csv file, a folder of them, or a saved HF datasets folder; a local path or "
        "any URI pyarrow opens (s3://, gs://, abfs://, file://). The driver and every worker read it."
    )
    loss: LossSpec = Field(description="the loss this dataset's batches train with")
    format: Literal[tuple(FORMATS)] | None = Field(  # pyright: ignore[reportInvalidTypeForm]  (data/formats.py's names)
        default=None, description="None: from the file name"
    )
    columns: list[str] | None = Field(
        default=None, description="text columns in the loss's order; None: all but the label"
    )
    label_column: str | None = Field(
        default=None,
        description="the column of each row's label (a number, or a list of numbers), read by losses that take "
        "labels and grouped by under batch_sampler group_by_label; None: no labels",
    )
    prompts: str | dict[str, str] | None = Field(
        default=None,
        description="One prompt for every column, or one per column name; a cross-encoder takes one string, put "
        "before each pair's first text (the query)",
    )
    router_mapping: dict[str, str] = Field(
        default_factory=dict, description='Column name -> Router route ("query" / "document") for asymmetric models.'
    )
    weight: float = Field(default=1.0, description="share of batches under proportional multi-dataset sampling")

    @model_validator(mode="after")
    def _positive_weight_and_known_routes(self) -> DatasetConfig:
        if self.weight <= 0:
            invalid("weight", f" must be positive, got {self.weight}")
        if self.router_mapping and set(self.router_mapping.values()) - {"query", "document"}:
            invalid("router_mapping", " routes must be 'query' or 'document'")
        return self


class OptimizerConfig(ConfigModel):
    KEYS_ELSEWHERE: ClassVar[dict[str, str]] = _ST_ARGUMENTS
    name: Literal["adamw"] = Field(default="adamw", description="AdamW (torch's; fused on GPUs), the only one")
    learning_rate: float = Field(
        default=2e-5,
        description="the peak learning rate, which the schedule scales; learning_rate_mapping overrides it per "
        "parameter",
    )
    weight_decay: float = Field(
        default=0.01,
        description="AdamW's decoupled weight decay (0 or more), on weight matrices only: not on biases, norm "
        "weights or other 1-d parameters",
    )
    learning_rate_mapping: dict[str, float] = Field(
        default_factory=dict,
        description='Regex over parameter names -> learning rate (first match wins), e.g. {"^stack\\\\.1\\\\.": 1e-3}.',
    )
    max_grad_norm: float | None = Field(default=1.0, description="None: no clipping")

    @model_validator(mode="after")
    def _positive_rate_and_valid_regexes(self) -> OptimizerConfig:
        # A negative rate or clip norm trains uphill (clip_grad_norm_ scales by it), 0 not at all.
        if self.learning_rate <= 0:
            invalid("learning_rate", f" must be positive, got {self.learning_rate}")
        if self.weight_decay < 0:
            invalid("weight_decay", f" must be 0 or more, got {self.weight_decay}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            invalid("max_grad_norm", f" must be positive (or null for no clipping), got {self.max_grad_norm}")
        for pattern, rate in self.learning_rate_mapping.items():
            try:
                re.compile(pattern)
            except re.error as e:
                invalid("learning_rate_mapping", f": bad regex {pattern!r} ({e})")
            if rate <= 0:
                invalid("learning_rate_mapping", f": the rate of {pattern!r} must be positive, got {rate}")
        return self


class ScheduleConfig(ConfigModel):
    KEYS_ELSEWHERE: ClassVar[dict[str, str]] = _ST_ARGUMENTS
    name: Literal["linear", "cosine", "constant"] = Field(
        default="linear",
        description="the learning rate after warm-up: linear decay to 0, cosine decay to 0, or constant",
    )
    warmup_ratio: float = Field(
        default=0.1,
        description="share of the optimizer steps (rounded up) over which the learning rate rises linearly "
        "from 0, in [0, 1)",
    )

    @model_validator(mode="after")
    def _warmup_is_a_share(self) -> ScheduleConfig:
        if not 0 <= self.warmup_ratio < 1:
            invalid("warmup_ratio", f" must be in [0, 1), got {self.warmup_ratio}")
        return self


class TrainingConfig(ConfigModel):
    KEYS_ELSEWHERE: ClassVar[dict[str, str]] = _ST_ARGUMENTS
    batch_size: int = Field(
        default=32,
        description="rows per batch on each worker: a batch of batch_size x num_workers rows is drawn, then "
        "split among the workers",
    )
    epochs: int = Field(default=1, description="passes over the data; unused when max_steps is set")
    max_steps: int | None = Field(
        default=None,
        description="optimizer steps to train for, over as many epochs as they take; None: epochs decide",
    )
    gradient_accumulation_steps: int = Field(
        default=1, description="batches whose gradients are averaged into one optimizer step"
    )
    batch_sampler: Literal["no_duplicates", "group_by_label", "default"] = Field(
        default="no_duplicates",
        description="no_duplicates: no text twice in a batch (an in-batch negative never copies a positive); "
        "group_by_label: pairs of rows sharing a label (datasets[].label_column), for batch triplet losses; "
        "default: a plain shuffle",
    )
    multi_dataset_sampler: Literal["proportional", "round_robin"] = Field(
        default="proportional",
        description="with several datasets (each batch from one): proportional takes every batch of every "
        "dataset, in a random order weighted by batches left x weight; round_robin takes one of each in turn "
        "until the smallest runs out",
    )
    seed: int = Field(
        default=42,
        description="seeds Python's and torch's generators on the workers and the batch plan (seed + epoch "
        "in each epoch)",
    )
    bf16: bool = Field(
        default=False,
        description="matrix products in bfloat16 under autocast, on a GPU or a CPU with AMX/AVX-512 BF16 (elsewhere "
        "the run logs a warning and stays float32); weights, optimizer state, checkpoints and the saved model "
        "stay float32",
    )
    cpu_kernels: bool = Field(
        default=True,
        description="on a CPU: dropout masks drawn 16 bits at a time by numpy from a seed of torch's generator, "
        "and training-mode attention of transformers models by matrix products (raytrieve.train.cpu_kernels; "
        "1.13-1.25x the samples/s on 2 cores). False: torch's own dropout and attention (a GPU always uses those)",
    )

    @model_validator(mode="after")
    def _counts_at_least_one(self) -> TrainingConfig:
        for key in ("batch_size", "epochs", "gradient_accumulation_steps"):
            if getattr(self, key) < 1:
                invalid(key, f" must be at least 1, got {getattr(self, key)}")
        if self.max_steps is not None and self.max_steps < 1:
            invalid("max_steps", f" must be at least 1 (or null for epochs), got {self.max_steps}")
        return self


class EvalConfig(ConfigModel):
    path: str | None = Field(
        default=None,
        description="a local path or a URI, its format by its name; None: no evaluation (evaluator unused)",
    )
    evaluator: Literal["information_retrieval", "embedding_similarity", "reranking"] | None = Field(
        default=None,
        description="how eval.path is scored (required with it): information_retrieval (query, relevant "
        "document pairs), embedding_similarity (sentence pairs with a score) or reranking (query, positive, "
        "negatives, as texts or lists of texts; a listwise query, documents, labels; or query, document, label "
        "pairs grouped by query; a cross-encoder's only one)",
    )
    columns: list[str] | None = Field(
        default=None,
        description=(
            "the file's columns in the evaluator's order (information_retrieval: query, document; "
            "embedding_similarity: sentence1, sentence2, score; reranking: query, positive, negatives... (texts "
            "or lists of texts), query, documents, labels (listwise) or query, document, label (pairs); labels "
            "above 0 are relevant); None: its "
            "text columns, when their types or count tell the roles"
        ),
    )
    every_n_steps: int | None = Field(
        default=None, description="also evaluate every this many optimizer steps; None: at the end only"
    )

    @model_validator(mode="after")
    def _evaluator_with_path(self) -> EvalConfig:
        if self.path is not None and self.evaluator is None:
            invalid("evaluator", " is required when eval.path is set")
        if self.every_n_steps is not None and self.every_n_steps < 1:
            invalid("every_n_steps", f" must be at least 1 (or null: at the end only), got {self.every_n_steps}")
        return self


class CheckpointConfig(ConfigModel):
    every_n_steps: int | None = Field(default=None, description="None: only the final checkpoint")
    keep: int = Field(default=2, description="the newest checkpoints Ray Train keeps (at least 1)")
    dir: str | None = Field(
        default=None,
        description="Ray Train storage: a local or shared folder, or an object store's URI (s3://, gs://, ...); "
        "default: <output_dir>.checkpoints next to the model",
    )
    max_failures: int = Field(default=1, description="worker failures survived by restarting from the last checkpoint")

    @model_validator(mode="after")
    def _counts(self) -> CheckpointConfig:
        if self.every_n_steps is not None and self.every_n_steps < 1:
            invalid("every_n_steps", f" must be at least 1 (or null: the final one only), got {self.every_n_steps}")
        if self.keep < 1:
            invalid("keep", f" must be at least 1, got {self.keep}")
        if self.max_failures < 0:
            invalid("max_failures", f" must be 0 or more, got {self.max_failures}")
        return self


class ScalingConfig(ConfigModel):
    num_workers: int = Field(default=1, description="Ray Train workers: data-parallel ranks, one process each")
    use_gpu: bool = Field(
        default=False, description="a GPU per worker, NCCL between them; false: CPU workers with gloo"
    )
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="the Ray resources each worker asks for, e.g. {CPU: 4}; empty: 1 CPU (or 1 GPU with "
        "use_gpu), Ray Train's default",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK",
        description=(
            "How workers are placed on nodes: PACK fills a node first; STRICT_SPREAD puts each on its own node."
        ),
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="ddp: every worker holds the whole model (DistributedDataParallel); fsdp: the weights are "
        "sharded across the workers per transformer block (not with cached GradCache losses)",
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description=(
            "per worker; default: resources_per_worker.CPU when set, else the cluster's CPUs shared evenly among "
            "the workers (at most one node's): one worker on an embedded Ray gets the machine"
        ),
    )
    tokenizer_actors: int = Field(
        default=1, description="unused: training tokenizes in its read tasks (kept so configs still load)"
    )

    @model_validator(mode="after")
    def _counts_at_least_one(self) -> ScalingConfig:
        for key in ("num_workers", "tokenizer_actors"):
            if getattr(self, key) < 1:
                invalid(key, f" must be at least 1, got {getattr(self, key)}")
        return self


class MlflowConfig(ConfigModel):
    tracking_uri: str | None = Field(default=None, description="default: MLFLOW_TRACKING_URI, else ./mlruns")
    experiment: str = Field(
        default="raytrieve", description="the MLflow experiment the run is logged in (created when missing)"
    )
    run_name: str | None = Field(
        default=None,
        description="the MLflow run's name, and the model card's model name when register_model_as is unset; "
        "None: MLflow picks one",
    )
    tags: dict[str, str] = Field(
        default_factory=dict, description="tags set on the MLflow run (keys checked before training)"
    )
    register_model_as: str | None = Field(
        default=None,
        description="a registry name: letters, digits, '.', '_' and '-', at most 200 (checked before training)",
    )

    @model_validator(mode="after")
    def _names(self) -> MlflowConfig:
        # Found after training otherwise: MLflow refuses the name only when the run registers it.
        name = self.register_model_as
        if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}", name):
            invalid(
                "register_model_as",
                f" {name!r}: use letters, digits, '.', '_' and '-' (starting with a letter or digit), at most 200",
            )
        if not self.experiment.strip():
            invalid("experiment", ": empty; name the MLflow experiment")
        return self


class TrainConfig(ConfigModel):
    KEYS_ELSEWHERE: ClassVar[dict[str, str]] = _ST_ARGUMENTS
    model: ModelConfig = Field(description="the model to fine-tune")
    datasets: list[DatasetConfig] = Field(
        description="the training data, one or more; each batch comes from one dataset and trains with its loss"
    )
    output_dir: str = Field(
        description="the folder the trained model is saved to: a path on local or shared disk, or a folder URI "
        "(s3://...)"
    )
    prompts: str | dict[str, str] | None = Field(
        default=None,
        description="Prompts for every dataset that sets none: one string for all columns, or per column name; a "
        "cross-encoder takes one string, put before each pair's first text (the query)",
    )
    training: TrainingConfig = Field(
        default_factory=TrainingConfig,
        description="batch size and sampling, epochs or steps, seed and precision",
    )
    optimizer: OptimizerConfig = Field(
        default_factory=OptimizerConfig, description="AdamW: learning rates, weight decay, gradient clipping"
    )
    schedule: ScheduleConfig = Field(
        default_factory=ScheduleConfig, description="the learning rate over the run's optimizer steps"
    )
    eval: EvalConfig = Field(
        default_factory=EvalConfig, description="evaluation on a held-out file, during and after training"
    )
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig,
        description="Ray Train checkpoints: how often, how many, where, and restarts after a worker failure",
    )
    scaling: ScalingConfig = Field(
        default_factory=ScalingConfig,
        description="Ray Train's workers: how many, their resources, placement, threads and the parallel strategy",
    )
    mlflow: MlflowConfig = Field(
        default_factory=MlflowConfig,
        description="the MLflow run that tracks training, and the registry name of the trained model",
    )

    @model_validator(mode="after")
    def _datasets_named_once(self) -> TrainConfig:
        if not self.output_dir.strip():
            invalid("output_dir", ": empty; name the folder the trained model is saved to")
        if self.model.kind == "cross" and self.eval.evaluator not in (None, "reranking"):
            invalid(
                "eval.evaluator",
                f" {self.eval.evaluator!r} needs embeddings; a cross-encoder is evaluated by reranking",
            )
        if not self.datasets:
            invalid("datasets", ": give at least one dataset")
        if self.model.kind == "cross":
            # A cross-encoder's columns are joined into pairs: one prompt goes before each pair's
            # first text, as sentence-transformers' CrossEncoder puts it; per-column ones mean nothing.
            per_column = ["prompts"] * isinstance(self.prompts, dict) + [
                f"datasets[{i}].prompts" for i, d in enumerate(self.datasets) if isinstance(d.prompts, dict)
            ]
            if per_column:
                invalid(
                    per_column[0],
                    ": a cross-encoder takes one prompt string, put before each pair's first text (the query); "
                    "its columns are joined into pairs, so per-column prompts do not apply. Give one string, "
                    "e.g. prompts: 'query: ' (or datasets[i].prompts for one dataset's)",
                )
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            invalid("datasets", f": dataset names must be unique, got {names}")
        return self


def check_values(cfg: TrainConfig, where: str = "config") -> TrainConfig:
    """Validate a config built or changed in Python again (the validators run on every load)."""
    return cfg.check(where)


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    return load_yaml(TrainConfig, path, overrides)
