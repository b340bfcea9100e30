"""Rankings per stage: each first stage (dense, sparse) searches an index, fusion combines
them, a cross-encoder reranks the fused head.

Fusion and rerank replay /search (serve/tuning.py's ``fused`` and ``reranked``, over
serve/fusion.py's methods): the fused top ``rerank_depth`` ordered by the cross-encoder's score
(ties keep the fused order), the rest of the fused list after them in fused order, so Recall@k
of the reranked stage counts the same pool. One first stage alone is not fused: its own list is
what gets reranked.

Where the first stages search:
- in process (``in_process_lists``): the encoders from ``load_encoder`` encode the corpus and
  the queries, and exact in-memory indices (raytrieve.index) search; no Ray;
- an index folder (``index_lists``): what ``raytrieve index build`` wrote, searched with the
  query side of the models that encoded it; ``encode_corpus`` makes one with the encoding job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from raytrieve.config import from_dict
from raytrieve.errors import ConfigError, DataError
from raytrieve.evaluate.data import EvalSet
from raytrieve.serve import tuning
from raytrieve.serve.schemas import Fusion

log = logging.getLogger("raytrieve.evaluate")

Ranked = list[tuple[str, float]]
Lists = dict[str, dict[str, Ranked]]  # stage -> query id -> best-first (doc id, score)
# stage -> side ("documents", "queries", "pairs") -> the dtypes that side computed in: what
# ``dtype: auto`` resolved to, and an index's vectors' own (its encoding job's actors chose them)
DtypesUsed = dict[str, dict[str, list[str]]]
Rankings = dict[str, dict[str, list[str]]]  # stage -> query id -> best-first doc ids
FUSED, RERANKED = "fused", "reranked"
TUNED = "tuned"  # /search with the setting fitted on another split (evaluate/tune.py)
# The tuned setting with the tuning split's best rerank when the fit did not adopt it (tune.py)
TUNED_RERANK = "tuned+rerank"


@dataclass(frozen=True)
class FirstStage:
    name: str  # the stage's name in the report: its kind, or "kind:model" when a kind has several
    kind: str  # "dense" | "sparse"
    model: str  # a model reference (variant, folder, MLflow URI)


@dataclass
class Models:
    dense: list[str] = field(default_factory=list)
    sparse: list[str] = field(default_factory=list)
    reranker: str | None = None

    def first_stages(self) -> list[FirstStage]:
        from raytrieve.model_ref import is_model_uri

        out: list[FirstStage] = []
        for kind, refs in (("dense", self.dense), ("sparse", self.sparse)):
            # A folder by its name (a store URI's bucket and path, without its keys), and by as many
            # folders above it as tell the kind's models apart (training saves every model in a
            # folder named "model": out/splade/model, out/router/model).
            parts = [_name_parts(ref) if not is_model_uri(ref) else (ref,) for ref in refs]
            distinct, depth = list(dict.fromkeys(parts)), 1
            for depth in range(1, max((len(p) for p in distinct), default=1) + 1):
                if len({p[-depth:] for p in distinct}) == len(distinct):
                    break
            for i, (ref, label) in enumerate(zip(refs, ("/".join(p[-depth:]) for p in parts))):
                name = kind if len(refs) == 1 else f"{kind}:{label}"
                if any(s.name == name for s in out):  # the same model given twice
                    name = f"{name}#{i + 1}"
                out.append(FirstStage(name, kind, ref))
        return out


def _name_parts(ref: str) -> tuple[str, ...]:
    """A folder's path parts, a store URI's bucket (its host, less any keys) and path parts."""
    from raytrieve.model_ref import is_store_uri

    if not is_store_uri(ref):
        return Path(ref).parts or (ref,)
    url = urlparse(ref)
    return (url.netloc.rpartition("@")[2], *(p for p in Path(url.path).parts if p != "/"))


def planned_stages(models: Models, tuned: bool) -> list[str]:
    """The stages a run of ``models`` in process (or through the encoding job) reports, known
    before any model loads: ``combine``'s, and the fitted /search's with ``--tune-on``."""
    first = [s.name for s in models.first_stages()]
    return (
        first
        + ([FUSED] if len(first) > 1 else [])
        + ([RERANKED] if models.reranker else [])
        + ([TUNED] if tuned else [])
    )


@dataclass
class RunOptions:
    depth: int = 100  # candidates from each first stage (Serve's recall size)
    fusion: Fusion = field(default_factory=Fusion)
    rerank_depth: int = 50
    batch_size: int = 32
    token_budget: int | None = None  # the reranker's padded tokens per batch (None: batch_size pairs)
    max_seq_length: int | None = None
    reranker_max_seq_length: int | None = None  # None: max_seq_length
    dtype: str = "float32"

    @property
    def reranker_length(self) -> int | None:
        """The reranker's truncation (query and document together); None: the model's own."""
        return self.reranker_max_seq_length or self.max_seq_length


# -- fusion and rerank: what /search does with the first stages' lists ------------------------


def fusion_setting(names: Sequence[str], kinds: Mapping[str, str], options: RunOptions) -> tuning.Setting:
    """The /search setting that fuses these first stages: each list at ``depth``, and for convex
    fusion each list weighed by its kind's weight (dense_weight, sparse_weight)."""
    params = options.fusion.model_dump()
    for name in names:
        params[f"{name}_weight"] = params[f"{kinds[name]}_weight"]
    return tuning.Setting({name: options.depth for name in names}, params)


def combine(
    lists: Lists,
    kinds: Mapping[str, str],
    options: RunOptions,
    queries: Mapping[str, str],
    corpus: Mapping[str, str],
    score_pairs: Callable[[list[tuple[str, str]]], Sequence[float]] | None,
) -> Rankings:
    """Every stage's rankings: the first stages', fused (with two or more), reranked (with a reranker)."""
    rankings: Rankings = {
        name: {q: [d for d, _ in ranked] for q, ranked in per_q.items()} for name, per_q in lists.items()
    }
    qids = sorted(queries)
    # /search's own replay (serve/tuning.py): a single list stands alone, two or more are fused.
    setting = fusion_setting(list(lists), kinds, options)
    pool = {q: tuning.fused({n: lists[n][q] for n in lists}, setting) for q in qids}
    if len(lists) > 1:
        rankings[FUSED] = pool
    if score_pairs is not None:
        started = time.perf_counter()
        depth = options.rerank_depth
        pairs = [(q, d) for q in qids for d in pool[q][:depth]]
        log.info("reranking %d pairs (%d queries, up to %d candidates each)", len(pairs), len(qids), depth)
        # One call: the model sorts every pair by length, so batches pad little.
        scores = score_pairs([(queries[q], corpus[d]) for q, d in pairs])
        by_query: dict[str, dict[str, float]] = {q: {} for q in qids}
        for (q, d), score in zip(pairs, scores):
            by_query[q][d] = float(score)
        reranked = {q: tuning.reranked(pool[q], by_query[q], depth) for q in qids}
        rankings[RERANKED] = reranked
        log.info("reranked %d pairs in %.1fs", len(pairs), time.perf_counter() - started)
    return rankings


def cross_encoder(
    model: str, options: RunOptions, dtypes: DtypesUsed | None = None
) -> Callable[[list[tuple[str, str]]], Sequence[float]]:
    from raytrieve.encoders import load_encoder

    encoder = load_encoder("cross", model, max_seq_length=options.reranker_length, dtype=options.dtype)
    if dtypes is not None:
        dtypes[RERANKED] = {"pairs": [encoder.dtype]}

    def score(pairs: list[tuple[str, str]]) -> Sequence[float]:
        scores = encoder.predict(
            pairs, batch_size=options.batch_size, token_budget=options.token_budget, show_progress_bar=_bars()
        )
        return scores.tolist()

    return score


# -- first stages ------------------------------------------------------------------------------


def _bars() -> bool | None:
    """The encoders' own progress bars on a terminal (their default: from 20 batches on); in a log
    file the stages' start and end lines say what runs instead of a flood of redrawn bars."""
    from raytrieve.progress import interactive

    return None if interactive() else False


def _hits(result: Any) -> list[Ranked]:
    return [list(zip(ids, scores[: len(ids)].tolist())) for ids, scores in zip(result.ids, result.scores)]


def _encode_queries(
    encoder: Any, kind: str, texts: list[str], options: RunOptions, truncate_dim: int | None = None
) -> Any:
    if kind == "dense":
        extra = {"truncate_dim": truncate_dim} if truncate_dim else {}
        return encoder.encode_query(texts, batch_size=options.batch_size, show_progress_bar=_bars(), **extra)
    return encoder.encode_query(texts, batch_size=options.batch_size, show_progress_bar=_bars(), as_dicts=True)


def in_process_lists(
    evalset: EvalSet, stages: Sequence[FirstStage], options: RunOptions, dtypes: DtypesUsed | None = None
) -> Lists:
    """Each first stage encodes the corpus and the queries here and searches an exact in-memory
    index; ``dtypes`` (when given) gets each stage's resolved dtype."""
    from raytrieve.encoders import load_encoder
    from raytrieve.index import DenseIndex, SparseIndex
    from raytrieve.index.dense import index_similarity

    ids, texts = list(evalset.corpus), list(evalset.corpus.values())
    qids = sorted(evalset.queries)
    lists: Lists = {}
    for stage in stages:
        started = time.perf_counter()
        log.info("%s (%s): encoding %d documents and %d queries", stage.name, stage.model, len(ids), len(qids))
        encoder = load_encoder(stage.kind, stage.model, max_seq_length=options.max_seq_length, dtype=options.dtype)
        if dtypes is not None:
            dtypes[stage.name] = {"documents": [encoder.dtype], "queries": [encoder.dtype]}
        kw: dict[str, Any] = {"batch_size": options.batch_size, "show_progress_bar": _bars()}
        if stage.kind == "dense":
            similarity = index_similarity(encoder.similarity_fn_name, f"{stage.model} (similarity_fn_name)")
            vectors = encoder.encode_document(texts, **kw)
            index: Any = DenseIndex.build(ids, vectors, similarity=similarity)
        else:
            rows = encoder.encode_document(texts, as_dicts=True, **kw)
            index = SparseIndex.build(ids, rows, vocab_size=encoder.get_embedding_dimension() or len(encoder.tokenizer))
        found = index.search(
            _encode_queries(encoder, stage.kind, [evalset.queries[q] for q in qids], options),
            top_k=min(options.depth, len(ids)),
        )
        lists[stage.name] = dict(zip(qids, _hits(found)))
        log.info(
            "%s (%s): %d documents and %d queries in %.1fs",
            stage.name,
            stage.model,
            len(ids),
            len(qids),
            time.perf_counter() - started,
        )
        del encoder, index
    return lists


def index_stages(index_dir: str | Path, models: Models) -> tuple[list[FirstStage], Any]:
    """The first stages an index folder serves, with the models that encoded it; models given
    for a kind must be that model (another model's vectors live in another space)."""
    from raytrieve._io import redact
    from raytrieve.index.build import load_indices
    from raytrieve.model_ref import resolve_model

    indices = load_indices(index_dir)
    stages = []
    for kind in ("dense", "sparse"):
        given, built = getattr(models, kind), indices.source.output(kind)
        if built is None or getattr(indices, kind) is None:
            if given:
                raise ConfigError(
                    f"--{kind} {redact(given[0])}: the index {index_dir} has no {kind}/ index; "
                    f"build it with that model or drop --{kind}"
                )
            continue
        if len(given) > 1:
            raise ConfigError(
                f"--{kind}: an index holds one {kind} model ({redact(built.model)}); evaluate the others without "
                "--index"
            )
        if given and not built.made_by(given[0], resolve_model(given[0])):
            raise ConfigError(
                f"--{kind} {redact(given[0])}: the index's {kind} vectors were encoded with {redact(built.model)!r}"
                f"{built.not_made_by(given[0])}; pass that model, or rebuild the index with this one"
            )
        stages.append(FirstStage(kind, kind, given[0] if given else built.model))  # made_by: the same files
    return stages, indices


def index_lists(
    evalset: EvalSet, index_dir: str | Path, models: Models, options: RunOptions, dtypes: DtypesUsed | None = None
) -> tuple[Lists, list[FirstStage]]:
    """Each index of the folder searched with its model's query side (encoded here); ``dtypes``
    (when given) gets the vectors' dtypes (the encoding job's) and the queries' (resolved here)."""
    from raytrieve.encoders import load_encoder

    stages, indices = index_stages(index_dir, models)
    qids = sorted(evalset.queries)
    judged = {d for j in evalset.qrels.values() for d in j}
    lists: Lists = {}
    for stage in stages:
        index, built = getattr(indices, stage.kind), indices.source.output(stage.kind)
        lacking = sorted(judged - set(index.ids))
        if lacking:
            raise DataError(
                f"{index_dir}: the {stage.kind} index lacks {len(lacking)} judged document(s), e.g. {lacking[:5]}; "
                "it was built from another corpus. Build it from this corpus (or leave out --index)"
            )
        extra = [d for d in index.ids if d not in evalset.corpus]
        if extra and models.reranker:
            raise DataError(
                f"{index_dir}: {len(extra)} indexed document(s) are not in {evalset.corpus_path}, e.g. {extra[:5]}; "
                "the reranker reads candidates' texts from the corpus given: pass the corpus the index was built from"
            )
        encoder = load_encoder(stage.kind, built.model, max_seq_length=built.max_seq_length, dtype=options.dtype)
        if dtypes is not None:  # a manifest from before the dtype setting names only the dtype asked for
            dtypes[stage.name] = {"documents": list(built.dtypes_used) or [built.dtype], "queries": [encoder.dtype]}
        truncate_dim = getattr(built, "truncate_dim", None)
        vectors = _encode_queries(encoder, stage.kind, [evalset.queries[q] for q in qids], options, truncate_dim)
        lists[stage.name] = dict(zip(qids, _hits(index.search(vectors, top_k=min(options.depth, len(index))))))
    return lists, stages


def encode_corpus(evalset: EvalSet, models: Models, options: RunOptions, work: Path, ray_address: str | None) -> Path:
    """The corpus through the encoding job (Ray Data) into ``work``/vectors, then ``raytrieve
    index build`` into ``work``/index (a rerun reuses finished shards); returns the index folder."""
    from raytrieve.index.build import build_indices
    from raytrieve.inference.config import CorpusConfig, EncodeConfig
    from raytrieve.inference.encode import run_encode

    if len(models.dense) > 1 or len(models.sparse) > 1:
        raise ConfigError(
            "a corpus above --max-in-process-rows is encoded by one encoding job, with at most one --dense and one "
            "--sparse model; evaluate the others in separate runs"
        )
    cols = evalset.columns
    corpus = CorpusConfig(
        path=str(evalset.corpus_path),
        format="parquet" if evalset.corpus_path.suffix == ".parquet" else "jsonl",
        id_column=cols.corpus_id,
        text_column=cols.corpus_text,
        title_column=evalset.title_column,
    )
    spec: dict[str, Any] = {"max_seq_length": options.max_seq_length, "dtype": options.dtype}
    raw: dict[str, Any] = {
        "corpus": corpus.model_dump(),
        "output_dir": str(work / "vectors"),
        "bad_rows": "fail",  # the loader has already refused what the job would skip
    }
    for kind in ("dense", "sparse"):
        if getattr(models, kind):
            raw[kind] = {"model": getattr(models, kind)[0], **spec}
    cfg = from_dict(EncodeConfig, raw, "evaluate encode")
    result = run_encode(cfg, where="evaluate encode", ray_address=ray_address)
    log.info("encoding job: %d documents at %.1f/s into %s", result.rows, result.rows_per_s, work / "vectors")
    build_indices(work / "vectors", work / "index", texts=False)  # evaluate reads its own corpus's texts
    return work / "index"
