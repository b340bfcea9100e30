"""Retrieval indices over encoded corpora: dense (exact, int8/binary + rescoring, or FAISS) and
sparse (inverted index). Pure numpy + pyarrow; FAISS is imported only when asked for.

    from raytrieve.index import DenseIndex, SparseIndex, load_index
"""

from raytrieve.index.base import SearchResult, load_index
from raytrieve.index.dense import DenseIndex
from raytrieve.index.sparse import SparseIndex

__all__ = ["DenseIndex", "SearchResult", "SparseIndex", "load_index"]
