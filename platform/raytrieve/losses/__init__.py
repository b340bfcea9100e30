"""The loss library: names, arguments and call convention of sentence-transformers
(``Loss(model, ...)``, ``loss(features, labels)``), so porting a script means changing imports."""

# Sparse and cross-encoder losses live in their own namespaces, as in sentence-transformers:
# raytrieve.losses.sparse (SpladeLoss, SparseMultipleNegativesRankingLoss, ...) and
# raytrieve.losses.cross (BinaryCrossEntropyLoss, LambdaLoss, ...).
from raytrieve.losses import cross, sparse
from raytrieve.losses.base import Loss, LossInputError, column_merging_disabled, embed_columns
from raytrieve.losses.cached import (
    CachedGISTEmbedLoss,
    CachedMultipleNegativesRankingLoss,
    CachedMultipleNegativesSymmetricRankingLoss,
)
from raytrieve.losses.modifiers import AdaptiveLayerLoss, Matryoshka2dLoss, MatryoshkaLoss
from raytrieve.losses.pairwise import (
    AnglELoss,
    ContrastiveLoss,
    CoSENTLoss,
    CosineSimilarityLoss,
    DistillKLDivLoss,
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
from raytrieve.losses.unsupervised import (
    ContrastiveTensionLoss,
    ContrastiveTensionLossInBatchNegatives,
    DenoisingAutoEncoderLoss,
    MegaBatchMarginLoss,
)

__all__ = [name for name in dir() if not name.startswith("_")]
