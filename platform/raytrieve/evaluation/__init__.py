"""Metrics and evaluators (no Ray): retrieval, similarity, classification and reranking.

The evaluators load on first use of their name: ``raytrieve.evaluation.metrics`` (pure numpy,
which `raytrieve evaluate`'s scoring and reports use) then imports without torch and
transformers, whose ~5 s of imports an evaluation would otherwise pay before it checks its
arguments and files.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raytrieve.evaluation.base import Evaluator, SequentialEvaluator
    from raytrieve.evaluation.cross import (
        CrossEncoderClassificationEvaluator,
        CrossEncoderCorrelationEvaluator,
        CrossEncoderRerankingEvaluator,
    )
    from raytrieve.evaluation.ir import InformationRetrievalEvaluator, SparseInformationRetrievalEvaluator
    from raytrieve.evaluation.pairs import (
        BinaryClassificationEvaluator,
        EmbeddingSimilarityEvaluator,
        MSEEvaluator,
        ParaphraseMiningEvaluator,
        RerankingEvaluator,
        TripletEvaluator,
    )

# Each public name and the module that defines it.
_HOME = {
    "Evaluator": "base",
    "SequentialEvaluator": "base",
    "CrossEncoderClassificationEvaluator": "cross",
    "CrossEncoderCorrelationEvaluator": "cross",
    "CrossEncoderRerankingEvaluator": "cross",
    "InformationRetrievalEvaluator": "ir",
    "SparseInformationRetrievalEvaluator": "ir",
    "BinaryClassificationEvaluator": "pairs",
    "EmbeddingSimilarityEvaluator": "pairs",
    "MSEEvaluator": "pairs",
    "ParaphraseMiningEvaluator": "pairs",
    "RerankingEvaluator": "pairs",
    "TripletEvaluator": "pairs",
}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
