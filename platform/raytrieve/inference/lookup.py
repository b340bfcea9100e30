"""Corpus texts where they live: look up or cross-encoder-score given rows of an encoded corpus
on the workers, one Ray Data row per corpus shard (per piece of one when scoring), so the driver
never reads the corpus.

Mining finds candidates by vectors and text hashes alone; it asks this stage for the
reranker's scores of (query, candidate) and of (query, positive) (the positives' texts travel in
the rows: one actor pool, one model load per actor), and, at the end, for the texts of the
negatives it keeps: output-sized data, never the corpus.

A shard is the encoding job's own shard (same plan, from its job.json), read again from the
corpus; a row is found by its id, and an id the shard no longer has means the corpus
changed since it was encoded (the error says to rerun the encoding job).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from raytrieve.data.sources import ShardSpec, open_source, plan_shards, read_shard
from raytrieve.errors import DataError
from raytrieve.hashing import text_hashes
from raytrieve.index.base import Ids
from raytrieve.inference import shards
from raytrieve.inference.config import CorpusConfig
from raytrieve.inference.corpus import needed_columns, shard_rows
from raytrieve.progress import Stage


@dataclass
class EncodedCorpus:
    """Where each row of an encoding job's output comes from: its shard and the corpus."""

    corpus: CorpusConfig
    specs: list[ShardSpec]
    starts: np.ndarray  # first vector row of each shard

    @classmethod
    def of(cls, vectors_dir: str) -> EncodedCorpus:
        store = shards.OutputStore(str(vectors_dir))
        rows_per_shard = store.read_json(shards.JOB)["config"]["rows_per_shard"]  # the manifest does not keep it
        manifest = shards.read_manifest(vectors_dir)
        corpus = manifest.corpus.config()
        specs = plan_shards(open_source(corpus.path, corpus.format, field="corpus.path"), rows_per_shard)
        if len(specs) != len(manifest.shards):
            raise DataError(
                f"{corpus.path}: now cuts into {len(specs)} shards, the encoding in {vectors_dir} has "
                f"{len(manifest.shards)}; the corpus changed: run the encoding job again"
            )
        starts = np.concatenate(([0], np.cumsum([s.rows for s in manifest.shards])))[:-1]
        return cls(corpus, specs, starts)

    def shard_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, rows, side="right") - 1


# Pairs per Ray Data row when reranking: a shard's pairs spread over every actor of the pool (one
# row per shard kept a one-shard corpus on one actor), and the driver's count moves as each piece
# is scored (~25 s of a 12-layer cross-encoder on 2 CPU cores at 256 tokens).
RERANK_PIECE = 256


# The shard of request rows whose texts travel in the row (``given``) instead of being looked up.
GIVEN = -1


class ShardLookup:
    """Ray Data callable: per request row (a corpus shard, or a piece of one), the texts of the
    requested ids, or the reranker's scores of (query, text) for each request; a row of shard
    ``GIVEN`` brings its texts with it and is only scored."""

    def __init__(self, corpus: CorpusConfig, queries: Any = None, reranker: dict[str, Any] | None = None) -> None:
        self.corpus = corpus
        self.queries: list[str] = []
        self.model = None
        # The last shard read, by its spec: an actor often scores several pieces of one shard in a row.
        self._read: tuple[ShardSpec, dict[str, str]] | None = None
        if reranker is not None:
            import ray
            import torch

            from raytrieve.encoders import load_encoder
            from raytrieve.model_ref import local_folder

            torch.set_num_threads(reranker["threads"])
            self.model = load_encoder(
                "cross",
                local_folder(reranker["model"]),
                device=reranker["device"],
                max_seq_length=reranker["max_seq_length"],
                dtype=reranker["dtype"],
            )
            self.batch_size, self.token_budget = reranker["batch_size"], reranker["token_budget"]
            self.queries = ray.get(queries)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out: dict[str, list[Any]] = {"shard": [], "piece": [], "texts": [], "scores": []}
        for row in batch.to_pylist():
            spec = ShardSpec.from_row(row)
            if spec.shard == GIVEN:
                texts = list(row["given"])
            else:
                if self._read is None or self._read[0] != spec:
                    self._read = (spec, shard_text_of(spec, self.corpus))
                texts = pick_texts(spec, self._read[1], row["ids"], row["hashes"])
            out["shard"].append(spec.shard)
            out["piece"].append(int(row.get("piece", 0)))
            if self.model is not None:
                pairs = [(self.queries[q], t) for q, t in zip(row["query"], texts)]
                scores = self.model.predict(
                    pairs, batch_size=self.batch_size, token_budget=self.token_budget, show_progress_bar=False
                )
                out["scores"].append(np.asarray(scores, dtype=np.float32).tolist())
                out["texts"].append([])
            else:
                out["texts"].append(texts)
                out["scores"].append([])
        return pa.table(
            {
                "shard": pa.array(out["shard"], pa.int64()),
                "piece": pa.array(out["piece"], pa.int64()),
                "texts": pa.array(out["texts"], pa.list_(pa.string())),
                "scores": pa.array(out["scores"], pa.list_(pa.float32())),
            }
        )


def shard_texts(spec: ShardSpec, corpus: CorpusConfig, ids: list[str], hashes: list[int]) -> list[str]:
    """The texts of ``ids`` in the corpus shard ``spec``, as the encoding job read them.
    ``hashes``: the text hash the job stored for each (shards' text_hash). An id the shard no
    longer has, or a text that changed, is refused: the corpus changed since it was encoded."""
    return pick_texts(spec, shard_text_of(spec, corpus), ids, hashes)


def shard_text_of(spec: ShardSpec, corpus: CorpusConfig) -> dict[str, str]:
    """Each id's text in the corpus shard ``spec`` (an id's first row, as the encoding job kept it)."""
    rows = shard_rows(read_shard(spec, needed_columns(corpus)), corpus, spec.path)
    text_of: dict[str, str] = {}
    for id_, text in zip(rows.ids, rows.texts):
        text_of.setdefault(id_, text)
    return text_of


def pick_texts(spec: ShardSpec, text_of: dict[str, str], ids: list[str], hashes: list[int]) -> list[str]:
    """``shard_texts`` from the shard's ``shard_text_of``."""
    missing = [i for i in ids if i not in text_of]
    fix = "the corpus changed since it was encoded: run the encoding job again"
    if missing:
        raise DataError(f"{spec.path}: id {missing[0]!r} is no longer in shard {spec.shard} of the corpus; {fix}")
    texts = [text_of[i] for i in ids]
    changed = np.flatnonzero(text_hashes(texts) != np.asarray(hashes, dtype=np.int64))
    if changed.size:
        raise DataError(
            f"{spec.path}: the text of id {ids[int(changed[0])]!r} (and {changed.size - 1} more) in shard "
            f"{spec.shard} of the corpus is not the one encoded; {fix}"
        )
    return texts


def _lookup_texts(batch: pa.Table, corpus: CorpusConfig) -> pa.Table:
    """Ray Data task: the texts of each shard's requested ids (``ShardLookup`` without a model)."""
    return ShardLookup(corpus)(batch)


def _run(
    encoded: EncodedCorpus,
    ids: Ids,
    hashes: np.ndarray,
    rows: np.ndarray,
    query: np.ndarray | None,
    queries: list[str] | None,
    reranker: dict[str, Any] | None,
    actors: int,
    cpus: float,
    progress: Stage | None = None,
    given: Sequence[tuple[int, str]] = (),
) -> dict[int, list[Any]]:
    """Requests grouped by shard through the stage (a reranked shard in pieces of at most
    ``RERANK_PIECE``); the result lists in request order per shard. ``given``: (query, text)
    pairs to score as well, under shard ``GIVEN``. ``progress`` counts the requests answered."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    from raytrieve.inference.checks import raise_worker_error

    shard = encoded.shard_of(rows)
    requests = []
    for s in np.unique(shard):
        in_shard = np.flatnonzero(shard == s)
        # Texts alone: the shard in one row, read once. Reranked: pieces, for every actor to share.
        step = RERANK_PIECE if reranker is not None else len(in_shard)
        for piece, at in enumerate(range(0, len(in_shard), step)):
            mine = in_shard[at : at + step]
            requests.append(
                {
                    **encoded.specs[int(s)].as_row(),
                    "piece": piece,
                    "ids": ids.take(rows[mine]),
                    "hashes": hashes[rows[mine]].tolist(),  # each text is checked against what was encoded
                    "query": query[mine].tolist() if query is not None else [],
                    "given": [],
                }
            )
    nowhere = ShardSpec(GIVEN, "", "", 0, 0).as_row()
    for piece, at in enumerate(range(0, len(given), RERANK_PIECE)):
        part = given[at : at + RERANK_PIECE]
        requests.append(
            {
                **nowhere,
                "piece": piece,
                "ids": [],
                "hashes": [],
                "query": [q for q, _ in part],
                "given": [t for _, t in part],
            }
        )
    items = ray.data.from_items(requests, override_num_blocks=max(1, len(requests)))
    if reranker is None:
        # Nothing to load: tasks, not an actor pool. They run on workers Ray keeps warm (no new
        # process to start, as an actor would be) and read as many shards at once as the cluster holds.
        ds = items.map_batches(
            _lookup_texts,  # pyright: ignore[reportArgumentType]  (fn_kwargs gives its corpus argument)
            fn_kwargs={"corpus": encoded.corpus},
            num_cpus=cpus,
            batch_size=1,
            batch_format="pyarrow",
        )
    else:
        ds = items.map_batches(
            ShardLookup,
            fn_constructor_kwargs={"corpus": encoded.corpus, "queries": ray.put(queries), "reranker": reranker},
            compute=ActorPoolStrategy(size=actors),
            num_cpus=cpus,
            num_gpus=1 if reranker["device"] == "cuda" else 0,
            batch_size=1,
            batch_format="pyarrow",
        )
    pieces: dict[tuple[int, int], list[Any]] = {}
    try:
        for r in ds.iter_rows():  # as each row is answered, in no particular order
            got = list(r["scores"] if reranker is not None else r["texts"])
            pieces[(int(r["shard"]), int(r["piece"]))] = got
            if progress is not None:
                progress.update(len(got))
    except Exception as e:
        raise_worker_error(e)
        raise
    return by_shard(pieces)


def by_shard(pieces: dict[tuple[int, int], list[Any]]) -> dict[int, list[Any]]:
    """Each shard's results, its pieces joined in piece order (rows come back in any order)."""
    per_shard: dict[int, list[Any]] = {}
    for (s, _), got in sorted(pieces.items()):
        per_shard.setdefault(s, []).extend(got)
    return per_shard


def _in_request_order(encoded: EncodedCorpus, rows: np.ndarray, per_shard: dict[int, list[Any]]) -> list[Any]:
    shard = encoded.shard_of(rows)
    taken = {s: 0 for s in per_shard}
    out = []
    for s in shard.tolist():
        out.append(per_shard[s][taken[s]])
        taken[s] += 1
    return out


def fetch_texts(
    encoded: EncodedCorpus, ids: Ids, hashes: np.ndarray, rows: np.ndarray, cpus: float = 0.5
) -> dict[int, str]:
    """The corpus text of each vector row in ``rows`` (``ids``, ``hashes``: every row's id and
    text hash); a task per shard."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    if not len(rows):
        return {}
    texts = _in_request_order(encoded, rows, _run(encoded, ids, hashes, rows, None, None, None, 1, cpus))
    return dict(zip(rows.tolist(), texts))


def score_rows(
    encoded: EncodedCorpus,
    ids: Ids,
    hashes: np.ndarray,
    rows: np.ndarray,
    query: np.ndarray,
    queries: list[str],
    reranker: dict[str, Any],
    actors: int = 1,
    cpus: float = 1.0,
    progress: Stage | None = None,
    given: Sequence[tuple[int, str]] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """The cross-encoder's score of (queries[query[i]], text of rows[i]) for each i, and of
    (queries[q], text) for each (q, text) in ``given`` (texts not looked up: a mined pair's
    positive), by one actor pool; ``progress`` counts the pairs scored."""
    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows) and not len(given):
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    per_shard = _run(encoded, ids, hashes, rows, np.asarray(query), queries, reranker, actors, cpus, progress, given)
    scored = per_shard.pop(GIVEN, [])
    return np.asarray(_in_request_order(encoded, rows, per_shard), dtype=np.float32), np.asarray(scored, np.float32)
