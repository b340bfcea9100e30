"""The model and index deployments behind the ingress.

``ModelReplica`` serves one model (dense, sparse or cross-encoder). Requests are grouped by
``@serve.batch`` until their estimated tokens reach ``max_batch_tokens``; one batch runs the
model once per task (query / document), sorted by length inside. A dense or sparse model with
an index holds it too (``colocate_index``, the default): ``recall`` encodes a query and searches
in one call. ``Retriever`` (``colocate_index: false``) holds every index folder the app's models
search (memory-mapped) and the documents' texts in a deployment of its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from ray import serve

from raytrieve.kinds import served_kind
from raytrieve.serve.cache import OutputCache, input_key
from raytrieve.serve.config import DeploymentConfig

# Tokens a text costs in the batch budget: about 4 characters a token for English, plus the
# special tokens; capped at the model's max_seq_length (truncation) and at the budget itself,
# so a single large request still forms a batch of its own.
CHARS_PER_TOKEN = 4


def estimate_tokens(texts: Sequence[str], max_seq_length: int) -> int:
    return sum(min(len(t) // CHARS_PER_TOKEN + 2, max_seq_length) for t in texts)


def load_model(kind: str, spec: DeploymentConfig, pin: str | None = None) -> Any:
    """The model of the serving config field ``kind`` (dense / sparse / reranker). ``pin``: for
    a model URI, what the app was built with (``app.store_pins``: a folder's content, a registry
    version)."""
    from raytrieve.encoders import load_encoder
    from raytrieve.model_ref import resolve_pinned

    return load_encoder(
        served_kind(kind),
        str(resolve_pinned(spec.model, pin)) if pin is not None else spec.model,
        device="cuda" if spec.num_gpus > 0 else "cpu",
        max_seq_length=spec.max_seq_length,
        trust_remote_code=spec.trust_remote_code,
        dtype=spec.dtype,
        backend=spec.backend,
    )


def _batch_cost(items: list[tuple[Any, Any, int]]) -> int:
    return sum(cost for _, _, cost in items)


class ModelRunner:
    """One model in this process, and its index when it holds one: what a ``ModelReplica`` runs,
    and what the ingress runs itself for /search's recall with ``recall_in_ingress``."""

    def __init__(
        self,
        kind: str,
        spec: DeploymentConfig,
        index: str | None = None,
        folders: Sequence[str] = (),
        documents: Documents | None = None,
        pins: Mapping[str, str | None] | None = None,
    ) -> None:
        """``index``: the folder of this model's vectors, held here (``recall``, ``lookup``) with
        the documents' texts; None when a ``Retriever`` holds it, or there is none. ``folders``:
        every index folder of the app (their source.json is read to check that they come from one
        corpus, as the retriever does: an app built without the start's checks is still refused;
        their documents/ are opened for ``lookup``). ``documents``: already loaded ones holding
        ``index`` (the ingress shares one among its runners: each index once per process).
        ``pins``: as ``Documents`` takes them."""
        import torch

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from concurrent.futures import ThreadPoolExecutor

        from raytrieve.sizing import replica_threads

        # build_app sizes both on a cluster; a replica built some other way falls back to 1 CPU.
        threads = spec.torch_threads or replica_threads(spec.num_cpus or 1.0)
        torch.set_num_threads(threads)
        # OpenMP's thread count is per calling thread: the model thread sets its own.
        self._model_thread = ThreadPoolExecutor(1, "model", initializer=torch.set_num_threads, initargs=(threads,))
        self.kind, self.spec = kind, spec
        self.model = load_model(kind, spec, (pins or {}).get(spec.model))
        self.index = index
        if documents is None and index is not None:
            documents = Documents([index], others=folders, pins=pins)
        self.documents = documents
        self.max_seq_length = int(self.model.max_seq_length or 512)
        self._cache = OutputCache(spec.cache_entries) if spec.cache_entries else None

    def describe(self) -> dict[str, Any]:
        import torch

        info: dict[str, Any] = {
            "name": self.spec.public_name,
            "kind": self.kind,
            "max_seq_length": self.max_seq_length,
            "dtype": self.model.dtype,  # the format chosen (a config's auto resolved on this replica)
            "backend": self.model.backend,
            "num_cpus": self.spec.num_cpus,  # sized from the cluster when the config left it unset
            "torch_threads": torch.get_num_threads(),
            "max_batch_tokens": self.spec.max_batch_tokens,
            "cache_entries": self.spec.cache_entries,
        }
        if self.kind == "dense":
            from raytrieve.modules import Pooling

            info["dimensions"] = self.model.get_embedding_dimension()
            info["similarity"] = self.model.similarity_fn_name
            pooling = next((m for m in self.model.stack if isinstance(m, Pooling)), None)
            info["pooling"] = "+".join(pooling.modes) if pooling is not None else None
        elif self.kind == "sparse":
            info["vocab_size"] = self.model.get_embedding_dimension() or len(self.model.tokenizer)
            info["pooling"] = "splade"
        else:
            config = self.model.stack[0].auto_model.config
            info["id2label"] = {str(i): str(label) for i, label in config.id2label.items()}
        if self.kind != "reranker":
            info["prompts"] = sorted(self.model.prompts)
        return info

    async def _in_model_thread(self, inputs: list[Any], task: str | None, prompt_name: str | None) -> Any:
        """``_run`` on the replica's one model thread: runs never overlap (the tokenizer's state is
        not thread-safe), and the event loop stays free to take requests, which batch meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(
            self._model_thread, self._run, inputs, task, prompt_name
        )

    def _run(self, inputs: list[Any], task: str | None, prompt_name: str | None) -> tuple[Any, list[int]]:
        """(outputs, tokens per input), as ``_compute``; with a cache, only the inputs it does not
        hold run the model (once each, however often a request repeats one)."""
        cache = self._cache
        if cache is None or not inputs:
            return self._compute(inputs, task, prompt_name)
        keys = [input_key(item, task, prompt_name) for item in inputs]
        found = {key: hit for key in dict.fromkeys(keys) if (hit := cache.get(key)) is not None}
        todo = {key: item for key, item in zip(keys, inputs) if key not in found}
        if todo:
            outputs, tokens = self._compute(list(todo.values()), task, prompt_name)
            for j, key in enumerate(todo):
                # Copies: a row view (a dense row, a sparse row's values) would keep the whole
                # batch's array alive in the cache.
                if isinstance(outputs, np.ndarray):
                    output = outputs[j].copy()
                else:
                    output = tuple(np.array(part, copy=True) for part in outputs[j])
                found[key] = (output, tokens[j])
                cache.put(key, *found[key])
        rows = [found[key][0] for key in keys]
        counts = [found[key][1] for key in keys]
        if self.kind == "sparse":
            return rows, counts
        return np.asarray(rows, dtype=np.float32), counts

    def _compute(self, inputs: list[Any], task: str | None, prompt_name: str | None) -> tuple[Any, list[int]]:
        from raytrieve.encoders.base import TASK_PROMPT_NAMES, Pretokenized

        model, route = self.model, None if self.kind == "reranker" else task
        if route is None and prompt_name is not None and self.kind != "reranker":
            # A prompt named like a task's (TEI's prompt_name "query") also takes that task's route.
            route = next((t for t, names in TASK_PROMPT_NAMES.items() if prompt_name in names), None)
        if prompt_name is None and route is not None:
            prompt_name = model.prompt_name_for(route)  # as encode_query / encode_document do
        prompt = model.resolve_prompt(None, prompt_name)
        # Tokenized once here, so the token counts (usage) come from the ids the model runs on.
        encoded = model.input_module(route).tokenize_ids(inputs, prompt=prompt)
        tokens = [len(ids) for ids in encoded["input_ids"]]
        ids, budget = Pretokenized(encoded), self.spec.max_batch_tokens
        if self.kind == "reranker":
            import torch

            activation = torch.nn.Identity() if task == "logits" else None
            scores = model.predict(
                ids,
                batch_size=64,
                token_budget=budget,
                show_progress_bar=False,
                activation_fn=activation,
                prompt=prompt,
            )
            return np.asarray(scores, dtype=np.float32), tokens
        common: dict[str, Any] = {"task": route, "prompt": prompt, "batch_size": 256, "token_budget": budget}
        if self.kind == "dense":
            return model.encode(ids, show_progress_bar=False, **common), tokens
        rows = model.encode(ids, show_progress_bar=False, as_dicts=True, **common)
        return [(r["indices"], r["values"]) for r in rows], tokens

    async def recall(self, query: str, k: int, n: int) -> tuple[list[tuple[str, float]], dict[str, str], float]:
        """/search's recall in one call (no hop between the query encoder and its index): the
        query's top ``k`` in this model's index, the texts of the first ``n``, and the search's
        milliseconds (the rest of the call is the encode and the hop). Encode and search run in
        one turn of the model thread."""
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, self._recall_now, query, k, n)

    def _recall_now(self, query: str, k: int, n: int) -> tuple[list[tuple[str, float]], dict[str, str], float]:
        vectors, _ = self._run([query], "query", None)
        return self._search_own(vectors[0], k, n)

    def _search_own(self, vector: Any, k: int, n: int) -> tuple[list[tuple[str, float]], dict[str, str], float]:
        assert self.index is not None, "the app calls recall only on replicas built with an index"
        started = time.perf_counter()  # the search alone, not its wait for the model thread
        hits, texts = self._documents().search_with_texts(self.index, self.kind, vector, k, n)
        return hits, texts, (time.perf_counter() - started) * 1000

    def lookup(self, ids: list[str]) -> list[str]:
        return self._documents().lookup(ids)

    def _documents(self) -> Documents:
        assert self.documents is not None, "the app routes index calls only to replicas built with an index"
        return self.documents

    # The tokenizer is the model thread's: Serve runs a sync method on a thread pool of its
    # own, where a fast tokenizer used at once from two threads fails ("Already borrowed").
    async def tokens(self, indices: list[int]) -> list[str]:
        return await asyncio.get_running_loop().run_in_executor(
            self._model_thread, self.model.tokenizer.convert_ids_to_tokens, indices
        )

    async def tokenize(self, texts: list[str], add_special_tokens: bool, prompt_name: str | None) -> list[list[Any]]:
        """TEI's /tokenize: per text, its tokens with byte offsets into the text (prompt in front);
        special tokens have no offsets. Not truncated, as TEI's."""
        return await asyncio.get_running_loop().run_in_executor(
            self._model_thread, self._tokenize_now, texts, add_special_tokens, prompt_name
        )

    def _tokenize_now(self, texts: list[str], add_special_tokens: bool, prompt_name: str | None) -> list[list[Any]]:
        prompt = self.model.resolve_prompt(None, prompt_name) or ""
        full = [prompt + t for t in texts]
        enc = self.model.tokenizer(
            full,
            add_special_tokens=add_special_tokens,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        out = []
        for text, ids, offsets, special in zip(
            full, enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"]
        ):
            pieces = self.model.tokenizer.convert_ids_to_tokens(ids)
            row = []
            for token_id, (start, stop), is_special, piece in zip(ids, offsets, special, pieces):
                if is_special:
                    row.append({"id": token_id, "text": piece, "special": True, "start": None, "stop": None})
                else:
                    # The tokenizer gives character offsets; TEI's are UTF-8 byte offsets.
                    begin = len(text[:start].encode())
                    end = begin + len(text[start:stop].encode())
                    piece = text[start:stop]
                    row.append({"id": token_id, "text": piece, "special": False, "start": begin, "stop": end})
            out.append(row)
        return out


class _TokenBatchWarning(logging.Filter):
    """Drops Ray Serve's "`max_batch_size` * `max_concurrent_batches` is larger than
    `max_ongoing_requests`" warning. Ray compares the two as counts of requests, but
    ``infer``'s batch size is in tokens (``batch_size_fn``): 32 requests of a few hundred
    tokens each fill an 8192-token batch, so the advice (raise max_ongoing_requests to 8192)
    would be wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("`max_batch_size` (") and "`max_ongoing_requests`" in message)


class _DrainWaitLines(logging.Filter):
    """Thins Serve's "Waiting for an additional 0.25s to shut down: N ongoing requests, ..." to
    one line every ``every_s`` per replica. A draining replica logs it at each look whether its
    requests are done, which ``app.DRAIN_POLL_S`` makes four a second: a stop with requests in
    flight filled the console and the replica's log file with them. By the record's own time."""

    def __init__(self, every_s: float = 2.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._last = float("-inf")

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Waiting for an additional"):
            return True
        if record.created - self._last < self.every_s:
            return False
        self._last = record.created
        return True


def quiet_serve_logs(*extra: logging.Filter) -> None:
    """Serve's log lines that only mislead or repeat, filtered in this replica's process (on
    the "ray.serve" logger its replica code logs to); once per filter type."""
    serve_log = logging.getLogger("ray.serve")
    have = {type(f) for f in serve_log.filters}
    for f in (_DrainWaitLines(), *extra):
        if type(f) not in have:
            serve_log.addFilter(f)


@serve.deployment
class ModelReplica(ModelRunner):
    """A ``ModelRunner`` as a Serve deployment: requests batch by tokens (``infer``)."""

    def __init__(
        self,
        kind: str,
        spec: DeploymentConfig,
        index: str | None = None,
        folders: Sequence[str] = (),
        pins: Mapping[str, str | None] | None = None,
    ) -> None:
        super().__init__(kind, spec, index, folders, pins=pins)
        self._active = 0  # requests in this replica now (the event loop's, so no lock)
        quiet_serve_logs(_TokenBatchWarning())  # before the batch queue exists
        # @serve.batch adds these setters at runtime; Ray's types give the method without them.
        self.infer.set_max_batch_size(spec.max_batch_tokens)  # pyright: ignore[reportAttributeAccessIssue]
        self.infer.set_batch_wait_timeout_s(spec.batch_wait_timeout_s)  # pyright: ignore[reportAttributeAccessIssue]

    async def ping(self) -> bool:
        """The ingress's readiness probe (/healthz, /health): a replica holds its model and answers
        (on the event loop: the model thread may be busy meanwhile)."""
        return True

    async def __call__(
        self, inputs: list[Any], task: str | None = None, prompt_name: str | None = None
    ) -> tuple[Any, list[int]]:
        """(outputs, tokens per input). dense: float32 [n, dim]; sparse: [(indices, values)] by
        weight; reranker: scores [n] for (query, document) pairs, through the model's activation,
        or its logits with task "logits". Tokens count what the model ran on: special tokens and
        prompt included, after truncation."""
        self._active += 1
        try:
            if self._active == 1 and len(inputs) == 1:
                # A single text alone (a query): nothing can join it yet, so skip the batching wait.
                # Larger requests still wait: sorted by length together with others that arrive,
                # they pad less (measured: 2 clients x 32 texts ran 16% slower without the wait).
                return await self._in_model_thread(inputs, task, prompt_name)
            texts = [t for pair in inputs for t in pair] if self.kind == "reranker" else inputs
            cost = min(self.spec.max_batch_tokens, max(1, estimate_tokens(texts, self.max_seq_length)))
            return await self.infer((inputs, (task, prompt_name), cost))
        finally:
            self._active -= 1

    @serve.batch(max_batch_size=8192, batch_wait_timeout_s=0.005, batch_size_fn=_batch_cost)
    async def infer(self, items: list[tuple[list[Any], tuple[str | None, str | None], int]]) -> list[Any]:
        results: list[Any] = [None] * len(items)
        for mode in dict.fromkeys(mode for _, mode, _ in items):
            members = [i for i, (_, m, _) in enumerate(items) if m == mode]
            flat = [x for i in members for x in items[i][0]]
            out, tokens = await self._in_model_thread(flat, *mode)
            at = 0
            for i in members:
                n = len(items[i][0])
                results[i] = (out[at : at + n], tokens[at : at + n])
                at += n
        return results

    async def recall(self, query: str, k: int, n: int) -> tuple[list[tuple[str, float]], dict[str, str], float]:
        """``ModelRunner.recall``, but a query that is not alone in this replica batches with the
        others first (``__call__``); the search then runs on the model thread: a large index's
        search is not short, and the event loop keeps taking requests meanwhile. A lone query
        counts as active until its search ends, so one arriving meanwhile batches."""
        if self._active:
            vectors, _ = await self([query], "query")
            return await asyncio.get_running_loop().run_in_executor(
                self._model_thread, self._search_own, vectors[0], k, n
            )
        self._active += 1
        try:
            return await super().recall(query, k, n)
        finally:
            self._active -= 1


def one_corpus(sources: Mapping[str, Any], where: str = "config") -> None:
    """/search fuses and looks up document ids across the indices it searches, so every index of
    an app must hold vectors of one corpus (``sources``: each index folder's source.json, parsed)."""
    from raytrieve._io import redact
    from raytrieve.errors import ConfigError

    corpora = {folder: source.corpus.config() for folder, source in sources.items()}
    first, corpus = next(iter(corpora.items()))
    for folder, other in corpora.items():
        if other != corpus:
            raise ConfigError(
                f"{where}: the index {redact(folder)} holds vectors of the corpus {redact(other.path)}, the index "
                f"{redact(first)} those of {redact(corpus.path)}; /search fuses and looks up documents across its "
                "indices, so they must all come from one corpus: build each index from vectors of the same corpus, "
                "or serve the other in its own app"
            )


class Documents:
    """The indices from `raytrieve index build` (by folder; each model searches its own) and the
    texts of their documents (one corpus: ``one_corpus``), both memory-mapped from the folders:
    a replica's memory does not grow with the corpus. Plain: the ``Retriever`` deployment is
    one, and so is every model replica that holds its own index (``colocate_index``)."""

    def __init__(
        self, folders: list[str], others: Sequence[str] = (), pins: Mapping[str, str | None] | None = None
    ) -> None:
        """``folders``: the index folders held here. ``others``: the app's other index folders,
        of which only source.json is read: every index of the app must come from one corpus,
        checked here too, so an app built without the start's checks is still refused.
        ``pins``: for a folder URI, the content the app was built with (``index_pin``): a replica
        that starts after the folder was written again reads that content, or is refused."""
        from raytrieve.index.build import load_indices, local_index, read_source
        from raytrieve.index.documents import DocumentStore

        # A folder URI is read from this node's copy (downloaded once per content per node).
        pins = pins or {}
        local = {folder: local_index(folder, pins.get(folder)) for folder in dict.fromkeys([*folders, *others])}
        self.indices = {folder: load_indices(local[folder]) for folder in folders}
        sources = {folder: ix.source for folder, ix in self.indices.items()}
        sources |= {folder: read_source(local[folder]) for folder in others if folder not in sources}
        one_corpus(sources, "serve")
        # Each folder's texts, in its rows' order (index build read them from the corpus and
        # checked them against the encoding): a hit's text is read by its row. The other
        # folders' too (memory-mapped: nothing is read until asked): /search looks up the texts
        # of its fused ids at one holder, and another folder's index may hold ids this one lacks.
        self.stores = {folder: DocumentStore(local[folder], source.rows) for folder, source in sources.items()}

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"documents": len(next(iter(self.stores.values())))}
        for folder, ix in self.indices.items():
            out[folder] = {k: len(i) if (i := getattr(ix, k)) is not None else None for k in ("dense", "sparse")}
        return out

    def _search(self, folder: str, kind: str, vector: Any, k: int) -> tuple[list[tuple[str, float]], np.ndarray]:
        ix = self.indices[folder]
        index = getattr(ix, kind)
        assert index is not None, "serve's preflight checks that each served model's index has its kind"
        if kind == "dense" and ix.source.dense is not None and ix.source.dense.truncate_dim:
            # Documents encoded with dense.truncate_dim (Matryoshka) kept their first dimensions:
            # so does the query. The direction is that of truncating first; the index's cosine
            # normalizes it, and a dot product's order does not depend on the query's length.
            vector = vector[: ix.source.dense.truncate_dim]
        batch = vector[None, :] if kind == "dense" else [vector]
        hits = index.search(batch, top_k=min(k, len(index)))
        found = len(hits.ids[0])
        return list(zip(hits.ids[0], hits.scores[0][:found].tolist())), hits.rows[0][:found]

    def search(self, folder: str, kind: str, vector: Any, k: int) -> list[tuple[str, float]]:
        """The top ``k`` of the ``kind`` (dense / sparse) index in ``folder`` for a query vector."""
        return self._search(folder, kind, vector, k)[0]

    def search_with_texts(
        self, folder: str, kind: str, vector: Any, k: int, n: int
    ) -> tuple[list[tuple[str, float]], dict[str, str]]:
        """``search``'s hits and the texts of the first ``n``: /search's answer mostly needs no
        ``lookup`` round trip after fusion (a hop over Serve costs milliseconds here)."""
        hits, rows = self._search(folder, kind, vector, k)
        texts = self.stores[folder].texts(rows[:n].tolist())
        return hits, dict(zip((i for i, _ in hits[:n]), texts))

    def lookup(self, ids: list[str]) -> list[str]:
        """The text of each id ("" for one no index here holds): after fusion, ids from any folder."""
        found: list[str | None] = [None] * len(ids)
        for store in self.stores.values():
            wanted = [i for i, text in enumerate(found) if text is None]
            if not wanted:
                break
            for i, text in zip(wanted, store.lookup([ids[i] for i in wanted])):
                found[i] = text
        return [text or "" for text in found]


@serve.deployment
class Retriever(Documents):
    """Every index of the app and its documents' texts, once, in a deployment of their own
    (``colocate_index: false``); the query encoders then send it their vectors."""

    def __init__(
        self, folders: list[str], others: Sequence[str] = (), pins: Mapping[str, str | None] | None = None
    ) -> None:
        quiet_serve_logs()
        super().__init__(folders, others, pins)

    async def ping(self) -> bool:
        """The ingress's readiness probe (/healthz, /health): a replica is up and answers."""
        return True
