"""``make demo``: the three shipped models on a small real corpus.

Dense retrieval with all-MiniLM-L6-v2, sparse retrieval with SPLADE-tiny (and the terms it
weighs), both fused by reciprocal rank, then reranked by the ms-marco cross-encoder. Later
stages of the platform (Ray Train fine-tuning, Ray Data corpus encoding, Serve) extend it.
"""

from __future__ import annotations

import time

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
QUERIES = [
    "How many people live in Berlin?",
    "how do I sort a list in python without changing it",
    "what model scores a query and document jointly",
]


def _rrf(rankings: list[list[int]], k: int = 60) -> list[int]:
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, doc in enumerate(ranking):
            scores[doc] = scores.get(doc, 0.0) + 1.0 / (k + rank + 1)
    return sorted(scores, key=lambda d: -scores[d])


def run_showcase() -> None:
    from raytrieve import CrossEncoder, DenseEncoder, SparseEncoder

    t0 = time.perf_counter()
    print("Loading the shipped models (the reranker is converted from int8 ONNX on first use)...")
    dense = DenseEncoder("all-minilm-l6-v2", device="cpu")
    sparse = SparseEncoder("splade-tiny", device="cpu")
    reranker = CrossEncoder("ms-marco-minilm-l12-v2", device="cpu")
    print(f"  loaded in {time.perf_counter() - t0:.1f}s\n")

    doc_dense = dense.encode_document(CORPUS, convert_to_tensor=True)
    doc_sparse = sparse.encode_document(CORPUS)
    print(f"Corpus: {len(CORPUS)} documents; dense {tuple(doc_dense.shape)}, sparse {tuple(doc_sparse.shape)} "
          f"with {sparse.sparsity(doc_sparse)['active_dims']:.0f} active terms per document on average\n")

    for query in QUERIES:
        print(f"Query: {query}")
        dense_scores = dense.similarity(dense.encode_query(query, convert_to_tensor=True), doc_dense)[0]
        q_sparse = sparse.encode_query(query)
        sparse_scores = sparse.similarity(q_sparse.unsqueeze(0), doc_sparse)[0]
        dense_rank = dense_scores.argsort(descending=True).tolist()
        sparse_rank = sparse_scores.argsort(descending=True).tolist()
        terms = ", ".join(f"{t}:{w:.2f}" for t, w in sparse.decode(q_sparse, top_k=6))
        print(f"  SPLADE query terms: {terms}")
        fused = _rrf([dense_rank[:5], sparse_rank[:5]])[:5]
        reranked = reranker.rank(query, [CORPUS[i] for i in fused], top_k=3)
        print(f"  dense top-1 ({dense_scores[dense_rank[0]]:.3f}): {CORPUS[dense_rank[0]][:80]}")
        print(f"  sparse top-1 ({sparse_scores[sparse_rank[0]]:.2f}): {CORPUS[sparse_rank[0]][:80]}")
        for pos, hit in enumerate(reranked, 1):
            print(f"  rerank #{pos} ({hit['score']:.3f}): {CORPUS[fused[hit['corpus_id']]][:80]}")
        print()
    print(f"Done in {time.perf_counter() - t0:.1f}s.")
