"""Hard-negative mining: for every (query, positive) pair, documents the retriever ranks high
that are not a positive of that query, filtered and sampled as the config says.

    result = run_mine(load_mine_config("jobs/configs/mine_pydocs.yaml"), ray_address="local")

1. The corpus (given, or the distinct positives) is encoded by the encoding job (Ray Data,
   resumable) unless ``corpus_vectors`` points at one already made with the same model.
2. Queries and positives are encoded on the driver; an exact index over the vectors retrieves
   the best ``range_max`` candidates per query, every positive of that query left out by its
   text hash (stored with the vectors). The corpus texts never come to the driver.
3. Optionally a cross-encoder rescores candidates and positives: a Ray Data job scores each
   corpus shard's candidates where the shard is read (inference/lookup.py); the candidates
   are then ordered by its score and every filter uses its scores.
4. Per pair: skip the first ``range_min`` candidates, keep those within the margins and
   score bounds, take ``num_negatives`` (best first, or at random with a seed). The texts of
   the negatives kept are looked up on the workers, shard by shard.

The pairs file and the output are read and written by the driver: they are output-sized.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raytrieve import _io
from raytrieve._io import redact
from raytrieve.errors import ConfigError, DataError
from raytrieve.hashing import text_hashes
from raytrieve.inference.config import (
    CorpusConfig,
    DenseOutputConfig,
    EncodeConfig,
    MineConfig,
    SelectionConfig,
    SparseOutputConfig,
)
from raytrieve.inference.lookup import EncodedCorpus, fetch_texts, score_rows

log = logging.getLogger("raytrieve.mine")
MINE = "raytrieve mine"  # the mark its output file carries (a rerun replaces only such a file)
# The output's schema metadata under this key: what it was mined from (``_inputs_key``) and the
# result, so that a rerun with nothing changed says so instead of mining again.
MINED_FROM = b"raytrieve.mined_from"
# Part of that key: bump it with any change to mining that changes what it writes, so that an
# output of the earlier rules is mined again.
MINE_RULES = 1


@dataclass
class MineResult:
    output_path: str
    pairs: int
    rows: int
    negatives: int
    pairs_short: int  # pairs that got fewer than num_negatives negatives
    pairs_dropped: int  # n-tuple formats: pairs without num_negatives negatives are not written
    corpus_size: int
    # Pairs whose positive is no corpus document by exact text: it cannot be left out of its
    # query's candidates, so the document it stands for may come back as its own negative.
    positives_not_in_corpus: int = 0


def read_pairs(cfg: MineConfig) -> tuple[list[str], list[str]]:
    from raytrieve.data.validate import exists, infer_format, read_table

    path = cfg.pairs.path  # a local path or a URI (read here whole: one query and positive per pair)
    if not exists(path):
        raise DataError(f"pairs.path {path}: file not found")
    table = read_table(path, cfg.pairs.format or infer_format(path))
    columns = {}
    for role, name in (("query", cfg.pairs.query_column), ("positive", cfg.pairs.positive_column)):
        if name not in table.column_names:
            raise DataError(
                f"{path}: no column {name!r} for the {role}; the file has {table.column_names}. Set pairs.{role}_column"
            )
        values = table.column(name).to_pylist()
        bad = [i for i, v in enumerate(values) if not isinstance(v, str) or not v.strip()]
        if bad:
            raise DataError(
                f"{path}: column {name!r} has {len(bad)} null, empty or non-text value(s), first at "
                f"row {bad[0]}; drop those rows"
            )
        columns[role] = values
    if not columns["query"]:
        raise DataError(f"{path}: no pairs")
    return columns["query"], columns["positive"]


def _corpus_vectors(cfg: MineConfig, positives: list[str], ray_address: str | None, where: str) -> str:
    """The folder of the corpus vectors (the encoding job's output, a path or a URI), made now unless given."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raytrieve.inference.encode import run_encode

    if cfg.corpus_vectors:
        vectors_dir = cfg.corpus_vectors  # as given: a URI stays one (Path would make s3:// a local s3:/)
    else:
        work = Path(f"{cfg.output_path}.work")
        corpus = cfg.corpus
        if corpus is None:  # the distinct positives, in first-seen order
            texts = list(dict.fromkeys(positives))
            work.mkdir(parents=True, exist_ok=True)
            with _io.atomic_file(work / "positives.parquet") as tmp:
                pq.write_table(pa.table({"id": [f"positive-{i}" for i in range(len(texts))], "text": texts}), tmp)
            corpus = CorpusConfig(path=str(work / "positives.parquet"))
        output = {
            "model": cfg.retriever.model,
            "max_seq_length": cfg.retriever.max_seq_length,
            "trust_remote_code": cfg.retriever.trust_remote_code,
            "dtype": cfg.retriever.dtype,
        }
        encode = EncodeConfig(
            corpus=corpus,
            output_dir=str(work / "vectors"),
            side="document",
            compute=cfg.compute,
            dense=DenseOutputConfig(**output) if cfg.retriever.kind == "dense" else None,
            sparse=SparseOutputConfig(**output) if cfg.retriever.kind == "sparse" else None,
        )
        run_encode(encode, where=f"{where} (corpus encoding)", ray_address=ray_address, scratch=True)
        vectors_dir = encode.output_dir
    return vectors_dir  # given ones were checked before Ray (check_corpus_vectors)


def check_corpus_vectors(
    cfg: MineConfig, vectors_dir: str, model_path: str, max_seq_length: int, where: str, prompt: str | None = None
) -> None:
    """Vectors the retriever can search: made with its model at its ``max_seq_length``, as
    documents, with ``prompt`` (the model's document prompt: positives are encoded here so, and
    their scores compared with the candidates') and, dense, as floats (an index quantizes
    itself); by the manifest alone (the shards are read after the checks)."""
    shown = redact(vectors_dir)  # for messages: without a URI's keys
    from raytrieve.inference.shards import read_manifest

    try:
        manifest = read_manifest(vectors_dir)
    except DataError as e:  # it names the folder; the key is this config's
        raise DataError(f"{where}.corpus_vectors: {e}") from None
    if manifest.side != "document":
        raise ConfigError(
            f"{where}.corpus_vectors {shown}: encoded as side: {manifest.side}; mining's candidates are "
            "documents, scored against positives encoded as documents: encode the corpus with side: document"
        )
    made_by = manifest.output(cfg.retriever.kind)
    if made_by is None or not made_by.made_by(cfg.retriever.model, Path(model_path)):
        made_with = repr(redact(made_by.model)) + made_by.not_made_by(cfg.retriever.model) if made_by else None
        raise ConfigError(
            f"{where}.corpus_vectors {shown}: made with {made_with or f'no {cfg.retriever.kind} model'}, "
            f"not with retriever.model {redact(cfg.retriever.model)!r}; encode the corpus with the retriever's model"
        )
    precision = getattr(made_by, "precision", "float32")
    if precision not in ("float32", "float16"):
        raise ConfigError(
            f"{where}.corpus_vectors {shown}: dense vectors are {precision}; mining searches float vectors: "
            "encode the corpus with dense.precision: float32"
        )
    assert made_by is not None
    if made_by.max_seq_length != max_seq_length:
        raise ConfigError(
            f"{where}.retriever.max_seq_length: {max_seq_length}, but corpus_vectors {shown} were encoded at "
            f"{made_by.max_seq_length}; set retriever.max_seq_length: {made_by.max_seq_length}"
        )
    from raytrieve.encoders.base import recorded_prompt

    encoded_with, expected = recorded_prompt(made_by.prompt), recorded_prompt(prompt)
    if encoded_with != expected:
        raise ConfigError(
            f"{where}.corpus_vectors {shown}: encoded with the prompt {encoded_with!r}, but positives are "
            f"encoded with the model's document prompt {expected!r}, so their scores and the candidates' differ in "
            "scale; encode the corpus without a prompt setting (the model's own)"
        )


def _inputs_key(
    settings: dict[str, Any], queries: list[str], positives: list[str], models: dict[str, str], vectors_dir: str
) -> str:
    """What the output is a function of: the settings (``settings``: the config less its output
    path, compute and corpus_vectors' path, with the retriever's dtype as resolved here), the
    pairs' texts in order, the models' files (``model_ref.files_key``: their content), the
    corpus vectors (their manifest: each shard's input checksum and vectors' sha256, the
    encoding settings) and ``MINE_RULES``."""
    from raytrieve.inference.shards import read_manifest

    vectors = {k: v for k, v in read_manifest(vectors_dir).to_json().items() if k != "created"}
    pairs = hashlib.sha256(text_hashes(queries).tobytes() + b"|" + text_hashes(positives).tobytes()).hexdigest()
    body = {"rules": MINE_RULES, "settings": settings, "pairs": [len(queries), pairs], "models": models}
    return hashlib.sha256(json.dumps({**body, "vectors": vectors}, sort_keys=True, default=str).encode()).hexdigest()


def _earlier_result(output_path: str, key: str) -> MineResult | None:
    """The result recorded in an earlier output mined from the same inputs (``key``), or None
    (also where the file's rows are not the recorded result's: it was edited since)."""
    import pyarrow.parquet as pq

    out = Path(output_path)
    if not out.is_file():
        return None
    try:
        meta = pq.read_metadata(out)
        recorded = json.loads((meta.schema.to_arrow_schema().metadata or {}).get(MINED_FROM, b"{}"))
        if recorded.get("key") != key or meta.num_rows != recorded["result"]["rows"]:
            return None
        return MineResult(**{**recorded["result"], "output_path": str(out)})  # a copied file names itself
    except Exception:  # an older version's output, a damaged footer: mined again (check_output_file passed it)
        return None


def select_negatives(
    candidates: list[int], scores: np.ndarray, positive_score: float, s: SelectionConfig, rng: np.random.Generator
) -> list[int]:
    """Candidates (already best-first, positives removed, at most range_max) -> chosen ones."""
    kept = []
    for c, score in zip(candidates[s.range_min :], scores[s.range_min :]):
        if s.absolute_margin is not None and score > positive_score - s.absolute_margin:
            continue
        if s.relative_margin is not None and score > positive_score * (1 - s.relative_margin):
            continue
        if s.max_score is not None and score > s.max_score:
            continue
        if s.min_score is not None and score < s.min_score:
            continue
        kept.append(c)
    if s.sampling_strategy == "random" and len(kept) > s.num_negatives:
        picked = sorted(rng.choice(len(kept), size=s.num_negatives, replace=False))
        return [kept[i] for i in picked]
    return kept[: s.num_negatives]


def run_mine(cfg: MineConfig, where: str = "config", ray_address: str | None = None) -> MineResult:
    import pyarrow.parquet as pq
    import ray

    from raytrieve.index.build import build_indices, load_indices
    from raytrieve.index.dense import index_similarity
    from raytrieve.inference.shards import read_text_hashes

    cfg.check(where)
    # Before the encoding job, which may point corpus.path at its staged copy.
    settings = cfg.model_dump(mode="json", exclude={"output_path", "compute", "corpus_vectors"})
    inputs = (cfg.pairs.path, *([cfg.corpus.path] if cfg.corpus is not None else []))
    _io.check_output_file(cfg.output_path, MINE, f"{where}.output_path", inputs)
    queries, positives = read_pairs(cfg)
    from raytrieve.encoders import load_encoder
    from raytrieve.kinds import CROSS, refuse_other_kind, saved_kind
    from raytrieve.model_ref import check_max_seq_length, files_key, resolve_field

    r = cfg.retriever  # the models are checked, and the retriever loaded, before any Ray work
    # Another kind would load as this one: meaningless negatives, or a Ray actor failing after the encoding.
    field = f"{where}.retriever.model"
    path = resolve_field(r.model, field)
    # retriever.kind takes dense or sparse: a cross-encoder belongs under reranker:.
    fix = (
        f"move it to reranker.model, and name a {r.kind} model here"
        if saved_kind(path) is CROSS
        else f"set retriever.kind: {{field}}, or name a {r.kind} model"
    )
    refuse_other_kind(path, r.kind, f"{field}: {redact(r.model)}", fix)
    check_max_seq_length(path, r.max_seq_length, f"{where}.retriever.max_seq_length")  # the model names no key
    models = {"retriever": files_key(r.model, path)}
    if cfg.reranker is not None:
        field = f"{where}.reranker.model"
        reranker = resolve_field(cfg.reranker.model, field)
        refuse_other_kind(reranker, "reranker", f"{field}: {redact(cfg.reranker.model)}", "name a cross-encoder")
        check_max_seq_length(reranker, cfg.reranker.max_seq_length, f"{where}.reranker.max_seq_length")
        models["reranker"] = files_key(cfg.reranker.model, reranker)
    model = load_encoder(
        r.kind, r.model, max_seq_length=r.max_seq_length, trust_remote_code=r.trust_remote_code, dtype=r.dtype
    )
    settings["retriever"]["dtype"] = model.dtype  # "auto" as resolved on this machine
    similarity = None
    if r.kind == "dense":  # its candidates come from a cosine or dot index
        similarity = index_similarity(model.similarity_fn_name, f"{where}.retriever.model: {redact(r.model)}")
    key = None  # what the output is mined from: known once the corpus vectors are
    if cfg.corpus_vectors:
        document_prompt = model.resolve_prompt(None, model.prompt_name_for("document"))
        check_corpus_vectors(cfg, cfg.corpus_vectors, str(path), model.max_seq_length, where, document_prompt)
        key = _inputs_key(settings, queries, positives, models, cfg.corpus_vectors)
        earlier = _earlier_result(cfg.output_path, key)
        if earlier is not None:  # known before Ray starts
            return _nothing_to_do(earlier)
    from raytrieve.ray_cluster import connect

    connect(ray_address)
    from raytrieve.progress import Stage, interactive, stage

    bars = None if interactive() else False  # the encoders' own bars: on a terminal only
    vectors_dir = _corpus_vectors(cfg, positives, ray_address, where)
    shown = redact(vectors_dir)  # for messages: without a URI's keys
    if key is None:  # encoded now (or found complete): only now are the vectors known
        key = _inputs_key(settings, queries, positives, models, vectors_dir)
        earlier = _earlier_result(cfg.output_path, key)
        if earlier is not None:
            return _nothing_to_do(earlier)
    # From here on: the encoding job (phase 1) has shown its own progress.
    phases = Stage("mine", total=3 + (cfg.reranker is not None), unit="phase", eta=False)
    # The candidates' index, built shard by shard on disk and memory-mapped: the corpus's vectors
    # are never all in the driver's memory. It is derived data, removed once mined.
    index_dir = Path(f"{cfg.output_path}.work") / "index"
    build_indices(vectors_dir, index_dir, kinds=(cfg.retriever.kind,), texts=False)
    built = load_indices(index_dir)
    phases.update(1, finished="corpus vectors")
    encoded = EncodedCorpus.of(vectors_dir)
    if (
        cfg.corpus is not None
        and cfg.corpus_vectors
        and Path(cfg.corpus.path).expanduser().resolve() != Path(encoded.corpus.path).resolve()
    ):
        raise ConfigError(
            f"{where}.corpus.path {redact(cfg.corpus.path)}: corpus_vectors {shown} encodes "
            f"{encoded.corpus.path}; point both at the same corpus (or leave corpus: out)"
        )
    hashes = read_text_hashes(vectors_dir)
    if hashes is None:
        raise DataError(f"{shown}: made by an older raytrieve (no text hashes); encode the corpus again")
    s, kind = cfg.selection, cfg.retriever.kind
    searched = built.dense if kind == "dense" else built.sparse
    assert searched is not None, "check_corpus_vectors: the vectors hold the retriever's kind"
    corpus_ids = searched.ids

    unique_queries = list(dict.fromkeys(queries))
    # Positives are left out of a query's candidates by text hash: the driver never holds the corpus.
    positives_of: dict[str, set[int]] = {}
    positive_hashes = text_hashes(positives)
    for q, h in zip(queries, positive_hashes.tolist()):
        positives_of.setdefault(q, set()).add(h)
    missing = int((~np.isin(positive_hashes, hashes)).sum())
    if missing:
        log.warning(
            "%d of %d positives are not in the corpus by exact text (a title in front of the corpus's text "
            "but not the positive's, other whitespace): the document such a positive stands for may be mined "
            "as its own negative; give the pairs the corpus's texts",
            missing,
            len(positives),
        )
    depth = min(len(corpus_ids), s.range_max + max(len(v) for v in positives_of.values()))
    bs = cfg.retriever.batch_size
    q_row = {q: i for i, q in enumerate(unique_queries)}
    if kind == "dense":
        assert similarity is not None and built.source.dense is not None and built.dense is not None
        if built.dense.similarity != similarity:  # check_corpus_vectors compared the models: not expected
            raise DataError(
                f"{shown}: indexed by {built.dense.similarity}, the retriever's similarity is {similarity}; "
                "encode the corpus with the retriever's model"
            )
        index = built.dense
        # Queries and positives as the corpus was encoded: its truncate_dim (Matryoshka), and
        # unit length for cosine, so positives' scores are on the candidates' scale.
        kw = {"batch_size": bs, "normalize_embeddings": similarity == "cosine", "show_progress_bar": bars}
        kw["truncate_dim"] = built.source.dense.truncate_dim
        q_emb = model.encode_query(unique_queries, **kw)
        p_emb = model.encode_document(positives, **kw)
        hits = index.search(q_emb, depth)
        pos_scores = np.einsum("ij,ij->i", q_emb[[q_row[q] for q in queries]], p_emb)
    else:
        described = built.source.sparse
        assert described is not None and built.sparse is not None, "build_indices builds what the manifest describes"
        index = built.sparse
        # Positives pruned as the corpus was (its max_active_dims), so their scores are the candidates'.
        kept = {"max_active_dims": described.max_active_dims} if described.max_active_dims else {}
        q_emb = model.encode_query(unique_queries, batch_size=bs, as_dicts=True, show_progress_bar=bars)
        p_emb = model.encode_document(positives, batch_size=bs, as_dicts=True, show_progress_bar=bars, **kept)
        hits = index.search(q_emb, depth)
        pos_scores = np.array([_sparse_dot(q_emb[q_row[q]], p) for q, p in zip(queries, p_emb)], dtype=np.float32)

    # Best-first candidates per unique query, positives (by text) left out, at most range_max.
    candidates: dict[str, tuple[list[int], np.ndarray]] = {}
    for q, i in q_row.items():
        rows, scores = hits.rows[i], hits.scores[i]
        keep = [(int(r), float(sc)) for r, sc in zip(rows, scores) if r >= 0 and int(hashes[r]) not in positives_of[q]]
        keep = keep[: s.range_max]
        candidates[q] = ([r for r, _ in keep], np.array([sc for _, sc in keep], dtype=np.float32))
    phases.update(1, finished=f"candidates of {len(unique_queries)} queries")

    if cfg.reranker is not None:
        from raytrieve.model_ref import resolve_model, ship

        rr = cfg.reranker
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        reranker = {
            "model": ship(resolve_model(rr.model)),  # a folder in this machine's cache travels to the actors
            "max_seq_length": rr.max_seq_length,
            "dtype": rr.dtype,
            "batch_size": rr.batch_size,
            "token_budget": rr.token_budget,
            "device": "cuda" if use_gpu else "cpu",
            "threads": max(1, int(rr.cpus_per_actor)),
        }
        cand_rows = np.array([r for q in unique_queries for r in candidates[q][0]], dtype=np.int64)
        cand_query = np.array([i for i, q in enumerate(unique_queries) for _ in candidates[q][0]], dtype=np.int64)
        # Minutes on CPU for a few thousand pairs: say what runs, and what sets its speed.
        log.info(
            "reranking %d candidates of %d queries and %d positives with %s on %d actor(s) of %g CPU(s) "
            "(reranker.actors, reranker.cpus_per_actor; reranker.max_seq_length %s)",
            len(cand_rows),
            len(unique_queries),
            len(queries),
            redact(rr.model),
            rr.actors,
            rr.cpus_per_actor,
            rr.max_seq_length if rr.max_seq_length is not None else "the model's",
        )
        with stage("rerank", total=len(cand_rows) + len(queries), unit="pair") as counted:
            # The positives in the same pool (their texts travel in the rows): the margins compare
            # them with the candidates, scored by the same model in the same dtype.
            scored, pos_scores = score_rows(
                encoded,
                corpus_ids,
                hashes,
                cand_rows,
                cand_query,
                unique_queries,
                reranker,
                rr.actors,
                rr.cpus_per_actor,
                counted,
                given=[(q_row[q], p) for q, p in zip(queries, positives)],
            )
        at = 0
        for q in unique_queries:
            rows = candidates[q][0]
            ce = scored[at : at + len(rows)]
            at += len(rows)
            order = np.argsort(-ce, kind="stable")
            candidates[q] = ([rows[j] for j in order], ce[order])
        phases.update(1, finished="reranked")

    rng = np.random.default_rng(s.seed)
    chosen = []
    for q, pos_score in zip(queries, pos_scores):
        rows, scores = candidates[q]
        picked = select_negatives(rows, scores, float(pos_score), s, rng)
        score_of = dict(zip(rows, scores.tolist()))
        chosen.append((picked, [score_of[r] for r in picked]))
    # Only the texts of the negatives kept, looked up on the workers shard by shard.
    texts = fetch_texts(
        encoded, corpus_ids, hashes, np.array([r for picked, _ in chosen for r in picked], dtype=np.int64)
    )
    table, dropped = _format(cfg.output_format, queries, positives, pos_scores, chosen, texts, s.num_negatives)
    short = sum(1 for picked, _ in chosen if len(picked) < s.num_negatives)
    # Negatives written: a fixed-width format leaves out the pairs that got fewer, and theirs.
    written = cfg.output_format.startswith("n-tuple")
    negatives = table.num_rows * s.num_negatives if written else sum(len(p) for p, _ in chosen)
    out = Path(cfg.output_path)
    result = MineResult(str(out), len(queries), table.num_rows, negatives, short, dropped, len(corpus_ids), missing)

    out.parent.mkdir(parents=True, exist_ok=True)
    recorded = json.dumps({"key": key, "result": asdict(result)}).encode()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), MINED_FROM: recorded})
    with _io.atomic_file(out) as tmp:
        pq.write_table(_io.mark_written_by(table, MINE), tmp)
    phases.update(1, finished=f"negatives written to {out}")
    phases.close()
    del built, index, searched  # their memory maps, before the files go (a failed run's index is
    # left there, and replaced by the next run's)
    shutil.rmtree(index_dir, ignore_errors=True)
    with contextlib.suppress(OSError):  # the work folder, if the index was all it held
        index_dir.parent.rmdir()
    if short:
        log.warning(
            "%d of %d pairs got fewer than %d negatives (filters too strict or the corpus too small)",
            short,
            len(queries),
            s.num_negatives,
        )
    log.info("mined %s", asdict(result))
    return result


def _nothing_to_do(earlier: MineResult) -> MineResult:
    log.info(
        "%s: already mined from these pairs, corpus vectors, models and settings (%d rows); nothing to do",
        earlier.output_path,
        earlier.rows,
    )
    return earlier


def _sparse_dot(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    _common, ia, ib = np.intersect1d(a["indices"], b["indices"], assume_unique=True, return_indices=True)
    return float(np.dot(a["values"][ia].astype(np.float64), b["values"][ib]))


def _format(
    fmt: str,
    queries: list[str],
    positives: list[str],
    pos_scores: np.ndarray,
    chosen: list[tuple[list[int], list[float]]],
    texts: dict[int, str],
    n: int,
) -> tuple[Any, int]:
    """The output table and how many pairs a fixed-width format had to leave out."""
    import pyarrow as pa

    if fmt == "triplet":
        rows = [(q, p, texts[r]) for q, p, (picked, _) in zip(queries, positives, chosen) for r in picked]
        return pa.table(
            {"query": [r[0] for r in rows], "positive": [r[1] for r in rows], "negative": [r[2] for r in rows]}
        ), 0
    if fmt == "labeled-list":
        return pa.table(
            {
                "query": queries,
                "documents": [[p] + [texts[r] for r in picked] for p, (picked, _) in zip(positives, chosen)],
                "labels": [[1] + [0] * len(picked) for picked, _ in chosen],
            }
        ), 0
    full = [i for i, (picked, _) in enumerate(chosen) if len(picked) >= n]
    columns: dict[str, Any] = {"query": [queries[i] for i in full], "positive": [positives[i] for i in full]}
    for j in range(n):
        columns[f"negative_{j + 1}"] = [texts[chosen[i][0][j]] for i in full]
    if fmt == "n-tuple-scores":
        columns["score"] = [[float(pos_scores[i]), *chosen[i][1][:n]] for i in full]
    return pa.table(columns), len(queries) - len(full)
