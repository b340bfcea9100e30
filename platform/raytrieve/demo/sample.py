"""The demo's data: the pydocs dataset (docstrings of installed packages), or a BEIR folder of
the user's own (``DemoConfig.beir``).

- train: (query, document) pairs to fine-tune on (pydocs: of the train packages; BEIR: each
  train-split query with each of its relevant documents);
- dev: queries never trained on and a corpus, for the in-process evaluation and the fit of
  /search's settings (pydocs: pairs of the dev packages, which like the test packages the models
  never saw; BEIR: the dev split);
- test: queries and a corpus training never sees (pydocs: the test packages, numpy and scipy;
  BEIR: the test split); the corpus is what the encoding job encodes and Serve searches.

pydocs is known-item retrieval: each query has exactly one relevant document, the rest of its
docstring. BEIR qrels may grade several documents per query; a grade <= 0 is not relevant.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from raytrieve.demo.config import DemoConfig
from raytrieve.errors import DataError

if TYPE_CHECKING:
    from raytrieve.evaluate.data import EvalSet

COLUMNS = {"id", "query", "document", "package"}


@dataclass
class Split:
    queries: dict[str, str]  # query id -> text
    corpus: dict[str, str]  # document id -> text
    qrels: dict[str, dict[str, float]]  # query id -> document id -> grade (> 0: relevant)


@dataclass
class Samples:
    train_path: Path  # parquet with query, document
    train_pairs: int  # its rows
    dev: Split
    test: Split
    test_corpus_path: Path  # parquet with id, document: the encoding job's input
    key: str  # changes when any sample changes
    # Where the dev queries come from, in words after their count, when not from a split file of
    # their own (a BEIR folder without a dev split: train queries held out); None: their own split.
    dev_note: str | None = None
    # The pydocs set's rules and packages per split (its manifest's); None for a BEIR folder.
    pydocs: dict | None = None


def ensure_pydocs(folder: Path, log) -> dict:
    """Build the pydocs dataset unless a complete one made by these rules (``pydocs.RULES``:
    how docstrings become pairs; the id column) is already there."""
    import pyarrow.parquet as pq

    from raytrieve.data import pydocs

    manifest = folder / "manifest.json"
    if manifest.exists() and all((folder / f"{s}.parquet").exists() for s in pydocs.SPLITS):
        have = set.intersection(*(set(pq.read_schema(folder / f"{s}.parquet").names) for s in pydocs.SPLITS))
        found = json.loads(manifest.read_text())
        if COLUMNS <= have and found.get("rules") == pydocs.RULES:
            log(f"reusing {folder} ({found['rows']})")
            return found
        log(f"{folder} was built by an earlier version's rules; rebuilding it")
    log(f"building {folder} from the docstrings of installed packages (a minute)...")
    built = pydocs.build(folder, option="pydocs_dir")
    log("  " + ", ".join(f"{built['rows'][s]} {s} pairs ({', '.join(built[f'{s}_packages'])})" for s in pydocs.SPLITS))
    return built


def _take(rows: dict[str, list], order: np.ndarray) -> dict[str, list]:
    return {k: [v[i] for i in order] for k, v in rows.items()}


def prepare(cfg: DemoConfig, manifest: dict, out: Path) -> Samples:
    """Draw the samples with cfg.sample.seed and write the train and corpus files into ``out``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raytrieve._io import atomic_file
    from raytrieve.data import pydocs

    s = cfg.sample
    folder = Path(cfg.pydocs_dir)
    read = {
        name: pq.read_table(folder / f"{name}.parquet", columns=sorted(COLUMNS)).to_pydict() for name in pydocs.SPLITS
    }
    # Rows drawn from each split: the train pairs, the dev and test corpora (their first rows the queries).
    wanted = (("train", "train_pairs", s.train_pairs), ("dev", "dev_corpus", s.dev_corpus))
    wanted += (("test", "test_corpus", s.test_corpus),)
    for name, key, need in wanted:
        if len(read[name]["id"]) < need:
            raise DataError(
                f"{folder}/{name}.parquet: {len(read[name]['id'])} pairs, but sample.{key} = {need}; lower it"
            )
    rng = np.random.default_rng(s.seed)
    fit, dev, chosen = (_take(read[name], rng.permutation(len(read[name]["id"]))[:need]) for name, _, need in wanted)

    def split(rows: dict[str, list], n_queries: int) -> Split:
        return Split(
            queries={f"q-{d}": q for d, q in zip(rows["id"][:n_queries], rows["query"][:n_queries])},
            corpus=dict(zip(rows["id"], rows["document"])),
            qrels={f"q-{d}": {d: 1.0} for d in rows["id"][:n_queries]},
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
    return Samples(
        train_path,
        len(fit["query"]),
        split(dev, s.dev_queries),
        split(chosen, s.test_queries),
        corpus_path,
        key,
        pydocs={k: manifest.get(k) for k in ("rules", "train_packages", "dev_packages", "test_packages")},
    )


def prepare_beir(cfg: DemoConfig, out: Path) -> Samples:
    """The train pairs, dev and test splits of ``cfg.beir``, each drawn with cfg.sample.seed up to
    cfg.sample's sizes (a split's corpus holds at least its queries' relevant documents, even past
    the cap); the train and test corpus files are written into ``out``. Errors name the file and
    the split before any model loads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raytrieve._io import atomic_file
    from raytrieve.data.beir import whole_query_pairs, write_pairs
    from raytrieve.evaluate import data

    assert cfg.beir is not None, "prepare_beir reads cfg.beir"
    b, s = cfg.beir, cfg.sample
    root = Path(b.path).expanduser()
    if not root.is_dir():
        raise DataError(f"beir.path: {b.path}: no such folder; a BEIR folder holds corpus.jsonl, queries.jsonl, qrels/")
    # No dev split named: the folder's own, else train queries held out below (BEIR sets such as
    # SciFact ship only train and test).
    own_dev = "dev" not in (b.train_split, b.test_split) and (root / "qrels" / "dev.tsv").is_file()
    dev_name = b.dev_split or ("dev" if own_dev else None)
    names = {"beir.train_split": b.train_split, "beir.dev_split": dev_name, "beir.test_split": b.test_split}
    names = {k: v for k, v in names.items() if v is not None}
    if len(set(names.values())) < len(names):
        raise DataError(f"beir: the train, dev and test splits must differ, got {names}; name different qrels files")
    found: dict[str, tuple[Path, Path, Path]] = {}  # every split's files checked before any is read
    for key, name in names.items():
        choose = (
            f"Set {key}=<one of them>; the demo reads a train and a test split, and a dev split when one "
            "is named (leave beir.dev_split unset to hold out train queries as dev)"
        )
        try:
            found[key] = data.beir_files(root, name, choose)
        except DataError as e:
            raise DataError(f"{key}: {e}") from None
    splits: dict[str, data.EvalSet] = {}
    for key, files in found.items():
        base = next(iter(splits.values()), None)
        name = names[key]
        splits[key] = data.load_split(base, files[1], files[2], name) if base else data.load_files(*files, split=name)
    train, test = splits["beir.train_split"], splits["beir.test_split"]
    rng = np.random.default_rng(s.seed)
    dev_note = None
    if "beir.dev_split" in splits:
        dev = splits["beir.dev_split"]
    else:
        train, dev = _hold_out(train, s.dev_queries, rng)
        dev_note = f"{b.train_split} queries held out from training (of {len(dev.qrels) + len(train.qrels)})"
    # Held out means held out: the test figure must not come from queries trained or fitted on.
    for key, held, other, role in (
        ("beir.dev_split", dev, train, "the train split"),
        ("beir.test_split", test, train, "the train split"),
        ("beir.test_split", test, dev, "the dev split (the fit of /search)"),
    ):
        shared = sorted(set(held.qrels) & set(other.qrels))
        if shared:
            raise DataError(
                f"{key}: {len(shared)} of its queries are also in {role} (e.g. {shared[:3]}); a held-out split "
                "must not share queries with it"
            )

    # `raytrieve data beir-pairs` draws the same (at this cap and seed, from a folder with a dev split).
    pairs = whole_query_pairs(train.qrels, s.train_pairs, rng)
    if not pairs:
        raise DataError(
            f"beir.train_split: no query of {b.train_split} fits in sample.train_pairs = {s.train_pairs} with all its "
            "relevant documents; raise sample.train_pairs"
        )
    corpus = train.corpus  # one corpus for every split (load_split reads only queries and qrels)

    def split(held: data.EvalSet, n_queries: int, n_corpus: int) -> Split:
        ids = sorted(held.qrels)
        chosen = [ids[i] for i in rng.permutation(len(ids))[:n_queries]]
        qrels = {q: dict(held.qrels[q]) for q in chosen}
        relevant = list(dict.fromkeys(d for q in chosen for d, g in sorted(qrels[q].items()) if g > 0))
        known = set(relevant)
        others = [d for d in corpus if d not in known]
        extra = max(0, n_corpus - len(relevant))
        docs = relevant + [others[i] for i in sorted(rng.permutation(len(others))[:extra])]
        kept = set(docs)
        # Judgements of documents left out of the sample cannot be retrieved: drop them.
        qrels = {q: {d: g for d, g in judged.items() if d in kept} for q, judged in qrels.items()}
        return Split({q: held.queries[q] for q in chosen}, {d: corpus[d] for d in docs}, qrels)

    dev_split, test_split = split(dev, s.dev_queries, s.dev_corpus), split(test, s.test_queries, s.test_corpus)
    out.mkdir(parents=True, exist_ok=True)
    train_path, corpus_path = out / "train.parquet", out / "test_corpus.parquet"
    write_pairs(pairs, train.queries, corpus, train_path)
    with atomic_file(corpus_path) as tmp:
        pq.write_table(pa.table({"id": list(test_split.corpus), "document": list(test_split.corpus.values())}), tmp)
    read = [root / "corpus.jsonl", root / "queries.jsonl", *(root / "qrels" / f"{n}.tsv" for n in names.values())]
    stamp = {str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in read}  # a changed file: new samples
    key = json.dumps({"sample": s.model_dump(), "beir": b.model_dump(), "files": stamp}, sort_keys=True)
    return Samples(train_path, len(pairs), dev_split, test_split, corpus_path, key, dev_note)


def _hold_out(train: EvalSet, n: int, rng: np.random.Generator) -> tuple[EvalSet, EvalSet]:
    """``train`` (an evaluate.data.EvalSet) split into (train, dev) by query: ``n`` judged queries
    with a relevant document drawn for dev, at most a quarter of them, so most stay for training."""
    import dataclasses

    ids = sorted(q for q, judged in train.qrels.items() if any(g > 0 for g in judged.values()))
    count = min(n, len(ids) // 4)
    if count < 1:
        raise DataError(
            f"beir.train_split: {len(ids)} queries with a relevant document, too few to hold out a dev split "
            "from (at most a quarter of them); add a qrels file for dev and set beir.dev_split"
        )
    held = {ids[i] for i in rng.permutation(len(ids))[:count]}

    def part(keep: Callable[[str], bool]) -> EvalSet:
        qrels = {q: j for q, j in train.qrels.items() if keep(q)}
        queries = {q: t for q, t in train.queries.items() if q in qrels}
        # summary: the whole split's counts (load_files), not this part's: dropped.
        return dataclasses.replace(train, qrels=qrels, queries=queries, summary={})

    return part(lambda q: q not in held), part(lambda q: q in held)
