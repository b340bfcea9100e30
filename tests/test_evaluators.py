"""Evaluators against sentence-transformers' on the shipped pretrained models and real text:
same keys, same values (the models agree to 1e-5, the metrics must follow)."""

from __future__ import annotations

import numpy as np
import pytest

from raytrieve import CrossEncoder, DenseEncoder, SparseEncoder
from raytrieve import evaluation as E
from tests.conftest import SENTENCES

CORPUS = [
    "Berlin has a population of 3,520,031 registered inhabitants in an area of 891.82 square kilometers.",
    "Berlin is well known for its museums, such as the Pergamon Museum on Museum Island.",
    "New York City is famous for the Metropolitan Museum of Art.",
    "Python's sorted() returns a new sorted list from the items in an iterable.",
    "list.sort() sorts the list in place and returns None.",
    "The Eiffel Tower in Paris was completed in 1889 for the World's Fair.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "A bi-encoder embeds queries and documents separately, so documents can be indexed ahead of time.",
    "A cross-encoder reads the query and the document together and outputs one relevance score.",
    "SPLADE expands a text into weighted vocabulary terms, giving a sparse vector for an inverted index.",
]
# Without SENTENCES' copy of the Berlin document: two equal documents tie exactly, and which one
# topk puts first differs between CPUs (it did, for sentence-transformers' sparse evaluator).
CORPUS_MAP = {f"doc{i}": t for i, t in enumerate(CORPUS + SENTENCES) if i < len(CORPUS) or t not in CORPUS}
QUERIES = {
    "q0": "How many people live in Berlin?",
    "q1": "sort a python list without modifying it",
    "q2": "which model reads query and document together",
    "q3": "when was the Eiffel Tower built",
    "q4": "how do plants make energy from light",
    "q5": "a query with no relevant document",
}
RELEVANT = {"q0": {"doc0"}, "q1": {"doc3", "doc4"}, "q2": {"doc8"}, "q3": {"doc5"}, "q4": {"doc6"}, "q5": set()}


def assert_same(ours: dict, ref: dict, atol: float = 1e-4):
    assert list(ours) == list(ref)
    for k in ref:
        assert ours[k] == pytest.approx(ref[k], abs=atol), k


@pytest.fixture(scope="module")
def dense(minilm_dir, st):
    return DenseEncoder(minilm_dir, device="cpu"), st.SentenceTransformer(str(minilm_dir), device="cpu")


@pytest.fixture(scope="module")
def STE(st):
    from sentence_transformers.sentence_transformer import evaluation

    return evaluation


def test_information_retrieval(dense, STE, tmp_path):
    kw = dict(corpus_chunk_size=7, name="dev", ndcg_at_k=[3, 10], map_at_k=[5, 100])
    ours_ev = E.InformationRetrievalEvaluator(QUERIES, CORPUS_MAP, RELEVANT, **kw)
    ref_ev = STE.InformationRetrievalEvaluator(QUERIES, CORPUS_MAP, RELEVANT, **kw)
    ours = ours_ev(dense[0], output_path=str(tmp_path), epoch=1, steps=10)
    assert_same(ours, ref_ev(dense[1]))
    assert ours_ev.primary_metric == ref_ev.primary_metric == "dev_cosine_ndcg@10"
    assert ours["dev_cosine_accuracy@10"] == 1.0  # real model: every answer is in the top 10
    assert (tmp_path / "Information-Retrieval_evaluation_dev_results.csv").read_text().startswith("epoch,steps,")


def test_sparse_information_retrieval(splade_dir, st):
    from sentence_transformers.sparse_encoder import evaluation as SE

    ours_model, ref_model = SparseEncoder(splade_dir, device="cpu"), st.SparseEncoder(str(splade_dir), device="cpu")
    ours = E.SparseInformationRetrievalEvaluator(QUERIES, CORPUS_MAP, RELEVANT, corpus_chunk_size=9)(ours_model)
    ref = SE.SparseInformationRetrievalEvaluator(QUERIES, CORPUS_MAP, RELEVANT, corpus_chunk_size=9)(ref_model)
    assert_same(ours, ref, atol=1e-3)
    assert 0.99 < ours["corpus_sparsity_ratio"] < 1 and ours["avg_flops"] > 0


def test_embedding_similarity_binary_triplet(dense, STE):
    s1, s2 = SENTENCES[:8], SENTENCES[1:9]
    scores = [0.1, 0.9, 0.3, 0.7, 0.2, 0.5, 0.8, 0.4]
    fns = ["cosine", "dot", "euclidean", "manhattan"]
    assert_same(E.EmbeddingSimilarityEvaluator(s1, s2, scores, similarity_fn_names=fns)(dense[0]),
                STE.EmbeddingSimilarityEvaluator(s1, s2, scores, similarity_fn_names=fns)(dense[1]))
    labels = [0, 1, 0, 1, 0, 0, 1, 1]
    assert_same(E.BinaryClassificationEvaluator(s1, s2, labels, similarity_fn_names=fns)(dense[0]),
                STE.BinaryClassificationEvaluator(s1, s2, labels, similarity_fn_names=fns)(dense[1]))
    a, p, n = SENTENCES[:6], SENTENCES[1:7], SENTENCES[8:14]
    assert_same(E.TripletEvaluator(a, p, n, similarity_fn_names=fns, margin=0.01)(dense[0]),
                STE.TripletEvaluator(a, p, n, similarity_fn_names=fns, margin=0.01)(dense[1]))


def test_reranking_mse_paraphrase(dense, STE):
    samples = [{"query": QUERIES[q], "positive": [CORPUS_MAP[d] for d in RELEVANT[q]],
                "negative": [CORPUS_MAP[f"doc{i}"] for i in range(10, 16)]} for q in ("q0", "q1", "q2", "q3")]
    assert_same(E.RerankingEvaluator(samples, at_k=5)(dense[0]), STE.RerankingEvaluator(samples, at_k=5)(dense[1]))
    sentences = {f"s{i}": t for i, t in enumerate(SENTENCES)}
    dups = [("s0", "s1"), ("s3", "s6"), ("s7", "s8")]
    assert_same(E.ParaphraseMiningEvaluator(sentences, dups, top_k=5)(dense[0]),
                STE.ParaphraseMiningEvaluator(sentences, dups, top_k=5)(dense[1]))


def test_cross_encoder_evaluators(reranker_dir, st):
    from sentence_transformers.cross_encoder import evaluation as CE

    ours_model, ref_model = CrossEncoder(reranker_dir, device="cpu"), st.CrossEncoder(str(reranker_dir), device="cpu")
    samples = [
        {"query": QUERIES["q0"], "positive": [CORPUS[0]], "negative": CORPUS[1:6]},
        {"query": QUERIES["q1"], "positive": [CORPUS[3], CORPUS[4]], "documents": [CORPUS[7], CORPUS[3], CORPUS[9], CORPUS[2]]},
    ]
    assert_same(E.CrossEncoderRerankingEvaluator(samples, at_k=3)(ours_model),
                CE.CrossEncoderRerankingEvaluator(samples, at_k=3)(ref_model))
    pairs = [[QUERIES["q0"], c] for c in CORPUS]
    gold = [1.0, 0.5, 0.1, 0, 0, 0, 0, 0, 0, 0.2]
    assert_same(E.CrossEncoderCorrelationEvaluator(pairs, gold)(ours_model),
                CE.CrossEncoderCorrelationEvaluator(pairs, gold)(ref_model))
    labels = [1, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    assert_same(E.CrossEncoderClassificationEvaluator(pairs, labels)(ours_model),
                CE.CrossEncoderClassificationEvaluator(pairs, labels)(ref_model))


@pytest.fixture(scope="module")
def tiny_teacher(tiny_dirs, tmp_path_factory, st):
    """A tiny dense model (2 layers x 32, mean pooling) with other random weights than
    tiny_dirs' (seed 1, not 0): a teacher whose embeddings really differ from the student's."""
    import torch
    from transformers import AutoTokenizer, BertModel

    from raytrieve.modules import Pooling, Transformer
    from tests.conftest import tiny_bert_config

    root = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(1)
    BertModel(tiny_bert_config()).save_pretrained(root / "hf")
    AutoTokenizer.from_pretrained(tiny_dirs["base"]).save_pretrained(root / "hf")
    DenseEncoder([Transformer.from_pretrained(root / "hf", max_seq_length=32), Pooling(32, "mean")],
                 device="cpu").save(root / "st")
    return DenseEncoder(root / "st", device="cpu"), st.SentenceTransformer(str(root / "st"), device="cpu")


@pytest.fixture(scope="module")
def tiny_student(tiny_dirs, tmp_path_factory, st):
    from raytrieve.modules import Pooling, Transformer

    root = tmp_path_factory.mktemp("student")
    DenseEncoder([Transformer.from_pretrained(tiny_dirs["base"], max_seq_length=32), Pooling(32, "mean")],
                 device="cpu").save(root)
    return DenseEncoder(root, device="cpu"), st.SentenceTransformer(str(root), device="cpu")


def test_mse_distillation_teacher_differs_from_student(dense, tiny_teacher, tiny_student, STE):
    # As in distillation to another language: the student reads other texts than the teacher.
    source, target = SENTENCES, SENTENCES[1:] + SENTENCES[:1]
    ours = E.MSEEvaluator(source, target, teacher_model=tiny_teacher[0], name="distill")(tiny_student[0])
    ref = STE.MSEEvaluator(source, target, teacher_model=tiny_teacher[1], name="distill")(tiny_student[1])
    assert list(ours) == list(ref) == ["distill_negative_mse"]
    assert ours["distill_negative_mse"] == pytest.approx(ref["distill_negative_mse"], rel=1e-5)
    independent = -100 * np.mean((tiny_teacher[0].encode(source) - tiny_student[0].encode(target)) ** 2)
    assert ours["distill_negative_mse"] == pytest.approx(independent, rel=1e-5)
    assert ours["distill_negative_mse"] < -1.0  # different random weights: far from the 0 of teacher == student

    # A 384-d teacher against a 32-d student through truncate_dim (applied to both sides).
    ours = E.MSEEvaluator(source, source, teacher_model=dense[0], truncate_dim=32)(tiny_student[0])
    ref = STE.MSEEvaluator(source, source, teacher_model=dense[1], truncate_dim=32)(tiny_student[1])
    assert ours["negative_mse"] == pytest.approx(ref["negative_mse"], rel=1e-5) and ours["negative_mse"] < -1.0

    assert E.MSEEvaluator(source, source, teacher_model=tiny_student[0])(tiny_student[0]) == {"negative_mse": 0.0}
    with pytest.raises(ValueError, match="target_sentences"):
        E.MSEEvaluator(source, source[:-1], teacher_model=tiny_student[0])


def test_sequential_equals_sentence_transformers(dense, tiny_teacher, STE):
    """Children of three kinds, aggregated by ST's default (the last primary metric) and by
    other main-score functions: the same merged keys, values and sequential_score as ST."""

    def children(lib, teacher):
        return [
            lib.TripletEvaluator(SENTENCES[:4], SENTENCES[1:5], SENTENCES[8:12], name="t"),
            lib.EmbeddingSimilarityEvaluator(SENTENCES[:4], SENTENCES[1:5], [0.1, 0.2, 0.3, 0.9], name="sts"),
            lib.MSEEvaluator(SENTENCES[:8], SENTENCES[7::-1], teacher_model=teacher, truncate_dim=32, name="mse"),
        ]

    ours_children, ref_children = children(E, tiny_teacher[0]), children(STE, tiny_teacher[1])
    for fn in (None, np.mean):
        kw = {} if fn is None else {"main_score_function": fn}
        ours = E.SequentialEvaluator(ours_children, **kw)(dense[0])
        ref = STE.SequentialEvaluator(ref_children, **kw)(dense[1])
        assert list(ours) == list(ref)
        for k in ref:
            assert ours[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-5), (fn, k)
        primaries = [ours["t_cosine_accuracy"], ours["sts_spearman_cosine"], ours["mse_negative_mse"]]
        assert ours["sequential_score"] == pytest.approx((fn or (lambda s: s[-1]))(primaries), rel=1e-6)
    assert [c.primary_metric for c in ours_children] == [c.primary_metric for c in ref_children]
    assert E.SequentialEvaluator([])(dense[0]) == STE.SequentialEvaluator([])(dense[1]) == {"sequential_score": 0.0}


def test_lee_corpus_with_real_weights(dense):
    """The Lee corpus (gensim's test data): 1,225 document pairs with human judgments."""
    from scipy.stats import pearsonr, spearmanr

    from raytrieve.evaluation.lee import lee_evaluator, lee_pairs

    s1, s2, gold = lee_pairs()
    assert len(gold) == 50 * 49 // 2 and 0.0 < min(gold) and max(gold) <= 1.0
    out = lee_evaluator(similarity_fn_names=["cosine"])(dense[0])
    docs = list(dict.fromkeys(s1 + s2))
    emb = dense[0].encode(docs, normalize_embeddings=True)
    index = {d: i for i, d in enumerate(docs)}
    cos = np.array([emb[index[a]] @ emb[index[b]] for a, b in zip(s1, s2)])
    assert out["lee_pearson_cosine"] == pytest.approx(pearsonr(gold, cos)[0], abs=1e-5)
    assert out["lee_spearman_cosine"] == pytest.approx(spearmanr(gold, cos)[0], abs=1e-5)
    # all-MiniLM-L6-v2 reaches 0.656 Pearson here (measured 2026-11-23); a broken encoder would not.
    assert out["lee_pearson_cosine"] > 0.6


def test_a_training_runs_ir_evaluator_groups_pairs_by_query(dense, STE):
    """The training run's information_retrieval evaluator from (query, document) pairs: a query
    text in two pairs is one query with both documents relevant (as two queries, each would score
    the other's document as a miss), equal to sentence-transformers' evaluator given those
    grouped judgements."""
    from raytrieve.train.evaluate import build_evaluator

    pairs = [(QUERIES["q1"], CORPUS[3]), (QUERIES["q0"], CORPUS[0]), (QUERIES["q1"], CORPUS[4]),
             (QUERIES["q3"], CORPUS[5]), (QUERIES["q2"], CORPUS[8])]
    ours_ev = build_evaluator({"query": [q for q, _ in pairs], "document": [d for _, d in pairs]},
                              "information_retrieval", "dense")
    assert len(ours_ev.queries) == 4 and sorted(map(len, ours_ev.relevant_docs.values())) == [1, 1, 1, 2]
    corpus = {f"d{i}": d for i, d in enumerate(dict.fromkeys(d for _, d in pairs))}
    by_text = {d: i for i, d in corpus.items()}
    queries = {f"q{i}": q for i, q in enumerate(dict.fromkeys(q for q, _ in pairs))}
    qid = {q: i for i, q in queries.items()}
    relevant: dict[str, set[str]] = {}
    for q, d in pairs:
        relevant.setdefault(qid[q], set()).add(by_text[d])
    ref_ev = STE.InformationRetrievalEvaluator(queries, corpus, relevant, name="eval", write_csv=False)
    ours = ours_ev(dense[0])
    assert_same(ours, ref_ev(dense[1]))
    # Both of q1's answers count as found (as two queries, each would miss the other's).
    assert ours["eval_cosine_recall@10"] == 1.0
