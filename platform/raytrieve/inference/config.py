"""Configs of the batch jobs: corpus encoding and hard-negative mining. YAML maps onto these
pydantic models (unknown keys are errors that name the key); every value is checked before any
cluster work starts.

    cfg = load_encode_config("jobs/configs/encode_pydocs.yaml", ["output_dir=/data/vectors"])
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raytrieve.config import ConfigModel, Dtype, LocalPath, dtype_field, invalid, load_yaml, trust_remote_code_field
from raytrieve.data.formats import FORMATS


class CorpusConfig(ConfigModel):
    path: str = Field(
        description=(
            "A parquet / jsonl / csv file, a folder or glob of them, or a saved HF datasets folder; a local "
            "path or any URI pyarrow opens (s3://, gs://, abfs://, file://). The workers read it."
        )
    )
    format: Literal[tuple(FORMATS)] | None = Field(  # pyright: ignore[reportInvalidTypeForm]  (data/formats.py's names)
        default=None, description="None: from the file name"
    )
    id_column: str = Field(
        default="id", description="the column of document ids: strings, or integers (stored as strings)"
    )
    text_column: str = Field(default="text", description="the column of document texts (strings)")
    title_column: str | None = Field(
        default=None,
        description="prepended to the text with title_separator when given; a blank text leaves the title alone",
    )
    title_separator: str = Field(default=" ", description="what joins a title and its text (title, separator, text)")


class EncoderOutputConfig(ConfigModel):
    model: str = Field(
        description="a models/ variant, a local folder, a folder URI (s3://...), or models:/NAME/VERSION"
    )
    prompt: str | None = Field(default=None, description="a literal prompt; default: the model's prompt for `side`")
    prompt_name: str | None = Field(
        default=None,
        description="one of the model's named prompts (config_sentence_transformers.json) instead of the one for "
        "`side`; not with prompt",
    )
    max_seq_length: int | None = Field(default=None, description="tokens a text is cut at; None: the model's own")
    trust_remote_code: bool = trust_remote_code_field()
    dtype: Dtype = dtype_field()


class DenseOutputConfig(EncoderOutputConfig):
    precision: Literal["float32", "float16", "int8", "binary"] = Field(
        default="float32",
        description=(
            "float16 halves the shards; int8 uses per-dimension ranges from calibration_rows evenly spaced "
            "texts; binary packs sign bits (8 dimensions a byte, uint8)."
        ),
    )
    truncate_dim: int | None = Field(default=None, description="Matryoshka: keep the first dimensions")
    normalize: bool | None = Field(default=None, description="None: L2-normalize when the model's similarity is cosine")
    calibration_rows: int = Field(
        default=1000,
        description="precision int8 only: texts sampled evenly from up to 8 evenly spaced shards to calibrate "
        "the ranges (at least 2)",
    )


class SparseOutputConfig(EncoderOutputConfig):
    max_active_dims: int | None = Field(default=None, description="keep the largest weights of each vector")


class EncodeComputeConfig(ConfigModel):
    tokenize_actors: int = Field(
        default=1,
        description="Ray Data actors (half a CPU each) that read shards, leave out bad rows and tokenize",
    )
    encode_actors: int | None = Field(
        default=None,
        description=(
            "default: as many as the cluster's CPUs hold beside the tokenizer actors (one per GPU on GPUs), "
            "at most one per shard"
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto: a GPU per encode actor when the cluster has GPUs"
    )
    cpus_per_encode_actor: float = Field(
        default=1.0,
        description="Ray CPUs each encode actor takes; its torch threads default to this, rounded down (raise "
        "it to trade actors for threads)",
    )
    torch_threads: int | None = Field(
        default=None, ge=1, description="per encode actor; default: its CPU share, at least 1"
    )
    token_budget: int = Field(
        default=2048,
        description=(
            "Padded tokens per forward pass (rows x longest row). Small batches are fastest on CPU "
            "(cache-resident activations; SPLADE's [tokens, vocab] logits are 30k floats a token); on a GPU "
            "raise it to 16k-64k."
        ),
    )
    max_batch_size: int = Field(default=256, description="rows per forward pass, whatever the budget")


class EncodeConfig(ConfigModel):
    corpus: CorpusConfig = Field(description="the documents to encode")
    output_dir: str = Field(
        description="the folder the workers write the shards and the manifest to: a path on local or shared disk, "
        "or a folder URI (s3://...)"
    )
    dense: DenseOutputConfig | None = Field(
        default=None, description="write dense vectors with this model; set dense:, sparse: or both"
    )
    sparse: SparseOutputConfig | None = Field(
        default=None, description="write sparse vectors with this model; set dense:, sparse: or both"
    )
    side: Literal["document", "query"] = Field(default="document", description="which prompt and Router route to apply")
    rows_per_shard: int = Field(
        default=10000,
        description="rows per shard: the unit the workers read, encode and write, and a rerun reuses (jsonl and "
        "csv: about this many lines, cut by bytes)",
    )
    bad_rows: Literal["skip", "fail"] = Field(
        default="skip", description="null text, empty text (and title), null or duplicate id"
    )
    check_duplicate_ids: bool = Field(
        default=True,
        description=(
            "Duplicate ids across the whole corpus, found by a distributed group-by on the workers (one "
            "shuffle of the id column). Turn off only for a corpus whose ids are known unique."
        ),
    )
    compute: EncodeComputeConfig = Field(
        default_factory=EncodeComputeConfig, description="the job's actors, threads, device and batches"
    )

    @model_validator(mode="after")
    def _rules(self) -> EncodeConfig:
        if self.dense is None and self.sparse is None:
            invalid("", ": set dense:, sparse: or both (each with at least model:)")
        if self.rows_per_shard < 1:
            invalid("rows_per_shard", f" must be >= 1, got {self.rows_per_shard}")
        c = self.compute
        for name in ("tokenize_actors", "encode_actors", "token_budget", "max_batch_size"):
            if getattr(c, name) is not None and getattr(c, name) < 1:
                invalid(f"compute.{name}", f" must be >= 1, got {getattr(c, name)}")
        if c.cpus_per_encode_actor <= 0:
            invalid("compute.cpus_per_encode_actor", " must be > 0")
        if self.dense is not None:
            if self.dense.truncate_dim is not None and self.dense.truncate_dim < 1:
                invalid("dense.truncate_dim", f" must be >= 1, got {self.dense.truncate_dim}")
            if self.dense.precision == "int8" and self.dense.calibration_rows < 2:
                invalid("dense.calibration_rows", " must be >= 2 for int8")
        if self.sparse is not None and self.sparse.max_active_dims is not None and self.sparse.max_active_dims < 1:
            invalid(
                "sparse.max_active_dims", f" must be >= 1 (or null: every weight), got {self.sparse.max_active_dims}"
            )
        for name, out in (("dense", self.dense), ("sparse", self.sparse)):
            if out is not None and out.prompt is not None and out.prompt_name is not None:
                invalid(f"{name}", ": set prompt or prompt_name, not both")
            if out is not None and out.max_seq_length is not None and out.max_seq_length < 1:
                invalid(f"{name}.max_seq_length", " must be >= 1")
        return self


def load_encode_config(path: str, overrides: list[str] | None = None) -> EncodeConfig:
    return load_yaml(EncodeConfig, path, overrides)


# -- hard-negative mining ----------------------------------------------------------------------


class PairsConfig(ConfigModel):
    path: str = Field(
        description="(query, positive) pairs: parquet / jsonl / csv / HF datasets dir; a local path or a URI"
    )
    format: Literal[tuple(FORMATS)] | None = Field(  # pyright: ignore[reportInvalidTypeForm]  (data/formats.py's names)
        default=None, description="None: from the file name"
    )
    query_column: str = Field(default="query", description="the column of queries")
    positive_column: str = Field(default="positive", description="the column of each query's relevant text")


class RetrieverConfig(ConfigModel):
    model: str = Field(description="the dense or sparse model that retrieves candidates")
    kind: Literal["dense", "sparse"] = Field(
        default="dense", description="the retriever model's kind: whether dense or sparse vectors are searched"
    )
    max_seq_length: int | None = Field(
        default=None,
        description="tokens a query, positive or document is cut at; None: the model's own (corpus_vectors must "
        "have been encoded at the same)",
    )
    dtype: Dtype = dtype_field()
    batch_size: int = Field(default=64, description="queries and positives are encoded on the driver")
    trust_remote_code: bool = trust_remote_code_field()


class RerankerConfig(ConfigModel):
    model: str = Field(description="a cross-encoder: candidates are rescored, and the filters use its scores")
    max_seq_length: int | None = Field(
        default=None, description="tokens a (query, document) pair is cut at; None: the model's own"
    )
    dtype: Dtype = dtype_field()
    batch_size: int = Field(
        default=32, description="pairs per forward pass (with token_budget: the most rows a pass takes)"
    )
    token_budget: int | None = Field(
        default=None,
        description=(
            "padded tokens per forward pass (rows x longest pair, pairs sorted by length); batch_size then "
            "only caps the rows. Default: batches of batch_size pairs"
        ),
    )
    actors: int = Field(default=1, description="Ray Data actor pool that scores (query, candidate) pairs")
    cpus_per_actor: float = Field(
        default=1.0, description="Ray CPUs per scoring actor; its torch threads: this rounded down, at least 1"
    )


class SelectionConfig(ConfigModel):
    num_negatives: int = Field(
        default=3,
        description="negatives per pair, at most (fewer when fewer candidates pass the filters); the n-tuple "
        "formats leave out a pair with fewer",
    )
    range_min: int = Field(default=0, description="skip the best range_min candidates (likely unlabeled positives)")
    range_max: int = Field(default=50, description="look at the best range_max candidates only")
    absolute_margin: float | None = Field(default=None, description="keep if score <= positive_score - margin")
    relative_margin: float | None = Field(default=None, description="keep if score <= positive_score * (1 - margin)")
    max_score: float | None = Field(
        default=None,
        description="keep if score <= max_score (the reranker's score when there is one, else the retriever's); "
        "None: no bound",
    )
    min_score: float | None = Field(
        default=None,
        description="keep if score >= min_score (the reranker's score when there is one, else the retriever's); "
        "None: no bound",
    )
    sampling_strategy: Literal["top", "random"] = Field(
        default="top",
        description="top: the best-scored candidates that pass the filters; random: num_negatives of them drawn "
        "with seed",
    )
    seed: int = Field(default=0, description="seeds sampling_strategy random's draws")


class MineConfig(ConfigModel):
    pairs: PairsConfig = Field(description="the (query, positive) pairs to mine negatives for")
    retriever: RetrieverConfig = Field(description="the model that retrieves each query's candidates")
    output_path: LocalPath = Field(description="a parquet file")
    output_format: Literal["triplet", "n-tuple", "n-tuple-scores", "labeled-list"] = Field(
        default="triplet",
        description="triplet: a (query, positive, negative) row per negative; n-tuple: a row per pair with "
        "negative_1..N; n-tuple-scores: that plus score (the positive's, then each negative's); labeled-list: "
        "query, documents (the positive first) and labels (1, then 0s)",
    )
    corpus: CorpusConfig | None = Field(default=None, description="None: the distinct positives are the corpus")
    corpus_vectors: str | None = Field(
        default=None,
        description=(
            "An encoding job's output for this corpus made with the retriever model; default: the corpus is "
            "encoded by the encoding job into <output_path>.work/vectors (resumable; encoded again when the retriever "
            "settings or the corpus change)."
        ),
    )
    reranker: RerankerConfig | None = Field(
        default=None,
        description="a cross-encoder that rescores the candidates and positives; None: the retriever's scores "
        "order and filter them",
    )
    selection: SelectionConfig = Field(
        default_factory=SelectionConfig, description="which candidates become a pair's negatives"
    )
    compute: EncodeComputeConfig = Field(
        default_factory=EncodeComputeConfig,
        description="the corpus encoding job's compute (as the encoding job's compute:); unused with corpus_vectors",
    )

    @model_validator(mode="after")
    def _rules(self) -> MineConfig:
        s = self.selection
        if s.num_negatives < 1:
            invalid("selection.num_negatives", f" must be >= 1, got {s.num_negatives}")
        if not 0 <= s.range_min < s.range_max:
            invalid("selection", f": need 0 <= range_min < range_max, got {s.range_min}, {s.range_max}")
        for name in ("absolute_margin", "relative_margin"):
            value = getattr(s, name)
            if value is not None and value < 0:
                invalid(f"selection.{name}", f" must be >= 0, got {value}")
        if s.relative_margin is not None and s.relative_margin >= 1:
            invalid("selection.relative_margin", " must be < 1 (a share of the positive's score)")
        if s.max_score is not None and s.min_score is not None and s.min_score > s.max_score:
            invalid("selection", f": min_score {s.min_score} > max_score {s.max_score}")
        if self.retriever.batch_size < 1 or (self.reranker and self.reranker.batch_size < 1):
            invalid("", ": batch_size must be >= 1")
        if self.reranker and self.reranker.token_budget is not None and self.reranker.token_budget < 1:
            invalid("reranker.token_budget", f" must be >= 1, got {self.reranker.token_budget}")
        if not self.output_path.endswith(".parquet"):
            invalid("output_path", f" must name a .parquet file, got {self.output_path!r}")
        return self


def load_mine_config(path: str, overrides: list[str] | None = None) -> MineConfig:
    return load_yaml(MineConfig, path, overrides)
