"""The loss library: names, arguments and call convention of sentence-transformers
(``Loss(model, ...)``, ``loss(features, labels)``), so porting a script means changing imports."""

from raytrieve.losses.base import Loss, LossInputError, embed_columns
from raytrieve.losses.cached import (
    CachedGISTEmbedLoss,
    CachedMultipleNegativesRankingLoss,
    CachedMultipleNegativesSymmetricRankingLoss,
)
from raytrieve.losses.modifiers import MatryoshkaLoss
from raytrieve.losses.pairwise import (
    AnglELoss,
    ContrastiveLoss,
    CoSENTLoss,
    CosineSimilarityLoss,
    MarginMSELoss,
    MSELoss,
    OnlineContrastiveLoss,
    SiameseDistanceMetric,
    SoftmaxLoss,
)
from raytrieve.losses.ranking import GISTEmbedLoss, MultipleNegativesRankingLoss, MultipleNegativesSymmetricRankingLoss
from raytrieve.losses.triplet import (
    BatchAllTripletLoss,
    BatchHardSoftMarginTripletLoss,
    BatchHardTripletLoss,
    BatchHardTripletLossDistanceFunction,
    BatchSemiHardTripletLoss,
    TripletDistanceMetric,
    TripletLoss,
)

__all__ = [name for name in dir() if not name.startswith("_")]
