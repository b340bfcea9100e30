"""Metrics and evaluators (no Ray): retrieval, similarity, classification and reranking."""

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

__all__ = [name for name in dir() if not name.startswith("_")]
