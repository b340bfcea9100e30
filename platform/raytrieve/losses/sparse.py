"""Sparse (SPLADE) losses: a ranking or distillation loss on sparse embeddings plus FLOPS
regularization, which drives most vocabulary weights to zero.

``SpladeLoss(model, SparseMultipleNegativesRankingLoss(model), document_regularizer_weight=3e-5,
query_regularizer_weight=5e-5)`` returns its components as a dict (summed for backward,
logged apart). Column 0 holds the queries, the other columns documents.

``CSRLoss`` trains a dense model topped by a SparseAutoEncoder (CSR): a base loss on the
sparse codes plus the autoencoder's reconstruction losses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raytrieve.encoders.similarity import dot
from raytrieve.errors import ConfigError
from raytrieve.losses.base import Features, Loss, LossContract, LossInputError, register
from raytrieve.losses.pairwise import (
    AnglELoss,
    CoSENTLoss,
    CosineSimilarityLoss,
    DistillKLDivLoss,
    MarginMSELoss,
    MSELoss,
    pairwise_cos_sim,
    pairwise_dot_score,
)
from raytrieve.losses.ranking import MultipleNegativesRankingLoss
from raytrieve.losses.triplet import TripletDistanceMetric, TripletLoss

if TYPE_CHECKING:
    from raytrieve.encoders.sparse import SparseEncoder


class FlopsLoss(nn.Module):
    """sum_j (mean_i E_ij)^2: the expected number of floating-point operations of a sparse dot product.

    With ``threshold``, rows with at most that many active dimensions are left out
    (they are sparse enough already); the mean still divides by every row.
    """

    def __init__(self, model: nn.Module | None = None, threshold: float | None = None) -> None:
        super().__init__()
        self.threshold = threshold

    def compute_loss_from_embeddings(self, embeddings: Tensor) -> Tensor:
        if self.threshold is not None:
            active = (embeddings != 0).sum(dim=1)
            embeddings = embeddings * (active > self.threshold).float().unsqueeze(1)
        return torch.sum(torch.mean(embeddings, dim=0) ** 2)


@register("sparse")
class SpladeLoss(LossContract, nn.Module):
    """A base loss on sparse embeddings plus FLOPS regularizers on documents and (optionally) queries."""

    required_args: ClassVar[Mapping[str, str]] = {"document_regularizer_weight": "3e-5"}

    def __init__(
        self,
        model: nn.Module,
        loss: Loss,
        document_regularizer_weight: float,
        query_regularizer_weight: float | None = None,
        document_regularizer: FlopsLoss | None = None,
        query_regularizer: FlopsLoss | None = None,
        document_regularizer_threshold: int | None = None,
        query_regularizer_threshold: int | None = None,
        use_document_regularizer_only: bool = False,
    ) -> None:
        super().__init__()
        if not hasattr(loss, "compute_loss_from_embeddings"):
            raise ConfigError(f"SpladeLoss: the base loss {type(loss).__name__} must work on embeddings")
        self.model = model
        self.loss = loss
        self.document_regularizer_weight = document_regularizer_weight
        self.document_regularizer = document_regularizer or FlopsLoss(model, threshold=document_regularizer_threshold)
        self.use_document_regularizer_only = use_document_regularizer_only
        # Documents only: every column, queries included, is regularized as a document.
        self.query_regularizer_weight = None if use_document_regularizer_only else query_regularizer_weight
        self.query_regularizer = None
        if not use_document_regularizer_only:
            self.query_regularizer = query_regularizer or FlopsLoss(model, threshold=query_regularizer_threshold)

    def forward(self, features: Sequence[Features], labels: Tensor | None = None) -> dict[str, Tensor]:
        features = list(features)
        self.loss.check_columns(len(features))
        embeddings = self.loss.embed(features)
        return self.compute_loss_from_embeddings(embeddings, labels)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None) -> dict[str, Tensor]:
        base = self.loss.compute_loss_from_embeddings(embeddings, labels)
        losses = dict(base) if isinstance(base, dict) else {"base_loss": base}
        docs = torch.cat(embeddings if self.use_document_regularizer_only else embeddings[1:])
        losses["document_regularizer_loss"] = (
            self.document_regularizer.compute_loss_from_embeddings(docs) * self.document_regularizer_weight
        )
        if self.query_regularizer_weight is not None:
            assert self.query_regularizer is not None, "a query weight is only kept with a query regularizer"
            losses["query_regularizer_loss"] = (
                self.query_regularizer.compute_loss_from_embeddings(embeddings[0]) * self.query_regularizer_weight
            )
        return losses


class SpladeRegularizerWeightScheduler:
    """Warm the FLOPS weights up from 0 to their targets over the first ``warmup_ratio`` of
    training (quadratically by default): a strong regularizer from step 0 collapses SPLADE
    to empty vectors. The training loop calls ``step(global_step)`` before each step."""

    def __init__(
        self, loss: SpladeLoss, total_steps: int, scheduler_type: str = "quadratic", warmup_ratio: float = 1 / 3
    ) -> None:
        if scheduler_type not in ("quadratic", "linear"):
            raise ConfigError(f"scheduler_type {scheduler_type!r} must be 'quadratic' or 'linear'")
        if not 0 < warmup_ratio <= 1:
            raise ConfigError(f"warmup_ratio must be in (0, 1], got {warmup_ratio}")
        self.loss = loss
        self.scheduler_type = scheduler_type
        self.max_document = loss.document_regularizer_weight
        self.max_query = loss.query_regularizer_weight
        self.warmup_steps = max(1, int(total_steps * warmup_ratio))

    def _weight(self, target: float, step: int) -> float:
        if step >= self.warmup_steps:
            return target
        r = step / self.warmup_steps
        return target * (r if self.scheduler_type == "linear" else r * r)

    def step(self, global_step: int) -> dict[str, float]:
        self.loss.document_regularizer_weight = self._weight(self.max_document, global_step)
        self.loss.query_regularizer_weight = (
            None if self.max_query is None else self._weight(self.max_query, global_step)
        )
        out = {"document_regularizer_weight": self.loss.document_regularizer_weight}
        if self.loss.query_regularizer_weight is not None:
            out["query_regularizer_weight"] = self.loss.query_regularizer_weight
        return out


@register("sparse")
class SparseMultipleNegativesRankingLoss(MultipleNegativesRankingLoss):
    """InfoNCE on sparse embeddings: dot product, scale 1 (SPLADE scores are unnormalized)."""

    def __init__(self, model: nn.Module, scale: float = 1.0, similarity_fct: Callable = dot, **kwargs: Any) -> None:
        super().__init__(model, scale=scale, similarity_fct=similarity_fct, **kwargs)


@register("sparse")
class SparseMarginMSELoss(MarginMSELoss):
    def __init__(self, model: nn.Module, similarity_fct: Callable = pairwise_dot_score) -> None:
        super().__init__(model, similarity_fct=similarity_fct)


@register("sparse")
class SparseDistillKLDivLoss(DistillKLDivLoss):
    def __init__(
        self,
        model: nn.Module,
        similarity_fct: Callable = pairwise_dot_score,
        temperature: float = 2.0,
        student_temperature: float | None = None,
        teacher_temperature: float | None = None,
    ) -> None:
        super().__init__(model, similarity_fct, temperature, student_temperature, teacher_temperature)


@register("sparse")
class SparseCosineSimilarityLoss(CosineSimilarityLoss):
    def __init__(
        self, model: SparseEncoder, loss_fct: nn.Module | None = None, cos_score_transformation: nn.Module | None = None
    ) -> None:
        super().__init__(model, loss_fct, cos_score_transformation)
        model.similarity_fn_name = "cosine"


@register("sparse")
class SparseCoSENTLoss(CoSENTLoss):
    def __init__(self, model: SparseEncoder, scale: float = 20.0, similarity_fct: Callable = pairwise_cos_sim) -> None:
        super().__init__(model, scale, similarity_fct)
        model.similarity_fn_name = "cosine"


@register("sparse")
class SparseAnglELoss(AnglELoss):
    pass


@register("sparse")
class SparseMSELoss(MSELoss):
    def __init__(self, model: SparseEncoder) -> None:
        super().__init__(model)


@register("sparse")
class SparseTripletLoss(TripletLoss):
    def __init__(
        self, model: nn.Module, distance_metric: Callable = TripletDistanceMetric.EUCLIDEAN, triplet_margin: float = 5
    ) -> None:
        super().__init__(model, distance_metric, triplet_margin)


def normalized_mean_squared_error(reconstruction: Tensor, target: Tensor) -> Tensor:
    """MSE divided by the batch's own spread around its mean (plain MSE when it has none),
    so the auxiliary loss does not shrink with the residual it reconstructs."""
    spread = F.mse_loss(target.mean(dim=0, keepdim=True).expand_as(target), target)
    flat = (spread == 0) | (target == target[:1]).all()
    return F.mse_loss(reconstruction, target) / torch.where(flat, torch.ones_like(spread), spread)


class CSRReconstructionLoss(nn.Module):
    """How well the SparseAutoEncoder's codes reconstruct the backbone embedding: from the top
    k latents, from the top 4k (weighted 1/8), and (weighted ``beta``) the residual left by
    the top k, from latents that have been dead for a while. Averaged over the columns."""

    def __init__(self, model: nn.Module, beta: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.beta = beta

    def compute_loss_from_embeddings(self, outputs: list[Features]) -> dict[str, Tensor]:
        if not outputs or "decoded_embedding_k" not in outputs[0]:
            raise LossInputError(
                "CSRReconstructionLoss needs the training outputs of a SparseAutoEncoder module "
                "(decoded_embedding_k, ...): end the model's stack with one, in train mode and with autograd on"
            )
        k, k4, aux = [], [], []
        for out in outputs:
            x = out["sentence_embedding_backbone"]
            k.append(F.mse_loss(x, out["decoded_embedding_k"]))
            k4.append(F.mse_loss(x, out["decoded_embedding_4k"]))
            if out["decoded_embedding_aux"] is not None:
                # The dead latents learn the residual the live top-k leave (a fixed target).
                residual = x - out["decoded_embedding_k_pre_bias"].detach()
                aux.append(normalized_mean_squared_error(out["decoded_embedding_aux"], residual))
            else:
                aux.append(torch.zeros_like(k[-1]))
        n = len(outputs)
        return {
            "reconstruction_loss_k": torch.stack(k).sum() / n,
            "reconstruction_loss_4k": torch.stack(k4).sum() / n / 8.0,
            "reconstruction_loss_aux": self.beta * (torch.stack(aux).sum() / n),
        }


@register("sparse")
class CSRLoss(LossContract, nn.Module):
    """CSR training (arXiv 2503.01776): the reconstruction losses plus ``gamma`` x a base loss
    on the sparse codes (default SparseMultipleNegativesRankingLoss). The model ends in a
    SparseAutoEncoder; components come back as a dict."""

    def __init__(self, model: nn.Module, loss: Loss | None = None, beta: float = 0.1, gamma: float = 1.0) -> None:
        super().__init__()
        from raytrieve.modules import SparseAutoEncoder

        if not any(isinstance(m, SparseAutoEncoder) for m in model.modules()):
            raise ConfigError(
                "CSRLoss trains a model whose stack ends in a SparseAutoEncoder module (e.g. Transformer, Pooling, "
                "SparseAutoEncoder); this model has none, use SpladeLoss for SPLADE models"
            )
        if loss is not None and not hasattr(loss, "compute_loss_from_embeddings"):
            raise ConfigError(f"CSRLoss: the base loss {type(loss).__name__} must work on embeddings")
        self.model = model
        self.beta, self.gamma = beta, gamma
        self.reconstruction_loss = CSRReconstructionLoss(model, beta=beta)
        self.loss = loss if loss is not None else SparseMultipleNegativesRankingLoss(model)

    def forward(self, features: Sequence[Features], labels: Tensor | None = None) -> dict[str, Tensor]:
        features = list(features)
        if hasattr(self.loss, "check_columns"):
            self.loss.check_columns(len(features))
        # One forward per column: the autoencoder's dead-latent clock ticks once per call,
        # and its reconstructions are per column.
        outputs = [self.model(f) for f in features]
        losses = self.reconstruction_loss.compute_loss_from_embeddings(outputs)
        base = self.loss.compute_loss_from_embeddings([o["sentence_embedding"] for o in outputs], labels)
        for key, value in base.items() if isinstance(base, dict) else [("base_loss", base)]:
            losses[key] = value * self.gamma
        return losses
