"""`raytrieve evaluate`: metrics against hand computation and sentence-transformers'
InformationRetrievalEvaluator, the data loader and its errors, fusion and rerank against Serve's
/search pipeline (in process and over real HTTP), and the command end to end on real docstrings
with the shipped models (in process, through an index folder, and --compare)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from raytrieve.errors import ConfigError, DataError
from raytrieve.evaluate import data, report, run, scoring
from raytrieve.serve.schemas import Fusion, SearchRequest
from raytrieve.serve import tuning
from raytrieve.serve.search import Retrieval, SearchPipeline
from tests.index_helpers import write_dense_index

# -- metrics ---------------------------------------------------------------------------------


def test_graded_metrics_equal_hand_computation():
    ranking = ["a", "b", "c", "d"]
    qrels = {"q": {"b": 2.0, "d": 1.0, "x": 1.0, "z": 0.0}}  # x is never retrieved; z is judged not relevant
    names = ["ndcg@3", "mrr@3", "map@3", "recall@3", "precision@3", "ndcg@4", "recall@4", "precision@4", "map@4"]
    got = {m: v[0] for m, v in scoring.per_query({"q": ranking}, qrels, names).items()}
    idcg = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)  # grades 2, 1, 1 in the best order
    assert got["ndcg@3"] == pytest.approx((2 / math.log2(3)) / idcg)
    assert got["ndcg@4"] == pytest.approx((2 / math.log2(3) + 1 / math.log2(5)) / idcg)
    assert got["mrr@3"] == pytest.approx(1 / 2)
    assert got["recall@3"] == pytest.approx(1 / 3) and got["recall@4"] == pytest.approx(2 / 3)
    assert got["precision@3"] == pytest.approx(1 / 3) and got["precision@4"] == pytest.approx(2 / 4)
    # MAP@k divides by min(k, R) (sentence-transformers' convention): R = 3 relevant documents.
    assert got["map@3"] == pytest.approx((1 / 2) / 3)
    assert got["map@4"] == pytest.approx((1 / 2 + 2 / 4) / 3)


def test_metrics_equal_sentence_transformers_evaluator(st):
    """Binary qrels (ST reads relevance as a set), rankings shorter than the corpus so some
    relevant documents are never found; ST's compute_metrics scores the same rankings."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    rng = np.random.default_rng(3)
    corpus = {f"d{i:02d}": f"document {i}" for i in range(60)}
    ids = list(corpus)
    queries = {f"q{i:02d}": f"query {i}" for i in range(25)}
    relevant = {q: set(rng.choice(ids, size=rng.integers(1, 5), replace=False).tolist()) for q in queries}
    rankings = {q: rng.permutation(ids)[:30].tolist() for q in queries}
    for q in list(queries)[:8]:  # make some queries easy, so the metrics are not all near 0
        rankings[q] = sorted(relevant[q]) + [d for d in rankings[q] if d not in relevant[q]]
    ks = [1, 5, 10, 100]
    ref = InformationRetrievalEvaluator(
        queries, corpus, relevant, mrr_at_k=ks, ndcg_at_k=ks, accuracy_at_k=ks, precision_recall_at_k=ks, map_at_k=ks
    )
    # ST sorts a query's hits by (-score, corpus id): strictly falling scores keep our order.
    results = [[{"corpus_id": d, "score": float(-r)} for r, d in enumerate(rankings[q])] for q in ref.queries_ids]
    expected = ref.compute_metrics(results)
    qrels = {q: {d: 1.0 for d in rel} for q, rel in relevant.items()}
    for k in ks:
        names = [f"ndcg@{k}", f"mrr@{k}", f"map@{k}", f"recall@{k}", f"precision@{k}"]
        ours = scoring.per_query(rankings, qrels, names)
        for m in names:
            assert scoring.mean(ours[m]) == pytest.approx(float(expected[m.replace(f"@{k}", "@k")][k]), abs=1e-12), m


def test_paired_interval_contains_the_mean_difference_and_zero_for_equal_systems():
    rng = np.random.default_rng(0)
    a = rng.random(200)
    b = a + 0.1 + rng.normal(0, 0.05, 200)
    delta, lo, hi = scoring.paired_interval(a, b)
    assert delta == pytest.approx(float(np.mean(b - a)))
    assert lo < delta < hi and 0 < lo  # a clear shift is told from noise
    assert scoring.paired_interval(a, a) == (0.0, 0.0, 0.0)


def _evalset(queries: dict[str, str], qrels: dict[str, dict[str, float]], corpus=None) -> data.EvalSet:
    corpus = corpus or {f"d{i}": f"document {i}" for i in range(6)}
    return data.EvalSet(corpus, queries, qrels, Path("corpus.jsonl"), data.Columns(), None)


def test_compare_pairs_queries_by_id_on_the_same_data():
    qrels = {f"q{i}": {f"d{i}": 1.0} for i in range(6)}
    texts = {q: f"query {q}" for q in qrels}
    good = {q: [f"d{q[1:]}", "x"] for q in qrels}  # the relevant document first
    bad = {q: ["x", f"d{q[1:]}"] for q in qrels}  # second
    everything = data.fingerprints(_evalset(texts, qrels))
    before = report.build({"dense": bad}, qrels, 10, 100, {"name": None, "data_fingerprints": everything})
    before = json.loads(json.dumps(before))  # as read back from evaluation.json
    subset = {q: qrels[q] for q in ("q0", "q1", "q2", "q3")}  # fewer queries, in another run
    fewer = data.fingerprints(_evalset({q: texts[q] for q in subset}, subset))
    assert fewer["queries"] == {q: everything["queries"][q] for q in subset} and fewer["corpus"] == everything["corpus"]
    after = report.build({"dense": {q: good[q] for q in subset}}, subset, 10, 100, {"data_fingerprints": fewer})
    cmp = report.compare(after, before, "before.json")
    assert (cmp["queries"], cmp["only_here"], cmp["only_previous"], cmp["same_corpus"]) == (4, 0, 2, True)
    mrr = cmp["stages"]["dense"]["mrr@10"]
    assert (mrr["previous"], mrr["current"], mrr["delta"], mrr["ci95"]) == (0.5, 1.0, 0.5, [0.5, 0.5])

    # Checked before any model loads: the same metrics (a run at another --k shared only recall@100
    # and compared nothing else, silently), a stage of the same name, some query in common.
    report.check_comparable(before, "before.json", 10, 100, fewer, ["dense"])
    report.check_comparable(before, "before.json", 10, 50, fewer)  # another --recall-k: the @10 metrics compare
    with pytest.raises(DataError, match=r"before.json: its metrics are \['ndcg@10'.*this run's \['ndcg@5'.*same --k"):
        report.check_comparable(before, "before.json", 5, 100, fewer)
    with pytest.raises(DataError, match=r"before.json: shares no stage with this run \(its stages \['dense'\], "
                                        r"this run's \['fused', 'reranked', 'sparse:a', 'sparse:b'\]\)"):
        report.check_comparable(before, "before.json", 10, 100, fewer, ["sparse:a", "sparse:b", "fused", "reranked"])
    elsewhere = data.fingerprints(_evalset({"q7": "query q7", "q8": "query q8"}, {"q7": {"d1": 1.0}, "q8": {"d2": 1.0}}))
    with pytest.raises(DataError, match="before.json: no query id in common with this run"):
        report.check_comparable(before, "before.json", 10, 100, elsewhere)

    # Ids in common are no proof of the same data: another dataset's q1 is another query, and the
    # same query judged otherwise is another question. Both are refused, naming examples.
    for changed in ({**texts, "q1": "an unrelated question"}, texts):
        judged = {**qrels, "q2": {"d5": 1.0}} if changed is texts else qrels
        other = data.fingerprints(_evalset(changed, judged))
        with pytest.raises(DataError, match=r"before.json: 1 of the 6 query ids both runs scored have another text "
                                            r"or other judgements there, e.g. \['q[12]'\]: it was scored on other data"):
            report.check_comparable(before, "before.json", 10, 100, other)
    # Another corpus (titles added, say) compares, and the report says so.
    titled = data.fingerprints(_evalset(texts, qrels, {f"d{i}": f"Title. document {i}" for i in range(6)}))
    report.check_comparable(before, "before.json", 10, 100, titled)
    again = report.build({"dense": good}, qrels, 10, 100, {"data_fingerprints": titled})
    again["compare"] = report.compare(again, before, "before.json")
    assert again["compare"]["same_corpus"] is False
    assert "each run over its own corpus" in report.markdown(again)
    assert any("on another corpus" in line for line in report.console(again))
    # A report of an older raytrieve (no fingerprints) is paired by id, with a warning.
    older = {k: v for k, v in before.items() if k != "data_fingerprints"}
    report.check_comparable(older, "older.json", 10, 100, fewer)
    assert report.compare(after, older, "older.json")["same_corpus"] is None


# -- the loader ------------------------------------------------------------------------------


def write_beir(root: Path, corpus: list[dict], queries: list[dict], qrels: str, split: str = "test") -> Path:
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    (root / "qrels" / f"{split}.tsv").write_text(qrels)
    return root


CORPUS = [
    {"_id": "d1", "title": "Berlin", "text": "Berlin has 3.5 million inhabitants."},
    {"_id": "d2", "title": "", "text": "sorted() returns a new sorted list."},
    {"_id": 3, "text": "The Eiffel Tower was completed in 1889."},
]
QUERIES = [
    {"_id": "q1", "text": "how many people live in Berlin"},
    {"_id": "q2", "text": "sort a list"},
    {"_id": "q3", "text": "a query nobody judged"},
]
QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\t3\t0\nq2\td2\t1\n"


def test_beir_folder_with_graded_qrels(tmp_path, caplog):
    with caplog.at_level("INFO", logger="raytrieve.evaluate"):
        got = data.load_beir(write_beir(tmp_path, CORPUS, QUERIES, QRELS))
    assert got.corpus == {
        "d1": "Berlin Berlin has 3.5 million inhabitants.",  # the title in front, as the encoding job joins it
        "d2": "sorted() returns a new sorted list.",
        "3": "The Eiffel Tower was completed in 1889.",
    }
    assert got.queries == {"q1": "how many people live in Berlin", "q2": "sort a list"}
    assert got.qrels == {"q1": {"d1": 2.0, "3": 0.0}, "q2": {"d2": 1.0}}
    assert got.summary["dropped_queries"] == 1 and got.summary["graded"] is True
    assert got.summary["judged_without_relevant"] == 0
    assert "1 of 3 queries are not judged in" in caplog.text and "no relevant document" not in caplog.text

    # A judged query whose every grade is 0 is told apart from the other splits' queries.
    caplog.clear()
    with caplog.at_level("INFO", logger="raytrieve.evaluate"):
        got = data.load_beir(write_beir(tmp_path / "zero", CORPUS, QUERIES, QRELS + "q3\td2\t0\n"))
    assert got.summary["dropped_queries"] == 1 and got.summary["judged_without_relevant"] == 1
    assert "1 queries judged in" in caplog.text and "have no relevant document (every score <= 0)" in caplog.text
    assert "'q3'" in caplog.text and "not judged" not in caplog.text

    # A title with a blank text (BEIR's title-only documents, a paper without an abstract) is the
    # title alone, as BEIR encodes it; it stopped the run before, advising to remove a judged row.
    titled = [*CORPUS, {"_id": "d4", "title": "Eiffel Tower", "text": ""}]
    got = data.load_beir(write_beir(tmp_path / "titled", titled, QUERIES, QRELS + "q1\td4\t1\n"))
    assert got.corpus["d4"] == "Eiffel Tower" and got.qrels["q1"]["d4"] == 1.0


def test_a_byte_order_mark_is_read_as_the_same_data(tmp_path):
    plain = data.load_beir(write_beir(tmp_path / "plain", CORPUS, QUERIES, QRELS))
    bom = write_beir(tmp_path / "bom", CORPUS, QUERIES, QRELS)
    for path in (bom / "corpus.jsonl", bom / "queries.jsonl", bom / "qrels" / "test.tsv"):
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # what Notepad and PowerShell write
    got = data.load_beir(bom)
    assert (got.corpus, got.queries, got.qrels) == (plain.corpus, plain.queries, plain.qrels)


def test_files_with_named_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a", "b"], "body": ["first text", "second text"]}), tmp_path / "docs.parquet")
    (tmp_path / "q.jsonl").write_text('{"qid": 7, "question": "which is first"}\n')
    (tmp_path / "rel.csv").write_text("qid,doc,grade\n7,a,1\n")
    columns = data.Columns(
        corpus_id="id",
        corpus_text="body",
        query_id="qid",
        query_text="question",
        qrels_query="qid",
        qrels_doc="doc",
        qrels_score="grade",
    )
    got = data.load_files(tmp_path / "docs.parquet", tmp_path / "q.jsonl", tmp_path / "rel.csv", columns)
    assert got.corpus == {"a": "first text", "b": "second text"}
    assert got.queries == {"7": "which is first"} and got.qrels == {"7": {"a": 1.0}}
    with pytest.raises(
        DataError, match=r"no column\(s\) \['_id', 'text'\]; the file has \['id', 'body'\].*--column corpus_id=<column>"
    ):
        data.load_files(tmp_path / "docs.parquet", tmp_path / "q.jsonl", tmp_path / "rel.csv")


def _drop(path: str):
    return lambda root: (root / path).unlink()


def _append(path: str, text: str):
    def change(root: Path) -> None:
        with open(root / path, "a") as f:
            f.write(text)

    return change


def _replace(path: str, text: str):
    return lambda root: (root / path).write_text(text)


BAD_INPUTS = {
    "no corpus": (_drop("corpus.jsonl"), ["corpus.jsonl: no such file", "corpus.jsonl, queries.jsonl"]),
    "bad json": (_append("corpus.jsonl", '{"_id": "d9", "text": \n'), ["corpus.jsonl:4:", "not valid JSON"]),
    "no text key": (_append("queries.jsonl", '{"_id": "q9"}\n'), ["queries.jsonl:4:", "--column query_text="]),
    "blank text": (_append("corpus.jsonl", '{"_id": "d9", "title": "", "text": "  "}\n'),
                   ["corpus.jsonl:4:", "'d9' has a blank text and no title; give it text (judgements may name it)"]),
    "blank query": (lambda root: (_append("queries.jsonl", '{"_id": "q9", "text": " "}\n')(root),
                                  _append("qrels/test.tsv", "q9\td1\t1\n")(root)),
                    ["queries.jsonl:4:", "query 'q9' has a blank text and", "test.tsv judges it; give it its text"]),
    "duplicate id": (_append("corpus.jsonl", '{"_id": "d1", "text": "x"}\n'), ["corpus.jsonl:4:", "first at"]),
    "unknown docs": (_append("qrels/test.tsv", "q2\td7\t1\nq2\td8\t1\n"), ["2 document id(s)", "'d7', 'd8'"]),
    "unknown query": (_append("qrels/test.tsv", "q8\td1\t1\n"), ["1 query id(s)", "'q8'", "queries.jsonl"]),
    "bad score": (_append("qrels/test.tsv", "q2\td1\thigh\n"), ["test.tsv:5:", "score 'high'", "relevance grade"]),
    "nan score": (_append("qrels/test.tsv", "q2\td1\tnan\n"), ["test.tsv:5:", "not a finite number"]),
    "fields": (_append("qrels/test.tsv", "q2 d1 1\n"), ["test.tsv:5:", "1 field(s)", "tabs"]),
    "trec": (_append("qrels/test.tsv", "q2\tQ0\td1\t1\n"), ["test.tsv:5:", "4 field(s)", "TREC qrels", "drop the second"]),
    "no header": (_replace("qrels/test.tsv", "q1\td1\t1\n"), ["test.tsv:1:", "header", "query-id"]),
    "empty split": (_replace("qrels/test.tsv", "query-id\tcorpus-id\tscore\n"), ["test.tsv", "split is empty"]),
    "none relevant": (
        _replace("qrels/test.tsv", QRELS.replace("\t2\n", "\t0\n").replace("d2\t1", "d2\t0")),
        ["no query has a relevant document", "score > 0"],
    ),
    "twice": (_append("qrels/test.tsv", "q1\td1\t1\n"), ["test.tsv:5:", "judged again (first at", "test.tsv:2"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_file_line_and_fix(tmp_path, case):
    change, fragments = BAD_INPUTS[case]
    root = write_beir(tmp_path, CORPUS, QUERIES, QRELS)
    change(root)
    with pytest.raises(DataError) as e:
        data.load_beir(root)
    for fragment in fragments:
        assert fragment in str(e.value), (case, str(e.value))


def test_a_blank_query_another_split_judges_is_left_out(tmp_path):
    """BEIR's queries.jsonl holds every split's queries: one blank query of another split stopped
    every evaluation of this one."""
    root = write_beir(tmp_path, CORPUS, QUERIES, QRELS)
    _append("queries.jsonl", '{"_id": "q9", "text": " "}\n')(root)
    assert data.load_beir(root).queries == data.load_beir(write_beir(tmp_path / "b", CORPUS, QUERIES, QRELS)).queries


def test_missing_split_lists_the_splits_there(tmp_path):
    root = write_beir(tmp_path, CORPUS, QUERIES, QRELS, split="dev")
    with pytest.raises(DataError, match=r"test.tsv: no such file; the splits there are \['dev'\]. Pass --split dev"):
        data.load_beir(root)
    # A missing --tune-on split: the fix names --tune-on, not --split.
    import argparse

    from raytrieve.evaluate.command import add_arguments, evaluate

    write_beir(root, CORPUS, QUERIES, QRELS, split="test")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--data", str(root), "--dense", "m", "--tune-on", "validation", "--out", str(tmp_path / "o")])
    with pytest.raises(DataError, match=r"validation.tsv: no such file; the splits there are \['dev', 'test'\]. pass "
                                        r"one of them as --tune-on"):
        evaluate(args)


def _count_reads(monkeypatch) -> dict[Path, int]:
    """How many times each corpus / queries file is read (a spy on the loader's row reader)."""
    from collections import Counter

    reads: Counter[Path] = Counter()
    rows = data._rows

    def counted(path, *args, **kwargs):
        reads[Path(path)] += 1
        return rows(path, *args, **kwargs)

    monkeypatch.setattr(data, "_rows", counted)
    return reads


def test_another_split_over_the_loaded_corpus_reads_only_its_queries_and_qrels(tmp_path, monkeypatch):
    """load_split (--tune-on): the same EvalSet as loading the files again, without the second
    corpus read; its errors still name the corpus file; a missing BEIR split lists the others."""
    root = write_beir(tmp_path, CORPUS, QUERIES, QRELS)
    (root / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq3\t3\t1\n")
    base = data.load_beir(root)
    reads = _count_reads(monkeypatch)
    _, queries, qrels = data.beir_files(root, "dev")
    got = data.load_split(base, queries, qrels, split="dev")
    assert dict(reads) == {root / "queries.jsonl": 1}
    assert got == data.load_beir(root, "dev")  # the reference: every file read again
    assert got.queries == {"q3": "a query nobody judged"} and got.qrels == {"q3": {"3": 1.0}}
    (root / "qrels" / "bad.tsv").write_text("query-id\tcorpus-id\tscore\nq3\td9\t1\n")
    with pytest.raises(DataError, match=r"bad.tsv: 1 document id\(s\) are not in .*corpus.jsonl, e.g. 'd9'"):
        data.load_split(base, queries, root / "qrels" / "bad.tsv")
    with pytest.raises(DataError, match=r"nope.tsv: no such file; the splits there are \['bad', 'dev', 'test'\]"):
        data.beir_files(root, "nope")


def test_tune_on_a_qrels_file_reads_the_corpus_once(tmp_path, tiny_models, monkeypatch):
    """--corpus/--queries/--qrels with --tune-on OTHER_QRELS: the fit sees the other file's
    queries, over the corpus read once."""
    corpus = [{"_id": f"d{i}", "text": f"document {i} " + "word " * (i % 5)} for i in range(12)]
    queries = [{"_id": f"q{i}", "text": f"document {i} word"} for i in range(12)]
    root = write_beir(tmp_path, corpus, queries, "".join(
        ["query-id\tcorpus-id\tscore\n", *(f"q{i}\td{i}\t1\n" for i in range(6))]))
    tune = "".join(f"q{i}\td{i}\t1\n" for i in range(6, 12))
    (tmp_path / "tune.tsv").write_text("query-id\tcorpus-id\tscore\n" + tune)
    reads = _count_reads(monkeypatch)
    out = tmp_path / "out"
    rep = _evaluate(["--corpus", str(root / "corpus.jsonl"), "--queries", str(root / "queries.jsonl"),
                     "--qrels", str(root / "qrels" / "test.tsv"), "--dense", str(tiny_models["dense"]),
                     "--sparse", str(tiny_models["sparse"]), "--tune-on", str(tmp_path / "tune.tsv"),
                     "--bootstrap-rounds", "50", "--out", str(out), "--no-chart"])
    assert reads[root / "corpus.jsonl"] == 1 and reads[root / "queries.jsonl"] == 2
    assert rep["tuning"]["queries"] == 6 and rep["tuning"]["split"] == str(tmp_path / "tune.tsv")
    assert set(rep["per_query"]["tuned"]["ndcg@10"]) == {f"q{i}" for i in range(6)}
    assert rep["data"]["files"]["qrels"] == str(root / "qrels" / "test.tsv")


# -- fusion and rerank are /search's ---------------------------------------------------------

DOCS = {f"d{i}": f"document {i} " + "word " * (i % 5) for i in range(12)}
Q_TEXT = {"qa": "document 3 word", "qb": "document 7"}


def _lists() -> run.Lists:
    rng = np.random.default_rng(1)
    out: run.Lists = {}
    for name in ("dense", "sparse"):
        out[name] = {}
        for q in Q_TEXT:
            ids = rng.permutation(list(DOCS))[:8].tolist()
            out[name][q] = list(zip(ids, sorted(rng.random(8).tolist(), reverse=True)))
    return out


def _cross(pairs: list[tuple[str, str]]) -> list[float]:
    """A stand-in cross-encoder with ties: shared words."""
    return [float(len(set(q.split()) & set(t.split()))) for q, t in pairs]


def _pipeline(lists: run.Lists, qid: str) -> SearchPipeline:
    def retrieval(name: str) -> Retrieval:
        async def encode(query: str):
            return qid

        async def search(vector, k: int):
            return lists[name][vector][:k]

        return Retrieval(encode, search)

    async def lookup(ids: list[str]) -> list[str]:
        return [DOCS[i] for i in ids]

    async def rerank(pairs: list[tuple[str, str]]) -> list[float]:
        return _cross(pairs)

    return SearchPipeline({n: retrieval(n) for n in lists}, lookup, rerank)


def _search_body(options: run.RunOptions) -> dict:
    return {
        "top_k": options.rerank_depth,
        "recall": {"dense": options.depth, "sparse": options.depth},
        "fusion": options.fusion.model_dump(),
        "rerank": True,
        "rerank_depth": options.rerank_depth,
        "return_text": False,
        "return_stages": True,
    }


@pytest.mark.parametrize("fusion", [Fusion(), Fusion(method="convex", dense_weight=0.8, sparse_weight=0.2)])
def test_fusion_and_rerank_equal_the_search_pipeline(fusion, caplog):
    lists = _lists()
    options = run.RunOptions(depth=8, fusion=fusion, rerank_depth=4)
    with caplog.at_level(logging.INFO, logger="raytrieve.evaluate"):
        ours = run.combine(lists, {"dense": "dense", "sparse": "sparse"}, options, Q_TEXT, DOCS, _cross)
    # The rerank says what it starts before it runs (it runs silently in a log file otherwise).
    pairs = sum(min(4, len(ours["fused"][q])) for q in Q_TEXT)
    assert f"reranking {pairs} pairs ({len(Q_TEXT)} queries, up to 4 candidates each)" in caplog.messages[0]
    for qid, text in Q_TEXT.items():
        request = SearchRequest(query=text, **_search_body(options))
        answer = asyncio.run(_pipeline(lists, qid).search(request))
        fused = [d for d, _ in answer["stages"]["fused"]]
        assert ours["fused"][qid] == fused
        head = [h["id"] for h in answer["hits"]]
        assert ours["reranked"][qid] == head + fused[4:]


@pytest.fixture
def search_app():
    """A real HTTP server whose /search is the /search pipeline over ``_lists()`` (with or
    without a reranker, with or without a bearer token), as Serve's ingress answers."""
    from raytrieve.serve.search import SearchError

    servers = []

    def start(rerank: bool = True, token: str | None = None, defaults: dict | None = None) -> str:
        """``defaults``: the app's search: settings, under each request as the ingress merges them."""
        from raytrieve.serve.search import with_defaults

        lists = _lists()
        by_text = {text: qid for qid, text in Q_TEXT.items()}

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                if token is not None and self.headers.get("authorization") != f"Bearer {token}":
                    return self.answer(401, {"error": "missing or wrong bearer token (Authorization: Bearer ...)"})
                pipeline = _pipeline(lists, by_text[body["query"]])
                if not rerank:
                    pipeline.rerank = None
                try:
                    request = with_defaults(SearchRequest(**body), defaults or {})
                    self.answer(200, asyncio.run(pipeline.search(request)))
                except SearchError as e:
                    self.answer(422, {"error": str(e)})

            def answer(self, status: int, payload: dict) -> None:
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/"

    yield start
    for server in servers:
        server.shutdown()


def test_url_rankings_read_every_stage_over_http(search_app):
    from raytrieve.evaluate.remote import url_rankings

    options = run.RunOptions(depth=8, rerank_depth=3)
    given = {"recall": {"dense": 8, "sparse": 8}, "rerank_depth": 3}
    got, settings = url_rankings(search_app(), Q_TEXT, given, clients=2)
    expected = run.combine(_lists(), {"dense": "dense", "sparse": "sparse"}, options, Q_TEXT, DOCS, _cross)
    assert got == expected and set(got) == {"dense", "sparse", "fused", "reranked"}
    assert settings == {"recall": {"dense": 8, "sparse": 8}, "fusion": Fusion().model_dump(), "rerank": True,
                        "rerank_depth": 3, "rerank_weight": 1.0}


def test_url_measures_the_app_as_served_under_the_flags_given(search_app):
    """--url sent evaluate's own defaults for every setting (recall 100, RRF k=60, rerank depth 50,
    weight 1), overriding the app's search: settings: it measured a configuration nobody served."""
    from raytrieve.evaluate.remote import url_rankings

    served = {"recall": {"dense": 6, "sparse": 8}, "rerank_depth": 2, "rerank_weight": 1.0,
              "fusion": {"method": "convex", "dense_weight": 0.7, "sparse_weight": 0.3, "normalization": "zscore"}}
    url = search_app(defaults=served)
    got, settings = url_rankings(url, Q_TEXT, {}, clients=2)
    assert settings == {**served, "fusion": {**served["fusion"], "k": 60.0}, "rerank": True}
    lists = {name: {q: ranked[:served["recall"][name]] for q, ranked in per_q.items()} for name, per_q in _lists().items()}
    options = run.RunOptions(fusion=Fusion(**served["fusion"]), rerank_depth=2)
    assert got == run.combine(lists, {"dense": "dense", "sparse": "sparse"}, options, Q_TEXT, DOCS, _cross)
    # A flag given is sent, field by field: the served weights stay under --fusion rrf's k.
    _, settings = url_rankings(url, Q_TEXT, {"fusion": {"k": 10.0}})
    assert settings["fusion"] == {**served["fusion"], "k": 10.0}


def test_url_warns_when_the_app_recalls_fewer_than_recall_k(search_app, tmp_path, caplog):
    """The command end to end over HTTP: an app that recalls 6 dense and 8 sparse candidates
    measured at --recall-k 10 gets a warning naming both and the flag that lifts it; the report's
    settings are what the app ran. With --depth 10 sent, the app recalls 10 and nothing is said."""
    from raytrieve.cli import build_parser
    from raytrieve.evaluate.command import evaluate

    corpus = [{"_id": d, "text": t} for d, t in DOCS.items()]
    queries = [{"_id": q, "text": t} for q, t in Q_TEXT.items()]
    root = write_beir(tmp_path / "data", corpus, queries, "query-id\tcorpus-id\tscore\nqa\td3\t1\nqb\td7\t1\n")
    url = search_app(defaults={"recall": {"dense": 6, "sparse": 8}, "rerank_depth": 2})
    flags = ["evaluate", "--data", str(root), "--url", url, "--k", "5", "--recall-k", "10", "--no-chart"]
    with caplog.at_level(logging.WARNING, logger="raytrieve.evaluate"):
        rep = evaluate(build_parser().parse_args([*flags, "--out", str(tmp_path / "a")]))
    warned = [m for m in caplog.messages if "the app recalls" in m]
    assert warned == [
        "the app recalls 6 dense and 8 sparse candidates: each first stage's recall@10 counts only those (the app "
        "as served); pass --depth 10 to recall 10 (the fused and reranked stages then differ from the app)"
    ]
    assert rep["settings"]["depth"] == 8 and rep["settings"]["rerank_depth"] == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="raytrieve.evaluate"):
        rep = evaluate(build_parser().parse_args([*flags, "--depth", "10", "--out", str(tmp_path / "b")]))
    assert not [m for m in caplog.messages if "the app recalls" in m] and rep["settings"]["depth"] == 10


def test_url_without_a_reranker_and_with_a_token(search_app, monkeypatch):
    from raytrieve.errors import InputError
    from raytrieve.evaluate.remote import url_rankings

    url = search_app(rerank=False, token="s3cret")
    options = run.RunOptions(depth=8, rerank_depth=3)
    given = {"recall": {"dense": 8, "sparse": 8}, "rerank_depth": 3}
    monkeypatch.delenv("RAYTRIEVE_API_TOKEN", raising=False)
    with pytest.raises(InputError, match=r"401.*set RAYTRIEVE_API_TOKEN"):
        url_rankings(url, Q_TEXT, given)
    monkeypatch.setenv("RAYTRIEVE_API_TOKEN", "s3cret")
    got, _ = url_rankings(url, Q_TEXT, given)
    assert got == run.combine(_lists(), {"dense": "dense", "sparse": "sparse"}, options, Q_TEXT, DOCS, None)
    assert set(got) == {"dense", "sparse", "fused"}


# -- the command end to end ------------------------------------------------------------------


QUERY_COUNT = 24


PYDOCS_PACKAGES = ("yaml", "tqdm", "packaging", "click")  # click's only where the others give fewer than 150


def _pydocs_pairs() -> list:
    from raytrieve.data.pydocs import deduplicate, package_pairs

    return deduplicate([p for pkg in PYDOCS_PACKAGES for p in package_pairs(pkg, max_files=200)])


@pytest.fixture(scope="module")
def pydocs_beir(tmp_path_factory) -> Path:
    """Known-item retrieval on real docstrings: a summary is the query, the rest of its
    docstring the one relevant document; 24 queries over 150 documents."""
    pairs = _pydocs_pairs()
    assert len(pairs) >= 150, f"the docstrings of {PYDOCS_PACKAGES} give enough pairs"
    pairs = pairs[:150]
    corpus = [{"_id": f"doc{i}", "title": "", "text": p.document[:600]} for i, p in enumerate(pairs)]
    queries = [{"_id": f"q{i}", "text": p.query} for i, p in enumerate(pairs[:QUERY_COUNT])]
    qrels = "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\tdoc{i}\t1\n" for i in range(QUERY_COUNT))
    return write_beir(tmp_path_factory.mktemp("pydocs_beir"), corpus, queries, qrels)


def _evaluate(args: list[str]) -> dict:
    from raytrieve.cli import main

    out = args[args.index("--out") + 1]
    assert main(["evaluate", *args]) == 0
    return json.loads((Path(out) / "evaluation.json").read_text())


COMMON = ["--max-seq-length", "128", "--bootstrap-rounds", "500"]
MODELS = ["--dense", "all-minilm-l6-v2", "--sparse", "splade-tiny"]


@pytest.fixture(scope="module")
def first_run(pydocs_beir, tmp_path_factory) -> tuple[dict, Path]:
    """Every stage in process: dense, sparse, fused (RRF), reranked (top 4)."""
    out = tmp_path_factory.mktemp("first")
    reranker = ["--reranker", "ms-marco-minilm-l12-v2", "--rerank-depth", "4"]
    args = ["--data", str(pydocs_beir), *COMMON, *MODELS, *reranker, "--out", str(out), "--name", "first"]
    return _evaluate(args), out


def test_compare_names_the_dtypes_of_paired_stages_only():
    """dtypes_used is keyed by stage; stages pair by name, so a stage only one run has (or had
    under another name) is no difference; an explicit dtype computed alike is none either."""
    from raytrieve.evaluate.report import run_differences

    f32, bf16 = {"documents": ["float32"], "queries": ["float32"]}, {"documents": ["bfloat16"], "queries": ["float32"]}
    before = {"settings": {"dtype": "auto", "dtypes_used": {"dense": f32, "sparse:model": f32}}}
    now = {"settings": {"dtype": "float32", "dtypes_used": {"dense": f32, "sparse:splade/model": f32}}}
    assert run_differences(now, before) == {}
    # No stage in both: the dtype asked is all there is to tell them by.
    assert list(run_differences({"settings": {**now["settings"], "dtypes_used": {}}}, before)) == ["settings.dtype"]
    now["settings"]["dtypes_used"]["dense"] = bf16
    assert sorted(run_differences(now, before)) == ["settings.dtype", "settings.dtypes_used"]


def test_evaluate_every_stage_then_an_index_run_compared(first_run, pydocs_beir, tmp_path, minilm_dir):
    first, first_out = first_run
    common = ["--data", str(pydocs_beir), *COMMON]
    names = ["ndcg@10", "mrr@10", "map@10", "recall@10", "precision@10", "recall@100"]
    assert first["metrics"] == names and list(first["stages"]) == ["dense", "sparse", "fused", "reranked"]
    assert first["data"]["queries"] == QUERY_COUNT and first["data"]["documents"] == 150
    assert first["settings"]["reranker_max_seq_length"] == 128  # --max-seq-length's, without a length of its own
    f32 = ["float32"]
    assert first["settings"]["dtypes_used"] == {"dense": {"documents": f32, "queries": f32},
                                                "sparse": {"documents": f32, "queries": f32}, "reranked": {"pairs": f32}}
    for stage, means in first["stages"].items():
        assert set(means) == set(names)
        for m in names:
            per_query = first["per_query"][stage][m]
            assert len(per_query) == QUERY_COUNT and means[m] == pytest.approx(np.mean(list(per_query.values())))
    best = first["best_first_stage"]
    assert best == max(("dense", "sparse"), key=lambda s: first["stages"][s]["ndcg@10"])
    pairs = {(c["stage"], c["baseline"]) for c in first["comparisons"]}
    assert pairs == {(s, best) for s in first["stages"] if s != best} | {("reranked", "fused")}
    for c in first["comparisons"]:
        for m, v in c["metrics"].items():
            lo, hi = v["ci95"]
            assert lo <= v["delta"] <= hi
            assert v["delta"] == pytest.approx(first["stages"][c["stage"]][m] - first["stages"][c["baseline"]][m])
    # Dense retrieval on clear queries is far better than chance (a random order of the corpus).
    rng = np.random.default_rng(0)
    ids = [f"doc{i}" for i in range(150)]
    qrels = {f"q{i}": {f"doc{i}": 1.0} for i in range(QUERY_COUNT)}
    chance = scoring.per_query({q: rng.permutation(ids).tolist() for q in qrels}, qrels, ["ndcg@10"])
    assert first["stages"]["dense"]["ndcg@10"] > scoring.mean(chance["ndcg@10"]) + 0.4
    assert first["stages"]["dense"]["recall@100"] > 0.9
    md = (first_out / "evaluation.md").read_text()
    assert "| reranked − fused |" in md and (first_out / "evaluation.png").stat().st_size > 0

    # The same dense model through an index folder (the layout `raytrieve index build` writes),
    # compared with the first run: same rankings, so every paired difference is 0.
    index = _dense_index(tmp_path / "index", pydocs_beir, minilm_dir)
    # The report names the vectors' dtypes as the encoding job's manifest records them (the
    # actors' choice under dtype: auto), not --dtype, which only the queries are encoded with.
    source = json.loads((index / "source.json").read_text())
    source["dense"]["dtypes_used"] = ["bfloat16"]
    (index / "source.json").write_text(json.dumps(source))
    second = _evaluate(
        [
            *common,  # --max-seq-length 128: the length the index's vectors were encoded at (another is refused)
            "--index",
            str(index),
            "--out",
            str(tmp_path / "second"),
            "--compare",
            str(first_out / "evaluation.json"),
            "--no-chart",
        ]
    )
    assert list(second["stages"]) == ["dense"] and second["backend"] == f"the index {index}"
    # The first stages ran at the lengths the vectors were encoded with.
    assert first["settings"]["first_stage_max_seq_length"] == {"dense": 128, "sparse": 128}
    assert second["settings"]["first_stage_max_seq_length"] == {"dense": 128, "sparse": 128}
    assert second["per_query"]["dense"] == first["per_query"]["dense"]
    assert second["settings"]["dtypes_used"] == {"dense": {"documents": ["bfloat16"], "queries": f32}}
    cmp = second["compare"]
    assert cmp["previous_name"] == "first" and cmp["queries"] == QUERY_COUNT and list(cmp["stages"]) == ["dense"]
    # What made the runs differ is named, each value as each run recorded it (stages pair by name).
    assert sorted(cmp["differences"]) == [
        "backend", "models", "settings.dtypes_used", "settings.rerank_depth",
        "settings.reranker_max_seq_length"]  # the second run has no reranker
    assert cmp["differences"]["settings.reranker_max_seq_length"] == {"previous": 128, "current": None}
    assert cmp["differences"]["backend"] == {"previous": "exact search in process", "current": f"the index {index}"}
    assert "settings.fusion" not in cmp["differences"] and "settings.depth" not in cmp["differences"]
    md = (tmp_path / "second" / "evaluation.md").read_text()
    assert f'- `backend`: `"exact search in process"` then, `"the index {index}"` now' in md
    for m in names:
        assert cmp["stages"]["dense"][m]["previous"] == pytest.approx(first["stages"]["dense"][m])
        assert cmp["stages"]["dense"][m]["delta"] == 0 and cmp["stages"]["dense"][m]["ci95"] == [0, 0]
    assert not (tmp_path / "second" / "evaluation.png").exists()


def test_serve_config_warnings_compare_the_lengths_this_evaluation_runs(pydocs_beir, minilm_dir, tmp_path):
    """--serve-config's length warning reads each field's truncation here: searching an --index,
    its queries encode at the length the index's vectors were encoded with (128), not
    --max-seq-length's (run.index_lists); a field the index lacks and the reranker keep theirs."""
    from raytrieve.evaluate.command import evaluated_lengths
    from raytrieve.evaluate.run import RunOptions

    index = _dense_index(tmp_path / "index", pydocs_beir, minilm_dir)
    options = RunOptions(max_seq_length=256, reranker_max_seq_length=300)
    assert evaluated_lengths(None, options) == {"dense": 256, "sparse": 256, "reranker": 300}
    assert evaluated_lengths(str(index), options) == {"dense": 128, "sparse": 256, "reranker": 300}
    assert evaluated_lengths(str(index), RunOptions())["reranker"] is None  # the model's own


def test_tune_on_a_dev_split_fits_search_and_scores_it_held_out(pydocs_beir, tmp_path, monkeypatch, tiny_models):
    """--tune-on dev: /search's setting fitted on 24 dev queries (other docstrings of the same
    corpus), scored as the 'tuned' stage on the 24 test queries; the fragment and a tuned copy
    of the shipped serve config load as serve configs. The corpus, both splits', is read once."""
    import shutil

    import yaml

    from raytrieve.serve.config import load_serve_config

    beir = tmp_path / "beir"
    shutil.copytree(pydocs_beir, beir)
    queries = [json.loads(line) for line in (beir / "queries.jsonl").read_text().splitlines()]
    corpus = [json.loads(line) for line in (beir / "corpus.jsonl").read_text().splitlines()]
    pairs = _pydocs_pairs()
    dev = range(QUERY_COUNT, QUERY_COUNT + 20)  # their documents are in the corpus (the first 150 pairs)
    assert [c["text"] for c in corpus[:QUERY_COUNT + 20]] == [p.document[:600] for p in pairs[:QUERY_COUNT + 20]]
    queries += [{"_id": f"q{i}", "text": pairs[i].query} for i in dev]
    (beir / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (beir / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\tdoc{i}\t1\n" for i in dev))
    out = tmp_path / "tuned"
    # The shipped serve config with the tiny reranker: the fit's mechanics, not the reranker's
    # quality, are under test here (the real L12 at 256 tokens was ~85% of this test's CPU), and
    # an evaluation fitted with another reranker than the config serves is refused.
    shipped = tmp_path / "serve_pydocs.yaml"
    configs = Path(__file__).resolve().parent.parent / "jobs" / "configs"
    serve_raw = yaml.safe_load((configs / "serve_pydocs.yaml").read_text())
    serve_raw["reranker"].update(model=str(tiny_models["cross"]), max_seq_length=96)  # its 128 positions
    shipped.write_text(yaml.safe_dump(serve_raw))
    reads = _count_reads(monkeypatch)
    rep = _evaluate(["--data", str(beir), *COMMON, *MODELS, "--reranker", str(tiny_models["cross"]), "--dtype", "auto",
                     "--rerank-depth", "10",  # the reranked stage's; the fit tries its own depths
                     "--reranker-max-seq-length", "96",  # the served reranker's (the retrievers: 128)
                     "--tune-on", "dev", "--serve-config", str(shipped), "--out", str(out), "--no-chart"])
    assert (rep["settings"]["max_seq_length"], rep["settings"]["reranker_max_seq_length"]) == (128, 96)
    assert reads[beir / "corpus.jsonl"] == 1 and reads[beir / "queries.jsonl"] == 2  # queries: once per split
    adopted = rep["tuning"]["setting"]["rerank"]  # else the dev's best rerank is a stage of its own
    assert list(rep["stages"]) == ["dense", "sparse", "fused", "reranked", "tuned"] + ([] if adopted else ["tuned+rerank"])
    assert rep["data"]["queries"] == QUERY_COUNT and set(rep["per_query"]["tuned"]["ndcg@10"]) == {
        f"q{i}" for i in range(QUERY_COUNT)}  # scored on test only
    fit = rep["tuning"]
    assert fit["split"] == "dev" and fit["queries"] == 20  # fitted on dev's 20, scored on test's 24
    # Fitted on dev: at least the untuned fusion there (it is one of the settings tried).
    assert fit["rerank"]["0"] == pytest.approx(fit["ndcg@10"]["fitted_fusion"])  # no rerank: the fusion alone
    assert fit["ndcg@10"]["fitted_fusion"] >= fit["ndcg@10"]["untuned_fusion"] - 1e-12
    assert set(fit["rerank"]) == {"0"} | {
        str(d) if w == 1 else f"{d}@{w:g}" for d in (5, 10, 20, 30) for w in tuning.RERANK_WEIGHTS}
    chosen = tuning.Setting({}, rerank_depth=fit["setting"].get("rerank_depth", 0),
                            rerank_weight=fit["setting"].get("rerank_weight", 1.0))
    assert fit["ndcg@10"]["fitted"] == pytest.approx(fit["rerank"][chosen.rerank_key()])
    gain = fit["rerank_gain"]  # the best depth against none, adopted only when both intervals are above 0
    assert gain is None or gain["adopted"] == (min(gain["ci95"][0], gain["cross_fitted"]["ci95"][0]) > 0) == (
        fit["setting"]["rerank"])
    pairs_seen = {(c["stage"], c["baseline"]) for c in rep["comparisons"]}
    assert ("tuned", rep["best_first_stage"]) in pairs_seen and ("tuned", "fused") in pairs_seen
    if not adopted:
        # "tuned+rerank": the dev-best setting that reranks (its dev score the best of them), on
        # the tuned fusion: the same candidates per query (Recall@100), reordered at the head.
        import re

        depth, weight = re.search(r"rerank@(\d+)(?: weight ([\d.]+))?$", fit["with_rerank"]).groups()
        key = depth + (f"@{weight}" if weight else "")
        assert fit["rerank"][key] == max(v for k, v in fit["rerank"].items() if k != "0")
        assert rep["per_query"]["tuned+rerank"]["recall@100"] == rep["per_query"]["tuned"]["recall@100"]
        assert ("tuned+rerank", "tuned") in pairs_seen and ("tuned+rerank", rep["best_first_stage"]) in pairs_seen
    fragment = yaml.safe_load((out / "search.yaml").read_text())["search"]
    assert fragment == fit["setting"]
    served = load_serve_config(str(out / "serve_tuned.yaml"))
    # The keys the serve config set, and search: (every default was written out).
    written = yaml.safe_load((out / "serve_tuned.yaml").read_text())
    assert set(written) == set(serve_raw) | {"search"} and written["reranker"] == serve_raw["reranker"], written
    assert served.search.recall.model_dump() == {"dense": 100, "sparse": 100} | fit["setting"]["recall"]
    assert served.search.rerank == fit["setting"]["rerank"] and served.search.fusion.method == fragment["fusion"]["method"]
    assert served.reranker is not None and served.reranker.model == load_serve_config(str(shipped)).reranker.model


def _dense_index(folder: Path, beir: Path, model_dir: Path) -> Path:
    """An index folder as `raytrieve index build` writes it, built here without the encoding job."""
    from raytrieve.encoders import load_encoder

    rows = [json.loads(line) for line in (beir / "corpus.jsonl").read_text().splitlines()]
    encoder = load_encoder("dense", "all-minilm-l6-v2", max_seq_length=128)
    vectors = encoder.encode_document([r["text"] for r in rows], batch_size=32, show_progress_bar=False)
    corpus = {"path": str(beir / "corpus.jsonl"), "format": "jsonl", "id_column": "_id", "text_column": "text"}
    return write_dense_index(folder, [r["_id"] for r in rows], vectors, corpus, "all-minilm-l6-v2", model_dir)


def test_a_large_corpus_goes_through_the_encoding_job(ray_cluster, first_run, pydocs_beir, tmp_path):
    """Above --max-in-process-rows the corpus is encoded by the encoding job (Ray Data) and
    searched through the index it builds: the same rankings' metrics as in process."""
    first, _ = first_run
    out = tmp_path / "large"
    rep = _evaluate(["--data", str(pydocs_beir), *COMMON, *MODELS, "--max-in-process-rows", "100", "--out", str(out)])
    assert (
        rep["backend"] == f"the index {out / 'work' / 'index'}"
        and (out / "work" / "vectors" / "manifest.json").exists()
    )
    assert list(rep["stages"]) == ["dense", "sparse", "fused"]
    manifest = json.loads((out / "work" / "vectors" / "manifest.json").read_text())
    assert rep["settings"]["dtypes_used"] == {
        kind: {"documents": manifest[kind]["dtypes_used"], "queries": ["float32"]} for kind in ("dense", "sparse")
    } and manifest["dense"]["dtypes_used"] == ["float32"]  # --dtype's default, float32, in the job's actors
    for stage in rep["stages"]:
        for m, value in rep["stages"][stage].items():
            # The job batches by tokens, so scores may differ in the last float bits (and near-ties swap).
            assert value == pytest.approx(first["stages"][stage][m], abs=0.02), (stage, m)


def test_bad_data_is_refused_before_any_model_loads(tmp_path, capsys):
    from raytrieve.cli import main

    root = write_beir(tmp_path, CORPUS, QUERIES, QRELS + "q2\tnope\t1\n")
    assert main(["evaluate", "--data", str(root), "--dense", "no-such-model", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "test.tsv: 1 document id(s) are not in" in err and "'nope'" in err and "no-such-model" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dense", "m"], "no data"),
        (["--data", "x", "--corpus", "c"], "not both"),
        (["--data", "x"], "nothing retrieves"),
        (["--data", "x", "--url", "http://h", "--dense", "m"], "--url evaluates the app's own models"),
        (["--data", "x", "--dense", "m", "--k", "0"], "--k must be >= 1"),
        (["--data", "x", "--dense", "m", "--token-budget", "0"], "--token-budget must be >= 1"),
        (["--data", "x", "--dense", "m", "--reranker-max-seq-length", "0"], "--reranker-max-seq-length must be >= 1"),
        (["--data", "x", "--dense", "m", "--reranker-max-seq-length", "256"], "pass --reranker too"),
        (["--data", "x", "--url", "http://h", "--reranker-max-seq-length", "256"], "runs at its served length"),
        (["--data", "x", "--dense", "m", "--column", "corpus_idd=id"], "unknown key(s) ['corpus_idd']"),
        (["--data", "x", "--url", "http://h", "--tune-on", "dev"], "--tune-on replays /search"),
        (["--data", "x", "--dense", "m", "--serve-config", "s.yaml"], "pass --tune-on SPLIT too"),
        (["--data", "x", "--dense", "m", "--tune-on", "test"], "is the evaluated --split"),
        # /search's own limits, naming the flag (a pydantic traceback before).
        (["--data", "x", "--dense", "m", "--rrf-k", "-1"], "--rrf-k -1.0: Input should be greater than or equal to 0"),
        (["--data", "x", "--dense", "m", "--dense-weight", "nan"], "--dense-weight nan:"),
        (["--data", "x", "--dense", "m", "--fusion", "convex", "--dense-weight", "0", "--sparse-weight", "0"],
         "at least one must be > 0"),
        # Lists cut at 50 reported as recall@100.
        (["--data", "x", "--dense", "m", "--depth", "50"], "--depth 50: each first stage's list is cut there"),
    ],
)
def test_contradicting_flags_are_refused(args, message, tmp_path):
    import argparse

    from raytrieve.evaluate.command import add_arguments, evaluate

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises((ConfigError, DataError)) as e:
        evaluate(parser.parse_args([*args, "--out", str(tmp_path)]))
    assert message in str(e.value)


def test_a_wrong_model_is_named_by_its_flag_before_any_model_runs(tmp_path):
    from raytrieve.cli import build_parser
    from raytrieve.evaluate.command import evaluate

    root = write_beir(tmp_path, CORPUS, QUERIES, QRELS)
    args = build_parser().parse_args(["evaluate", "--data", str(root), "--sparse", "splade-tiny", "--reranker", "nope"])
    with pytest.raises(ConfigError, match="--reranker nope: model 'nope': no such directory"):
        evaluate(args)
    # A folder that holds no model (the data folder, say), and a length past the model's
    # positions: both named by their flag (they were found as the model loaded, naming neither).
    args = build_parser().parse_args(["evaluate", "--data", str(root), "--dense", str(root)])
    with pytest.raises(ConfigError, match=rf"^--dense {root}: {root}: not a model directory \(no modules.json"):
        evaluate(args)
    args = build_parser().parse_args(["evaluate", "--data", str(root), "--sparse", "splade-tiny",
                                      "--reranker", "ms-marco-minilm-l12-v2", "--reranker-max-seq-length", "100000"])
    with pytest.raises(ConfigError, match=r"^--reranker-max-seq-length \(for --reranker ms-marco-minilm-l12-v2\): "
                                          r"100000 is more than the 512 positions"):
        evaluate(args)


def test_an_out_that_is_a_file_and_a_compare_on_other_data_are_named_before_models_run(tmp_path, monkeypatch):
    """--out naming a file failed with a FileExistsError traceback after every model had run;
    --compare on a file that is not JSON advised to "re-save the model"; a --compare run on other
    data was paired by query id, and one with no stage in common was refused after every model ran."""
    from raytrieve.cli import build_parser
    from raytrieve.evaluate import command
    from raytrieve.evaluate.command import evaluate

    monkeypatch.setattr(command, "_resolve_models", lambda *a, **k: pytest.fail("models resolved before the check"))
    root = write_beir(tmp_path, CORPUS, QUERIES, QRELS)
    (tmp_path / "afile").write_text("mine")
    args = build_parser().parse_args(["evaluate", "--data", str(root), "--dense", "all-minilm-l6-v2",
                                      "--out", str(tmp_path / "afile")])
    with pytest.raises(ConfigError, match=r"--out .*afile: is a file; give a folder"):
        evaluate(args)
    assert (tmp_path / "afile").read_text() == "mine"
    args = build_parser().parse_args(["evaluate", "--data", str(root), "--dense", "all-minilm-l6-v2",
                                      "--out", str(tmp_path / "out"), "--compare", str(root / "corpus.jsonl")])
    with pytest.raises(DataError, match=r"corpus\.jsonl: not valid JSON \(.*\); pass an evaluation\.json") as e:
        evaluate(args)
    assert "model" not in str(e.value)
    # A run on another dataset whose query ids overlap (q1, q2), and a run that shares no stage
    # with this one: both refused before any model is resolved.
    other = write_beir(tmp_path / "other", CORPUS, [{"_id": "q1", "text": "capital of France"}, QUERIES[1]], QRELS)
    elsewhere = data.load_beir(other)
    rankings = {q: ["d1", "d2"] for q in elsewhere.queries}
    for stage, fails in (("dense", r"1 of the 2 query ids both runs scored have another text .*e\.g\. \['q1'\]"),
                         ("sparse", r"shares no stage with this run \(its stages \['sparse'\], this run's \['dense'\]\)")):
        prints = data.fingerprints(elsewhere if stage == "dense" else data.load_beir(root))
        previous = report.build({stage: rankings}, elsewhere.qrels, 10, 100, {"data_fingerprints": prints})
        (tmp_path / "previous.json").write_text(json.dumps(previous))
        args = build_parser().parse_args(["evaluate", "--data", str(root), "--dense", "all-minilm-l6-v2",
                                          "--out", str(tmp_path / "out"), "--compare", str(tmp_path / "previous.json")])
        with pytest.raises(DataError, match=fails):
            evaluate(args)


@pytest.mark.parametrize("flag, model, kind, right", [
    ("dense", "ms-marco-minilm-l12-v2", "cross", "reranker"),
    ("sparse", "all-minilm-l6-v2", "dense", "dense"),
    ("dense", "splade-tiny", "sparse", "sparse"),
    ("reranker", "all-minilm-l6-v2", "dense", "dense"),
])
def test_a_model_of_another_kind_is_refused_naming_the_flag_it_belongs_to(flag, model, kind, right, tmp_path):
    """Before, a cross-encoder as --dense ended in a KeyError traceback after the data loaded, and
    a dense model as --sparse ran and was reported as the sparse stage."""
    from raytrieve.cli import build_parser
    from raytrieve.evaluate.command import evaluate

    root = write_beir(tmp_path, CORPUS, QUERIES, QRELS)
    args = build_parser().parse_args(["evaluate", "--data", str(root), f"--{flag}", model,
                                      *(["--dense", "all-minilm-l6-v2"] if flag == "reranker" else [])])
    with pytest.raises(ConfigError, match=rf"--{flag} {model}: is a {kind} model .* pass it as --{right}, "):
        evaluate(args)


def test_a_saved_folder_tells_its_kind(tiny_dirs, tmp_path):
    """Read from the folder's JSON files alone: sentence-transformers' model_type, else modules.json,
    else a plain transformers folder's classification head; None where nothing tells."""
    from raytrieve import CrossEncoder, DenseEncoder, SparseEncoder
    from raytrieve.kinds import saved_kind

    for cls, source, name in ((DenseEncoder, "base", "dense"), (SparseEncoder, "mlm", "sparse"),
                              (CrossEncoder, "cls1", "cross")):
        cls(str(tiny_dirs[source])).save(tmp_path / name)
        kind = saved_kind(tmp_path / name)
        assert kind is not None and kind.name == name
        (tmp_path / name / "config_sentence_transformers.json").unlink()  # an older sentence-transformers folder
        older = saved_kind(tmp_path / name)
        assert (older.name if older else None) == {"dense": "dense", "sparse": "sparse", "cross": None}[name]
    assert saved_kind(tiny_dirs["cls1"]).name == "cross"  # plain transformers, a classification head
    assert saved_kind(tiny_dirs["base"]) is None and saved_kind(tmp_path / "missing") is None


def test_the_reranker_truncates_at_its_own_length(tiny_dirs, st):
    """--reranker-max-seq-length cuts the reranker's pairs (query and document together) at its
    own length, as sentence-transformers' CrossEncoder(max_length=...) does; without it, at
    --max-seq-length. (The CLI's wiring: test_tune_on_a_dev_split_fits_search_and_scores_it_held_out.)"""
    from tests.conftest import SENTENCES

    cross = str(tiny_dirs["cls1_spread"])
    pairs = [(SENTENCES[i], " ".join(SENTENCES[i + 1 :])) for i in range(4)]
    scores = {}
    for options, length in (
        (run.RunOptions(max_seq_length=100, reranker_max_seq_length=8), 8),
        (run.RunOptions(max_seq_length=8), 8),
        (run.RunOptions(max_seq_length=8, reranker_max_seq_length=100), 100),
    ):
        assert options.reranker_length == length
        got = run.cross_encoder(cross, options)(pairs)
        ref = st.CrossEncoder(cross, device="cpu", max_length=length).predict(pairs)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
        scores[length] = np.asarray(got)
    assert np.abs(scores[8] - scores[100]).max() > 0.05  # the length mattered


def test_several_models_of_a_kind_are_stages_of_their_own_and_fuse_by_kind_weight():
    from raytrieve.serve import fusion

    stages = run.Models(dense=["a/mini", "b/mini", "models:/bge/2"], sparse=["splade-tiny"]).first_stages()
    # Folders of one name are told apart by the folders above them (they were "mini", "mini#2").
    assert [(s.name, s.kind) for s in stages] == [
        ("dense:a/mini", "dense"),
        ("dense:b/mini", "dense"),
        ("dense:models:/bge/2", "dense"),
        ("sparse", "sparse"),
    ]
    secret = run.Models(dense=["s3://KEY:SECRET@b1/model", "s3://KEY:SECRET@b2/model", "s3://KEY:SECRET@b3",
                               "out/a/model"]).first_stages()  # a URI's bucket and path: no keys in the report
    assert [s.name for s in secret] == ["dense:b1/model", "dense:b2/model", "dense:b3", "dense:a/model"]
    named = run.Models(sparse=["out/splade/model", "out/router/model", "out/router/model", "x/y"]).first_stages()
    assert [s.name for s in named] == ["sparse:splade/model", "sparse:router/model", "sparse:router/model#3",
                                       "sparse:x/y"]
    rng = np.random.default_rng(2)
    lists: run.Lists = {}
    for s in stages:
        ids = rng.permutation(list(DOCS))[:6].tolist()
        lists[s.name] = {"qa": list(zip(ids, sorted(rng.random(6).tolist(), reverse=True)))}
    kinds = {s.name: s.kind for s in stages}
    options = run.RunOptions(depth=6, fusion=Fusion(method="convex", dense_weight=0.2, sparse_weight=0.4))
    got = run.combine(lists, kinds, options, {"qa": Q_TEXT["qa"]}, DOCS, None)
    ranked = [lists[s.name]["qa"] for s in stages]
    expected = fusion.convex(ranked, [0.2, 0.2, 0.2, 0.4], "minmax")
    assert got["fused"]["qa"] == [d for d, _ in expected] and "reranked" not in got


def test_compare_refuses_a_file_that_is_no_report(tmp_path):
    (tmp_path / "x.json").write_text('{"rows": []}')
    with pytest.raises(DataError, match=r"not an evaluation\.json of raytrieve evaluate"):
        report.load_previous(tmp_path / "x.json")
    # A folder (an earlier run's --out) is named as one, and its evaluation.json offered.
    with pytest.raises(DataError, match=rf"{tmp_path}: is a folder; --compare takes the evaluation.json of an earlier "
                                        r"run$"):
        report.load_previous(tmp_path)
    (tmp_path / "evaluation.json").write_text("{}")
    with pytest.raises(DataError, match=rf"is a folder; .*; {tmp_path}/evaluation.json is there: pass it$"):
        report.load_previous(tmp_path)
    with pytest.raises(DataError, match=r"nowhere.json: no such file; --compare takes"):
        report.load_previous(tmp_path / "nowhere.json")


def test_report_without_matplotlib_skips_the_chart(tmp_path, monkeypatch, caplog):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    qrels = {"q": {"d": 1.0}}
    rep = report.build({"dense": {"q": ["d"]}}, qrels, 10, 100, {"name": None})
    with caplog.at_level("INFO", logger="raytrieve.evaluate"):
        written = report.write(rep, tmp_path)
    assert [p.name for p in written] == ["evaluation.json", "evaluation.md"]
    assert "matplotlib is not installed" in caplog.text and not (tmp_path / "evaluation.png").exists()


def test_tuning_checks_refuse_a_leak_and_a_serve_config_that_cannot_hold_the_fit(tmp_path, caplog):
    from raytrieve.evaluate import tune

    with pytest.raises(ConfigError, match=r"1 judged query id\(s\) of dev.tsv are also judged in test.tsv, e.g. \['q2'\]"):
        tune.check_splits({"q1": {}, "q2": {}}, {"q2": {}, "q3": {}}, "dev.tsv", "test.tsv")
    tune.check_splits({"q1": {}}, {"q2": {}}, "dev.tsv", "test.tsv")
    shipped = str(Path(__file__).resolve().parent.parent / "jobs" / "configs" / "serve_pydocs.yaml")
    with pytest.raises(ConfigError, match="serves a reranker, but this evaluation has no --reranker"):
        tune.check_serve_config(shipped, reranker=False, depth=100)
    with pytest.raises(ConfigError, match=r"limits max_recall=1000 are below what the fit may choose \(max_recall 5000\)"):
        tune.check_serve_config(shipped, reranker=True, depth=5000)
    tune.check_serve_config(shipped, reranker=True, depth=100)
    # The fit is of the evaluated models: the config must serve those (a copy of a folder counts).
    served = {"dense": "all-minilm-l6-v2", "sparse": "splade-tiny", "reranker": "ms-marco-minilm-l12-v2"}
    with caplog.at_level("WARNING", logger="raytrieve.evaluate"):
        every = {"dense": 256, "sparse": 256, "reranker": 256}
        tune.check_serve_config(shipped, reranker=True, depth=100, models=served, max_seq_lengths=every)
        tune.check_serve_config(shipped, reranker=True, depth=100, models=served)  # each model's default: unknown
        assert not caplog.records  # serve_pydocs.yaml truncates every model at 256 too
        tune.check_serve_config(shipped, reranker=True, depth=100, models={**served, "sparse": None},
                                max_seq_lengths={"dense": 128, "sparse": 128, "reranker": 128})
        tune.check_serve_config(shipped, reranker=True, depth=100, models=served,
                                max_seq_lengths={"dense": 256, "sparse": 256, "reranker": 512})
    # A served model truncating otherwise than the evaluation: warned, by field, with the fix.
    assert [r.getMessage().split(" serves ")[1].split(" at ")[0] for r in caplog.records] == [
        "dense", "reranker", "reranker"]
    assert "max_seq_length 256, but this evaluation truncates at 128" in caplog.text
    assert "Pass --max-seq-length 256, or set dense.max_seq_length" in caplog.text
    assert "truncates at 512: the fit is of other scores than /search will compute. Pass --reranker-max-seq-length 256, " \
        "or set reranker.max_seq_length in the config to 512" in caplog.text
    from raytrieve.model_ref import resolve_model

    copy = tmp_path / "minilm-copy"
    shutil.copytree(resolve_model("all-minilm-l6-v2"), copy)
    tune.check_serve_config(shipped, reranker=True, depth=100, models={**served, "dense": str(copy)})
    with pytest.raises(ConfigError, match=r"serves 'splade-tiny' as sparse, but this evaluation fits --sparse 'all-min"):
        tune.check_serve_config(shipped, reranker=True, depth=100, models={**served, "sparse": "all-minilm-l6-v2"})
    # Folders without weight files (ONNX only) are not one model by their (empty) weights.
    from raytrieve.assets import same_model_files

    onnx_a, onnx_b = tmp_path / "a", tmp_path / "b"
    for folder, text in ((onnx_a, "one"), (onnx_b, "two")):
        folder.mkdir()
        (folder / "model.onnx").write_text(text)
    assert not same_model_files(onnx_a, onnx_b) and same_model_files(onnx_a, onnx_a)
    assert same_model_files(copy, resolve_model("all-minilm-l6-v2"))


def test_max_seq_length_over_an_index_is_refused_where_it_would_change_nothing(tiny_models, tmp_path, monkeypatch,
                                                                                caplog):
    """Queries over an --index are encoded at its vectors' length: --max-seq-length 256 over an
    index of 128 ran silently, metrics equal to 128's, the report recording 256 (helper-85)."""
    from raytrieve.cli import build_parser
    from raytrieve.evaluate import command
    from raytrieve.evaluate.command import evaluate

    root = write_beir(tmp_path, CORPUS, QUERIES, QRELS)
    corpus = {"path": str(root / "corpus.jsonl"), "format": "jsonl", "id_column": "_id", "text_column": "text"}
    index = write_dense_index(tmp_path / "index", ["a", "b"], np.eye(2, 8, dtype=np.float32), corpus,
                              str(tiny_models["dense"]), tiny_models["dense"], max_seq_length=128)
    monkeypatch.setattr(command, "_resolve_models", lambda args: None)  # the check needs no model
    flags = ["evaluate", "--data", str(root), "--index", str(index), "--out", str(tmp_path / "o")]
    with pytest.raises(ConfigError, match=r"^--max-seq-length 256: the --index .*index's vectors were encoded at "
                                          r"dense 128 tokens, and queries over an index are encoded at that length"):
        evaluate(build_parser().parse_args([*flags, "--max-seq-length", "256"]))
    # With a reranker it still sets the reranker's length: said, not refused.
    class PastTheCheck(Exception):
        pass

    def searched(*args, **kwargs):
        raise PastTheCheck

    monkeypatch.setattr(run, "index_lists", searched)
    with caplog.at_level(logging.WARNING), pytest.raises(PastTheCheck):
        evaluate(build_parser().parse_args([*flags, "--max-seq-length", "256", "--reranker",
                                            str(tiny_models["cross"])]))
    assert "--max-seq-length 256 sets the --reranker's length only" in caplog.text


def test_an_index_is_searched_only_with_the_model_that_encoded_it(tiny_models, tmp_path):
    """``evaluate --index``: the dense model given must have made the index's vectors, known by
    its files (source.json records their content): a copy at another path passes, another
    model and the same path with other files (trained again) are refused, naming the model."""
    import shutil

    from raytrieve.evaluate.run import Models, index_stages

    job = Path(shutil.copytree(tiny_models["dense"], tmp_path / "job-model"))
    corpus = {"path": str(tmp_path / "corpus.jsonl"), "format": "jsonl", "id_column": "_id", "text_column": "text"}
    index = write_dense_index(tmp_path / "index", ["a", "b"], np.eye(2, 8, dtype=np.float32), corpus,
                              "s3://KEY:SECRET@b/model", job)
    copy = shutil.copytree(job, tmp_path / "elsewhere")
    stages, _ = index_stages(index, Models(dense=[str(copy)]))
    assert [s.kind for s in stages] == ["dense"]
    with pytest.raises(ConfigError, match=r"--dense .*: the index's dense vectors were encoded with 's3://b/model'; "
                                          r"pass that model, or rebuild the index with this one"):
        index_stages(index, Models(dense=[str(tiny_models["sparse"])]))
    weights = job / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"--dense .*job-model: the index's dense vectors were encoded with"):
        index_stages(index, Models(dense=[str(job)]))
