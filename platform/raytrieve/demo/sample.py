"""The demo's data, drawn from the pydocs dataset (docstrings of installed packages).

- train: (query, document) pairs of the train packages to fine-tune on;
- dev: other pairs of the same packages, never trained on: the "train domain" evaluation;
- test: queries and a corpus from the test packages (numpy, scipy), which training never sees;
  the corpus is what the encoding job encodes and Serve searches.

Known-item retrieval: each query has exactly one relevant document, the rest of its docstring.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raytrieve.demo.config import DemoConfig
from raytrieve.errors import DataError

COLUMNS = {"id", "query", "document", "package"}


@dataclass
class Split:
    queries: dict[str, str]  # query id -> text
    corpus: dict[str, str]  # document id -> text
    qrels: dict[str, str]  # query id -> its one relevant document id


@dataclass
class Samples:
    train_path: Path  # parquet with query, document
    dev: Split
    test: Split
    test_corpus_path: Path  # parquet with id, document: the encoding job's input
    key: str  # changes when any sample changes


def ensure_pydocs(folder: Path, log) -> dict:
    """Build the pydocs dataset unless a complete one (with the id column) is already there."""
    import pyarrow.parquet as pq

    from raytrieve.data import pydocs

    manifest = folder / "manifest.json"
    if manifest.exists() and all((folder / f"{s}.parquet").exists() for s in ("train", "test")):
        have = set(pq.read_schema(folder / "train.parquet").names) & set(pq.read_schema(folder / "test.parquet").names)
        if COLUMNS <= have:
            found = json.loads(manifest.read_text())
            log(f"reusing {folder} ({found['rows']})")
            return found
        log(f"{folder} predates the id column; rebuilding it")
    log(f"building {folder} from the docstrings of installed packages (a minute)...")
    built = pydocs.build(folder)
    log(
        f"  {built['rows']['train']} train pairs ({', '.join(built['train_packages'])}), "
        f"{built['rows']['test']} test pairs ({', '.join(built['test_packages'])})"
    )
    return built


def _take(rows: dict[str, list], order: np.ndarray) -> dict[str, list]:
    return {k: [v[i] for i in order] for k, v in rows.items()}


def prepare(cfg: DemoConfig, manifest: dict, out: Path) -> Samples:
    """Draw the samples with cfg.sample.seed and write the train and corpus files into ``out``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raytrieve._io import atomic_file

    s = cfg.sample
    folder = Path(cfg.pydocs_dir)
    train = pq.read_table(folder / "train.parquet", columns=sorted(COLUMNS)).to_pydict()
    test = pq.read_table(folder / "test.parquet", columns=sorted(COLUMNS)).to_pydict()
    need_train = s.train_pairs + s.dev_corpus
    if len(train["id"]) < need_train:
        raise DataError(
            f"{folder}/train.parquet: {len(train['id'])} pairs, but sample.train_pairs + sample.dev_corpus "
            f"= {need_train}; lower them"
        )
    if len(test["id"]) < s.test_corpus:
        raise DataError(
            f"{folder}/test.parquet: {len(test['id'])} pairs, but sample.test_corpus = {s.test_corpus}; lower it"
        )
    rng = np.random.default_rng(s.seed)
    train_order = rng.permutation(len(train["id"]))
    fit = _take(train, train_order[: s.train_pairs])
    held_out = _take(train, train_order[s.train_pairs : need_train])
    chosen = _take(test, rng.permutation(len(test["id"]))[: s.test_corpus])

    def split(rows: dict[str, list], n_queries: int) -> Split:
        return Split(
            queries={f"q-{d}": q for d, q in zip(rows["id"][:n_queries], rows["query"][:n_queries])},
            corpus=dict(zip(rows["id"], rows["document"])),
            qrels={f"q-{d}": d for d in rows["id"][:n_queries]},
        )

    out.mkdir(parents=True, exist_ok=True)
    train_path, corpus_path = out / "train.parquet", out / "test_corpus.parquet"
    with atomic_file(train_path) as tmp:
        pq.write_table(pa.table({"query": fit["query"], "document": fit["document"]}), tmp)
    with atomic_file(corpus_path) as tmp:
        pq.write_table(pa.table({"id": chosen["id"], "document": chosen["document"]}), tmp)
    key = json.dumps(
        {"sample": s.model_dump(), "packages": manifest.get("packages"), "rows": manifest.get("rows")}, sort_keys=True
    )
    return Samples(train_path, split(held_out, s.dev_queries), split(chosen, s.test_queries), corpus_path, key)
