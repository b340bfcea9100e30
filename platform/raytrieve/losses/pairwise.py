"""Losses on scored pairs and on distillation targets: CoSENT, AnglE, CosineSimilarity,
Contrastive, OnlineContrastive, MSE (embedding distillation), MarginMSE, Softmax."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raytrieve.encoders.similarity import _pairwise_cosine, _pairwise_dot
from raytrieve.errors import ConfigError
from raytrieve.losses.base import Loss, LossInputError, register

if TYPE_CHECKING:
    from raytrieve.encoders.base import EmbeddingEncoder


def pairwise_cos_sim(a: Tensor, b: Tensor) -> Tensor:
    return _pairwise_cosine(a, b)


def pairwise_dot_score(a: Tensor, b: Tensor) -> Tensor:
    return _pairwise_dot(a, b)


def pairwise_angle_sim(x: Tensor, y: Tensor) -> Tensor:
    """AnglE's angle difference in complex space: |Re + Im| of the normalized complex quotient."""
    x, y = x.float(), y.float()
    if x.shape[1] % 2:
        x, y = F.pad(x, (0, 1)), F.pad(y, (0, 1))
    nx, ny = F.normalize(x, p=2, dim=1), F.normalize(y, p=2, dim=1)
    cos = (nx * ny).sum(dim=1)
    fx, lx = nx.chunk(2, dim=1)
    fy, ly = ny.chunk(2, dim=1)
    sin = (lx * fy - fx * ly).sum(dim=1)
    return (cos + sin).abs()


@register("dense")
class CoSENTLoss(Loss):
    """log(1 + sum over pairs (i, j) with label_i < label_j of exp(scale * (s_i - s_j))):
    pairs with a higher label must score higher."""

    columns = (2, 2)
    column_names = "sentence1, sentence2 (+ a score label)"
    needs_labels = True

    def __init__(self, model: nn.Module, scale: float = 20.0, similarity_fct: Callable = pairwise_cos_sim) -> None:
        super().__init__(model)
        self.scale = scale
        self.similarity_fct = similarity_fct

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None) -> Tensor:
        labels = self.check_labels(labels, embeddings[0].shape[0], type(self).__name__, "a similarity score per pair")
        return self._cosent(self.similarity_fct(embeddings[0], embeddings[1]), labels.view(-1))

    def _cosent(self, scores: Tensor, labels: Tensor) -> Tensor:
        scores = scores.float() * self.scale
        if labels.dtype == torch.bool:
            labels = labels.int()
        labels, order = labels.sort()
        scores = scores[order]
        higher_start = torch.searchsorted(labels, labels, right=True)
        # suffix[k] = logsumexp over j >= k of -s_j; labels sorted, so j >= higher_start(i) are the higher ones.
        suffix = torch.logcumsumexp(-scores.flip(0), dim=0).flip(0)
        suffix = torch.cat([suffix, suffix.new_full((1,), float("-inf"))])
        terms = scores + suffix[higher_start]
        return torch.logsumexp(torch.cat([terms.new_zeros(1), terms]), dim=0)


@register("dense")
class AnglELoss(CoSENTLoss):
    """CoSENT with the angle similarity; with more than 2 columns, column 0 against each
    other column, the first pair labelled 1 and the rest 0 unless labels are given."""

    columns = (2, None)

    def __init__(self, model: nn.Module, scale: float = 20.0) -> None:
        super().__init__(model, scale=scale, similarity_fct=pairwise_angle_sim)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None) -> Tensor:
        if len(embeddings) > 2:
            anchor = embeddings[0]
            rows, n = anchor.shape[0], len(embeddings)
            if labels is None:
                labels = torch.ones(rows, device=anchor.device)
            labels = self.check_labels(labels, rows, "AnglELoss").view(-1)
            pairs = (anchor.repeat(n - 1, 1), torch.cat(embeddings[1:]))
            combined = torch.cat([labels, (1 - labels).repeat(n - 2)])
            return self._cosent(self.similarity_fct(*pairs), combined)
        return super().compute_loss_from_embeddings(embeddings, labels)


@register("dense")
class CosineSimilarityLoss(Loss):
    """loss_fct(cos(u, v), label): regress the cosine similarity onto a gold score."""

    columns = (2, 2)
    column_names = "sentence1, sentence2 (+ a score label)"
    needs_labels = True

    def __init__(
        self, model: nn.Module, loss_fct: nn.Module | None = None, cos_score_transformation: nn.Module | None = None
    ) -> None:
        super().__init__(model)
        self.loss_fct = loss_fct if loss_fct is not None else nn.MSELoss()
        self.cos_score_transformation = cos_score_transformation or nn.Identity()

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None) -> Tensor:
        labels = self.check_labels(labels, embeddings[0].shape[0], "CosineSimilarityLoss", "a score per pair")
        scores = self.cos_score_transformation(torch.cosine_similarity(embeddings[0], embeddings[1]))
        return self.loss_fct(scores, labels.float().view(-1))


class SiameseDistanceMetric(Enum):
    """Distances between paired embeddings (the value is the function)."""

    EUCLIDEAN = "euclidean"
    MANHATTAN = "manhattan"
    COSINE_DISTANCE = "cosine_distance"

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        if self is SiameseDistanceMetric.EUCLIDEAN:
            return F.pairwise_distance(x, y, p=2)
        if self is SiameseDistanceMetric.MANHATTAN:
            return F.pairwise_distance(x, y, p=1)
        return 1 - F.cosine_similarity(x, y)


@register("dense")
class ContrastiveLoss(Loss):
    """Positive pairs (label 1) pulled together, negative pairs pushed beyond ``margin``."""

    columns = (2, 2)
    column_names = "sentence1, sentence2 (+ a 0/1 label)"
    needs_labels = True

    def __init__(
        self,
        model: nn.Module,
        distance_metric: Callable = SiameseDistanceMetric.COSINE_DISTANCE,
        margin: float = 0.5,
        size_average: bool = True,
    ) -> None:
        super().__init__(model)
        self.distance_metric = distance_metric
        self.margin = margin
        self.size_average = size_average

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None) -> Tensor:
        labels = self.check_labels(labels, embeddings[0].shape[0], "ContrastiveLoss", "0 or 1 per pair").view(-1)
        d = self.distance_metric(embeddings[0], embeddings[1])
        losses = 0.5 * (labels.float() * d.pow(2) + (1 - labels).float() * F.relu(self.margin - d).pow(2))
        return losses.mean() if self.size_average else losses.sum()


@register("dense")
class OnlineContrastiveLoss(ContrastiveLoss):
    """Contrastive loss on the hard pairs only: positives farther than the closest
    negative, negatives closer than the farthest positive. Summed, not averaged."""

    def __init__(
        self, model: nn.Module, distance_metric: Callable = SiameseDistanceMetric.COSINE_DISTANCE, margin: float = 0.5
    ) -> None:
        super().__init__(model, distance_metric=distance_metric, margin=margin)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None) -> Tensor:
        labels = self.check_labels(labels, embeddings[0].shape[0], "OnlineContrastiveLoss", "0 or 1 per pair").view(-1)
        d = self.distance_metric(embeddings[0], embeddings[1])
        negs, poss = d[labels == 0], d[labels == 1]
        negative_pairs = negs[negs < (poss.max() if len(poss) else negs.mean())]
        positive_pairs = poss[poss > (negs.min() if len(negs) else poss.mean())]
        return positive_pairs.pow(2).sum() + F.relu(self.margin - negative_pairs).pow(2).sum()


@register("dense")
class MSELoss(Loss):
    """Distillation: MSE between the student's embeddings of each column and the teacher's
    (labels [batch, dim], or [batch, columns, dim] for one target per column)."""

    needs_labels = True

    def __init__(self, model: EmbeddingEncoder, projection_dim: int | None = None) -> None:
        super().__init__(model)
        self.projection = None
        if projection_dim is not None:
            dim = model.get_embedding_dimension()
            if dim is None:
                raise ConfigError("MSELoss: projection_dim needs a model that knows its embedding dimension")
            self.projection = nn.Linear(dim, projection_dim, device=model.device)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None) -> Tensor:
        if labels is None:
            raise LossInputError("MSELoss needs teacher embeddings as labels ([batch, dim] or [batch, columns, dim])")
        labels = labels.detach()
        losses = []
        for i, student in enumerate(embeddings):
            if labels.dim() == 2:
                target = labels
            elif labels.dim() == 3 and labels.shape[1] == len(embeddings):
                target = labels[:, i]
            else:
                raise LossInputError(
                    f"MSELoss: labels of shape {tuple(labels.shape)} fit neither [batch, dim] nor "
                    f"[batch, {len(embeddings)} columns, dim]"
                )
            target = target.to(device=student.device, dtype=student.dtype)
            if self.projection is not None:
                student = self.projection(student)
            losses.append(F.mse_loss(student, target))
        return torch.stack(losses).mean()


def margin_targets(labels: Tensor | None, rows: int, negatives: int, loss: str) -> Tensor:
    """Teacher margins [rows, negatives] from margins, a single margin per row, or raw teacher
    scores [rows, 1 + negatives] (positive first)."""
    if labels is None:
        raise LossInputError(f"{loss} needs teacher margins (or scores) as labels")
    if labels.shape == (rows, negatives + 1):
        labels = labels[:, :1] - labels[:, 1:]
    if labels.shape == (rows,):
        labels = labels.unsqueeze(1)
    if labels.shape != (rows, negatives):
        raise LossInputError(
            f"{loss}: labels shape {tuple(labels.shape)}; expected [{rows}, {negatives}] margins "
            f"or [{rows}, {negatives + 1}] scores"
        )
    return labels.detach()


@register("dense")
class MarginMSELoss(Loss):
    """MSE between the student's margins sim(q, pos) - sim(q, neg_k) and the teacher's."""

    columns = (3, None)
    column_names = "query, positive, negative(s) (+ teacher margins or scores)"
    needs_labels = True

    def __init__(self, model: nn.Module, similarity_fct: Callable = pairwise_dot_score) -> None:
        super().__init__(model)
        self.similarity_fct = similarity_fct

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None) -> Tensor:
        query, positive, negatives = embeddings[0], embeddings[1], embeddings[2:]
        labels = margin_targets(labels, query.shape[0], len(negatives), type(self).__name__)
        sp = self.similarity_fct(query, positive)
        margins = torch.stack([sp - self.similarity_fct(query, n) for n in negatives], dim=1)
        return F.mse_loss(margins, labels.to(margins.dtype))


@register("dense")
class SoftmaxLoss(Loss):
    """A classifier over (u, v, |u - v|, u * v) trained with cross-entropy (NLI-style labels)."""

    columns = (2, 2)
    column_names = "sentence1, sentence2 (+ a class label)"
    needs_labels = True

    def __init__(
        self,
        model: nn.Module,
        embedding_dimension: int,
        num_labels: int,
        concatenation_sent_rep: bool = True,
        concatenation_sent_difference: bool = True,
        concatenation_sent_multiplication: bool = False,
        loss_fct: nn.Module | None = None,
    ) -> None:
        super().__init__(model)
        self.num_labels = num_labels
        self.concatenation_sent_rep = concatenation_sent_rep
        self.concatenation_sent_difference = concatenation_sent_difference
        self.concatenation_sent_multiplication = concatenation_sent_multiplication
        n = 2 * concatenation_sent_rep + concatenation_sent_difference + concatenation_sent_multiplication
        if n == 0:
            raise ConfigError("SoftmaxLoss: enable at least one concatenation_* option")
        self.classifier = nn.Linear(n * embedding_dimension, num_labels, device=model.device)
        self.loss_fct = loss_fct if loss_fct is not None else nn.CrossEntropyLoss()

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None) -> Tensor:
        a, b = embeddings
        parts = []
        if self.concatenation_sent_rep:
            parts += [a, b]
        if self.concatenation_sent_difference:
            parts.append((a - b).abs())
        if self.concatenation_sent_multiplication:
            parts.append(a * b)
        output = self.classifier(torch.cat(parts, dim=1).to(self.classifier.weight.dtype))
        labels = self.check_labels(labels, a.shape[0], "SoftmaxLoss", "a class id per pair")
        if self.num_labels == 1 or labels.shape != output.shape:
            labels = labels.view(-1)
        return self.loss_fct(output, labels)


@register("dense")
class DistillKLDivLoss(Loss):
    """KL divergence between the teacher's and the student's score distributions over each
    query's candidates (columns: query, then candidates; labels: teacher scores [batch, candidates])."""

    columns = (3, None)
    column_names = "query, then two or more candidates (+ teacher scores per candidate)"
    needs_labels = True

    def __init__(
        self,
        model: nn.Module,
        similarity_fct: Callable = pairwise_dot_score,
        temperature: float = 1.0,
        student_temperature: float | None = None,
        teacher_temperature: float | None = None,
    ) -> None:
        super().__init__(model)
        self.similarity_fct = similarity_fct
        self.student_temperature = student_temperature if student_temperature is not None else temperature
        self.teacher_temperature = teacher_temperature if teacher_temperature is not None else temperature
        for name, t in (
            ("student_temperature", self.student_temperature),
            ("teacher_temperature", self.teacher_temperature),
        ):
            if not (t > 0 and t != float("inf")):
                raise ConfigError(f"{type(self).__name__}: {name} must be a finite positive number, got {t}")

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None) -> Tensor:
        query, candidates = embeddings[0], embeddings[1:]
        if labels is None or labels.shape != (query.shape[0], len(candidates)):
            raise LossInputError(
                f"{type(self).__name__}: labels must be teacher scores of shape [{query.shape[0]}, {len(candidates)}]"
            )
        scores = torch.stack([self.similarity_fct(query, c) for c in candidates], dim=1) / self.student_temperature
        log_p = F.log_softmax(scores, dim=1)
        target = F.softmax(labels.detach().to(scores.dtype) / self.teacher_temperature, dim=1)
        return F.kl_div(log_p, target, reduction="batchmean") * self.student_temperature**2
