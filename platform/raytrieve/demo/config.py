"""The demo's settings: how much data, which models, how long to fine-tune, where it writes.

Loaded from ``jobs/configs/demo.yaml`` (what ``make demo`` runs). Every size is here, so the
reduced demo in tests/test_demo.py runs the very same code with smaller numbers.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from raytrieve.config import ConfigModel, LocalPath, invalid, load_yaml


class SampleConfig(ConfigModel):
    """Which rows of the data the demo uses (drawn with ``seed``, reproducibly). The defaults are
    jobs/configs/demo.yaml's: about 13 minutes on 2 CPU cores with the pydocs set. With a BEIR
    folder (``beir``) each is a cap: train pairs of the train split, queries of the dev and test
    splits, and each split's corpus (its queries' relevant documents, then others of the corpus)."""

    train_pairs: int = Field(
        default=1536, description="fine-tuning pairs from the train packages (BEIR: of the train split, at most)"
    )
    dev_queries: int = Field(
        default=200,
        description="pairs of the dev packages, never trained on nor tested (BEIR: dev-split queries): "
        "where /search is fitted, and an in-process evaluation",
    )
    dev_corpus: int = Field(
        default=600,
        description="their documents plus other documents of the dev packages (BEIR: plus others of the corpus)",
    )
    test_queries: int = Field(
        default=150, description="queries of the test packages or split (never seen in training), asked over HTTP"
    )
    test_corpus: int = Field(
        default=1000,
        description="test documents in the served index: every test query's relevant ones, plus others",
    )
    seed: int = Field(default=0, description="seeds every draw of the samples")


class ModelsConfig(ConfigModel):
    dense: str = Field(
        default="all-minilm-l6-v2",
        description="the pretrained dense model (a models/ variant, a folder or a model URI): evaluated, served "
        "and fine-tuned",
    )
    sparse: str = Field(
        default="splade-tiny",
        description="the pretrained sparse model (a models/ variant, a folder or a model URI): evaluated, served "
        "and fine-tuned",
    )
    reranker: str = Field(
        default="ms-marco-minilm-l12-v2",
        description="the pretrained cross-encoder (a models/ variant, a folder or a model URI) that reranks "
        "/search's candidates, and the start of reranker_training",
    )
    max_seq_length: int = Field(
        default=128, description="the retrievers' documents and queries, and every model's training"
    )
    reranker_max_seq_length: int = Field(
        default=256,
        description=(
            "the served reranker's (query and document together; its training stays at max_seq_length): "
            "at 128 it sees too little of a docstring (benchmarks/rerank_weight.py)"
        ),
    )


class FineTuneConfig(ConfigModel):
    """The demo's sizes and rate, set over the shipped training config (``configs``)."""

    enabled: bool = Field(
        default=True, description="false: no fine-tuning (nor mining, for the reranker); the pretrained model stays"
    )
    batch_size: int = Field(
        default=32, description="training.batch_size, set over the shipped config's (at least 2: in-batch negatives)"
    )
    epochs: int = Field(default=1, description="training.epochs, set over the shipped config's")
    max_steps: int | None = Field(
        default=None, description="training.max_steps, set over the shipped config's; None: epochs decide"
    )
    learning_rate: float = Field(
        default=2e-5,
        description=(
            "set over the shipped config's; the demo's defaults are the rates its results were measured with: "
            "1e-4 dense, 5e-5 sparse and reranker"
        ),
    )
    bf16: bool = Field(
        default=True,
        description="training.bf16: matrix products in bfloat16 where the CPU or GPU has it (about 2x the steps)",
    )
    register_as: str = Field(
        default="", description="the MLflow registry name Serve loads the model from (models:/NAME/VERSION)"
    )


class ServingConfig(ConfigModel):
    port: int = Field(default=8100, description="the port of the demo's Serve app (the serve config's port)")
    rerank_depth: int = Field(default=10, description="hybrid candidates the cross-encoder rescores per query")
    recall: int = Field(default=100, description="candidates per retriever (and the depth of Recall@k)")
    clients: int = Field(default=4, description="concurrent HTTP clients sending the test queries")
    torch_threads: int = Field(default=2, ge=1, description="per model replica; requests come one stage at a time")


class FusionFitConfig(ConfigModel):
    """Fitting /search's settings on the dev split (serve/tuning.py) before each phase is served."""

    enabled: bool = Field(default=True, description="false: the test queries use the serve config's search: as is")
    rerank_queries: int = Field(
        default=100,
        ge=0,
        description=(
            "dev queries whose top candidates the cross-encoder scores to pick the rerank depth and weight (0: none)"
        ),
    )
    rerank_depths: list[int] = Field(
        default=[5, 10],
        description=(
            "rerank depths tried, beside none; every test query is also reranked at the best one, so each "
            "deeper one costs the demo minutes (20 gained +0.002 over 10 on dev at most, 2026-12-02)"
        ),
    )


class ShippedConfigs(ConfigModel):
    """The shipped configs each phase runs, loaded the way users load them; the demo sets only its
    paths, sizes, models, port and MLflow names on top (saved with them in <out_dir>/configs/)."""

    dir: str | None = Field(
        default=None, description="where the file names below are; default: ./jobs/configs, else the checkout's"
    )
    dense_training: str = Field(default="dense_mnrl.yaml", description="fine-tuning the dense model")
    sparse_training: str = Field(default="splade.yaml", description="fine-tuning the sparse model")
    mine: str = Field(default="mine_pydocs.yaml", description="mining hard negatives for the reranker")
    reranker_training: str = Field(default="cross_mined.yaml", description="fine-tuning the reranker on them")
    encode: str = Field(default="encode_pydocs.yaml", description="the encoding job over the test corpus")
    serve: str = Field(default="serve_pydocs.yaml", description="the Serve app the test queries go to")

    def path(self, key: str) -> Path:
        """The file ``key`` names, absolute: relative to ``dir``; without one, ./jobs/configs where
        the file is there (a Ray job's working_dir, the image's /app), else the checkout's."""
        name = Path(getattr(self, key)).expanduser()
        if self.dir is not None:
            return (Path(self.dir).expanduser() / name).resolve()
        here, checkout = Path.cwd() / "jobs" / "configs", Path(__file__).resolve().parents[3] / "jobs" / "configs"
        return next((d for d in (here, checkout) if (d / name).exists()), here).joinpath(name).resolve()


class BeirData(ConfigModel):
    """A BEIR folder of your own instead of the pydocs set: corpus.jsonl, queries.jsonl and one
    qrels/<split>.tsv per split. The demo fine-tunes on the train split's judged pairs, fits
    /search's settings on dev and reports test; ``sample`` caps each (a random draw with its seed)."""

    path: str = Field(description="the BEIR folder")
    train_split: str = Field(
        default="train", description="the split (qrels/<name>.tsv) whose judged pairs the models are fine-tuned on"
    )
    dev_split: str | None = Field(
        default=None,
        description=(
            "held out from training, for the fit of /search's settings; None: qrels/dev.tsv if the folder has "
            "it, else queries of the train split held out (sample.dev_queries, at most a quarter of them)"
        ),
    )
    test_split: str = Field(
        default="test",
        description="the split the report's test figures come from, asked over HTTP; it shares no query with "
        "train or dev",
    )


class DemoConfig(ConfigModel):
    out_dir: LocalPath = Field(
        default="out/demo",
        description="where the demo writes its samples, models, vectors, each phase's configs, step records "
        "(stages/, which a rerun reuses), the report and, by default, the MLflow store",
    )
    pydocs_dir: LocalPath = Field(
        default="data/pydocs", description="built by the demo when missing (raytrieve data build-pydocs)"
    )
    beir: BeirData | None = Field(default=None, description="your own data in BEIR's layout; None: the pydocs set")
    sample: SampleConfig = Field(
        default_factory=SampleConfig,
        description="how much of the data the demo uses (with beir: caps on each split), drawn with its seed",
    )
    models: ModelsConfig = Field(
        default_factory=ModelsConfig, description="the pretrained models the demo starts from, and their lengths"
    )
    dense_training: FineTuneConfig = Field(
        default_factory=lambda: FineTuneConfig(learning_rate=1e-4, register_as="demo-pydocs-dense"),
        description="the dense model fine-tuned on the train pairs (configs.dense_training)",
    )
    sparse_training: FineTuneConfig = Field(
        default_factory=lambda: FineTuneConfig(learning_rate=5e-5, register_as="demo-pydocs-sparse"),
        description="the sparse model fine-tuned on the train pairs (configs.sparse_training)",
    )
    reranker_training: FineTuneConfig = Field(
        default_factory=lambda: FineTuneConfig(
            batch_size=16, max_steps=24, learning_rate=5e-5, register_as="demo-pydocs-reranker"
        ),
        description=(
            "the cross-encoder fine-tuned on hard negatives the fine-tuned dense model mines from the train pairs "
            "(configs.mine, configs.reranker_training)"
        ),
    )
    serving: ServingConfig = Field(
        default_factory=ServingConfig,
        description="the Serve app the test queries go to (configs.serve), and the clients that send them",
    )
    fusion_fit: FusionFitConfig = Field(
        default_factory=FusionFitConfig,
        description="fitting /search's recall, fusion and rerank on the dev split before each phase is served",
    )
    configs: ShippedConfigs = Field(
        default_factory=ShippedConfigs,
        description=(
            "the shipped config each phase runs, with the demo's paths, sizes, models, port and MLflow names "
            "on top; what each phase ran is saved in <out_dir>/configs/"
        ),
    )
    mlflow_tracking_uri: str | None = Field(default=None, description="default: <out_dir>/mlruns (a local file store)")
    num_cpus: int | None = Field(default=None, description="the embedded Ray's CPUs; None: all of this machine's")

    @property
    def out(self) -> Path:
        return Path(self.out_dir).expanduser().resolve()

    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or (self.out / "mlruns").as_uri()

    @model_validator(mode="after")
    def _rules(self) -> DemoConfig:
        s = self.sample
        for key, value in (
            ("sample.train_pairs", s.train_pairs),
            ("sample.dev_queries", s.dev_queries),
            ("sample.test_queries", s.test_queries),
            ("serving.rerank_depth", self.serving.rerank_depth),
            ("serving.recall", self.serving.recall),
            ("serving.clients", self.serving.clients),
            ("models.max_seq_length", self.models.max_seq_length),
            ("models.reranker_max_seq_length", self.models.reranker_max_seq_length),
        ):
            if value < 1:
                invalid(f"{key}", f" must be >= 1, got {value}")
        if s.dev_corpus < s.dev_queries:
            invalid("sample.dev_corpus", f" ({s.dev_corpus}) must be >= sample.dev_queries ({s.dev_queries})")
        if s.test_corpus < s.test_queries:
            invalid(
                "sample.test_corpus",
                f" ({s.test_corpus}) must be >= sample.test_queries ({s.test_queries}): "
                "every test query's document is in the corpus",
            )
        if self.serving.recall > 1000:
            invalid("serving.recall", f": at most 1000 (the Serve limit), got {self.serving.recall}")
        for key in ("dense_training", "sparse_training", "reranker_training"):
            ft = getattr(self, key)
            if ft.enabled and not ft.register_as:
                invalid(f"{key}.register_as", ": name the MLflow registered model Serve loads")
            if ft.batch_size < 2:
                invalid(f"{key}.batch_size", f" must be >= 2 (in-batch negatives), got {ft.batch_size}")
        return self


def load_demo_config(path: str | Path, overrides: list[str] | None = None) -> DemoConfig:
    return load_yaml(DemoConfig, path, overrides)
