"""The Lee corpus: 50 news documents with human similarity judgments for every pair
(Lee, Pincombe & Welsh 2005), shipped as test data in the gensim wheel. Read from its
files; gensim itself is never imported.

    evaluator = lee_evaluator()
    evaluator(DenseEncoder("all-minilm-l6-v2"))   # {"lee_pearson_cosine": ..., "lee_spearman_cosine": ...}
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from raytrieve.errors import AssetError
from raytrieve.evaluation.pairs import EmbeddingSimilarityEvaluator


def lee_dir() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise AssetError("the Lee corpus ships in the gensim wheel: pip install --no-deps gensim")
    folder = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data"
    if not (folder / "lee.cor").exists():
        raise AssetError(f"{folder}/lee.cor is missing from the installed gensim; reinstall it")
    return folder


def lee_pairs() -> tuple[list[str], list[str], list[float]]:
    """Every unordered pair of the 50 documents with its mean human similarity (0..1)."""
    folder = lee_dir()
    docs = [line.strip() for line in (folder / "lee.cor").read_text(encoding="latin-1").splitlines() if line.strip()]
    matrix = np.loadtxt(folder / "similarities0-1.txt")
    if matrix.shape != (len(docs), len(docs)):
        raise AssetError(f"{folder}: {len(docs)} documents but a {matrix.shape} similarity matrix")
    s1, s2, scores = [], [], []
    for i in range(len(docs)):
        for j in range(i + 1, len(docs)):
            s1.append(docs[i])
            s2.append(docs[j])
            # The file fills the upper triangle; take whichever half holds the judgment.
            scores.append(float(max(matrix[i, j], matrix[j, i])))
    return s1, s2, scores


def lee_evaluator(**kwargs) -> EmbeddingSimilarityEvaluator:
    s1, s2, scores = lee_pairs()
    return EmbeddingSimilarityEvaluator(s1, s2, scores, name=kwargs.pop("name", "lee"), **kwargs)
