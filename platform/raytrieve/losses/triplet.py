"""Triplet losses: explicit (anchor, positive, negative) triplets, and the batch-mined
variants over one column of texts with class labels (all valid, hardest, semi-hard,
soft-margin)."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raytrieve.losses.base import Loss, register
from raytrieve.losses.pairwise import pairwise_cos_sim


class TripletDistanceMetric(Enum):
    COSINE = "cosine"
    EUCLIDEAN = "euclidean"
    MANHATTAN = "manhattan"

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        if self is TripletDistanceMetric.COSINE:
            return 1 - pairwise_cos_sim(x, y)
        if self is TripletDistanceMetric.EUCLIDEAN:
            return torch.linalg.vector_norm(x.float() - y.float(), dim=-1)
        return (x.float() - y.float()).abs().sum(dim=-1)


@register("dense")
class TripletLoss(Loss):
    """max(d(a, p) - d(a, n) + margin, 0), averaged."""

    columns = (3, 3)
    column_names = "anchor, positive, negative"

    def __init__(
        self, model: nn.Module, distance_metric: Callable = TripletDistanceMetric.EUCLIDEAN, triplet_margin: float = 5
    ) -> None:
        super().__init__(model)
        self.distance_metric = distance_metric
        self.triplet_margin = triplet_margin

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        a, p, n = embeddings
        return F.relu(self.distance_metric(a, p) - self.distance_metric(a, n) + self.triplet_margin).mean()


class BatchHardTripletLossDistanceFunction:
    """Pairwise distance matrices of one batch of embeddings."""

    @staticmethod
    def cosine_distance(embeddings: Tensor) -> Tensor:
        e = F.normalize(embeddings.float(), p=2, dim=-1)
        with torch.autocast(e.device.type, enabled=False):  # float32 under bf16 training too
            return 1 - e @ e.T

    @staticmethod
    def euclidean_distance(embeddings: Tensor, squared: bool = False) -> Tensor:
        e = embeddings.float()
        with torch.autocast(e.device.type, enabled=False):  # float32 under bf16 training too
            dot = e @ e.T
        sq = torch.diagonal(dot)
        dist = sq.unsqueeze(0) - 2.0 * dot + sq.unsqueeze(1)
        dist = dist.clamp(min=0)
        if not squared:
            # sqrt has an infinite gradient at 0: nudge exact zeros, then zero them again.
            zero = dist.eq(0).float()
            dist = (1.0 - zero) * torch.sqrt(dist + zero * 1e-16)
        return dist

    eucledian_distance = euclidean_distance  # the historical spelling, kept for ported scripts


def _label_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


class _BatchTripletLoss(Loss):
    columns = (1, 1)
    in_batch_negatives = True
    column_names = "one column of texts (+ a class label per text)"
    needs_labels = True

    def __init__(
        self,
        model: nn.Module,
        distance_metric: Callable = BatchHardTripletLossDistanceFunction.euclidean_distance,
        margin: float = 5,
    ) -> None:
        super().__init__(model)
        self.distance_metric = distance_metric
        self.triplet_margin = margin

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None) -> Tensor:
        emb = embeddings[0]
        labels = self.check_labels(labels, emb.shape[0], type(self).__name__, "a class id per text").view(-1)
        return self.batch_loss(labels, emb)

    def batch_loss(self, labels: Tensor, embeddings: Tensor) -> Tensor:
        raise NotImplementedError

    def _hardest(self, labels: Tensor, dist: Tensor) -> tuple[Tensor, Tensor]:
        ap, an = _label_masks(labels)
        hardest_pos = (ap.float() * dist).max(dim=1, keepdim=True).values
        row_max = dist.max(dim=1, keepdim=True).values
        hardest_neg = (dist + row_max * (1.0 - an.float())).min(dim=1, keepdim=True).values
        return hardest_pos, hardest_neg


@register("dense")
class BatchHardTripletLoss(_BatchTripletLoss):
    """For each anchor: its farthest positive against its closest negative."""

    def batch_loss(self, labels: Tensor, embeddings: Tensor) -> Tensor:
        hp, hn = self._hardest(labels, self.distance_metric(embeddings))
        return F.relu(hp - hn + self.triplet_margin).mean()


@register("dense")
class BatchHardSoftMarginTripletLoss(_BatchTripletLoss):
    """Batch-hard triplets with softplus in place of the hinge: no margin to tune."""

    def __init__(
        self, model: nn.Module, distance_metric: Callable = BatchHardTripletLossDistanceFunction.euclidean_distance
    ) -> None:
        super().__init__(model, distance_metric, 0.0)

    def batch_loss(self, labels: Tensor, embeddings: Tensor) -> Tensor:
        hp, hn = self._hardest(labels, self.distance_metric(embeddings))
        return F.softplus(hp - hn).mean()


@register("dense")
class BatchAllTripletLoss(_BatchTripletLoss):
    """Every valid (anchor, positive, negative) triplet in the batch; mean over the active ones."""

    def batch_loss(self, labels: Tensor, embeddings: Tensor) -> Tensor:
        dist = self.distance_metric(embeddings)
        ap, _ = _label_masks(labels)
        a_idx, p_idx = ap.nonzero(as_tuple=True)
        triplets = dist[a_idx, p_idx].unsqueeze(1) - dist[a_idx] + self.triplet_margin
        triplets = (labels[a_idx].unsqueeze(1) != labels.unsqueeze(0)).float() * triplets
        triplets = triplets.clamp(min=0)
        active = int((triplets > 1e-16).sum())
        return triplets.sum() / (active + 1e-16)


@register("dense")
class BatchSemiHardTripletLoss(_BatchTripletLoss):
    """For each (anchor, positive): the closest negative that is still farther than the
    positive; if none, the farthest negative."""

    def batch_loss(self, labels: Tensor, embeddings: Tensor) -> Tensor:
        labels = labels.view(-1, 1)
        dist = self.distance_metric(embeddings)
        same = labels == labels.T
        n = labels.numel()
        sorted_neg = dist.masked_fill(same, float("inf")).sort(dim=1, stable=True).values
        pos = torch.searchsorted(sorted_neg.detach().contiguous(), dist.detach().contiguous(), right=True)
        outside = sorted_neg.gather(1, pos.clamp(max=n - 1))
        row_min = dist.min(dim=1, keepdim=True).values
        inside = ((dist - row_min) * (~same).float()).max(dim=1, keepdim=True).values + row_min
        semi_hard = torch.where(torch.isfinite(outside), outside, inside)
        loss_mat = dist - semi_hard + self.triplet_margin
        mask_pos = same.float() - torch.eye(n, device=dist.device)
        return (loss_mat * mask_pos).clamp(min=0).sum() / mask_pos.sum().clamp(min=1e-16)
