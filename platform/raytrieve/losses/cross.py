"""Cross-encoder losses. Inputs are text columns (the loss pairs and tokenizes them):
pointwise ``[queries, documents]`` with a label per pair, ``[anchors, positives, *negatives]``
for ranking, and listwise ``[queries, list of documents per query]`` with a list of label
tensors (one per query, any length).

This module is the namespace of all of them (as sentence-transformers' cross_encoder.losses):
the pointwise and ranking losses are defined here, the listwise ones in losses/listwise.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raytrieve.losses.base import CrossLoss, LossInputError, register
from raytrieve.losses.cached import RandContext
from raytrieve.losses.listwise import (
    LambdaLoss,
    LambdaRankScheme,
    ListMLELoss,
    ListNetLoss,
    ListwiseLoss,
    NDCGLoss1Scheme,
    NDCGLoss2PPScheme,
    NDCGLoss2Scheme,
    NoWeightingScheme,
    PListMLELambdaWeight,
    PListMLELoss,
    RankNetLoss,
)
from raytrieve.losses.pairwise import margin_targets

if TYPE_CHECKING:
    from raytrieve.encoders.cross import CrossEncoder


@register("cross")
class BinaryCrossEntropyLoss(CrossLoss):
    """BCE on the logit of each (query, document) pair; ``pos_weight`` re-weights positives."""

    needs_labels = True

    def __init__(
        self,
        model: CrossEncoder,
        activation_fn: nn.Module | None = None,
        pos_weight: Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, activation_fn)
        self.require_single_label()
        self.bce = nn.BCEWithLogitsLoss(pos_weight=pos_weight, **kwargs)

    def forward(self, inputs: Sequence[Sequence[str]], labels: Tensor) -> Tensor:
        self.check_columns(len(inputs))
        logits = self.activation_fn(self.logits(list(zip(*inputs))).view(-1))
        return self.bce(logits, labels.view(-1).float().to(logits.device))


@register("cross")
class CrossEntropyLoss(CrossLoss):
    """Cross-entropy over the model's classes. Labels are class ids (one per pair), or class
    probabilities [pairs, num_labels] (soft labels, e.g. a teacher's softmax)."""

    needs_labels = True

    def __init__(self, model: CrossEncoder, activation_fn: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(model, activation_fn)
        self.ce = nn.CrossEntropyLoss(**kwargs)

    def forward(self, inputs: Sequence[Sequence[str]], labels: Tensor) -> Tensor:
        self.check_columns(len(inputs))
        logits = self.activation_fn(self.logits(list(zip(*inputs))))
        return self.ce(logits, self._targets(labels, logits))

    @staticmethod
    def _targets(labels: Tensor, logits: Tensor) -> Tensor:
        rows, classes = logits.shape
        labels = torch.as_tensor(labels, device=logits.device)
        if labels.is_floating_point() and labels.shape == (rows, classes) and classes > 1:
            return labels.to(logits.dtype)
        if labels.numel() == rows and (not labels.is_floating_point() or bool((labels == labels.round()).all())):
            # Class ids often arrive as floats (a pandas column with a missing value, a csv).
            return labels.reshape(-1).long()
        raise LossInputError(
            f"CrossEntropyLoss: labels of shape {tuple(labels.shape)} ({labels.dtype}) fit neither class ids "
            f"[{rows}] nor class probabilities [{rows}, {classes}] (one column per model label); "
            "fix the label column"
        )


@register("cross")
class MSELoss(CrossLoss):
    """Regress the pair's score onto a (teacher) score."""

    needs_labels = True

    def __init__(self, model: CrossEncoder, activation_fn: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(model, activation_fn)
        self.require_single_label()
        self.mse = nn.MSELoss(**kwargs)

    def forward(self, inputs: Sequence[Sequence[str]], labels: Tensor) -> Tensor:
        self.check_columns(len(inputs))
        logits = self.activation_fn(self.logits(list(zip(*inputs))).view(-1))
        return self.mse(logits, labels.view(-1).detach().float().to(logits.device))


@register("cross")
class MarginMSELoss(CrossLoss):
    """MSE between score margins (positive minus each negative) and the teacher's margins."""

    columns = (3, None)
    column_names = "queries, positives, negatives..."
    needs_labels = True

    def __init__(self, model: CrossEncoder, activation_fn: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(model, activation_fn)
        self.require_single_label()
        self.mse = nn.MSELoss(**kwargs)

    def forward(self, inputs: Sequence[Sequence[str]], labels: Tensor | list[Tensor]) -> Tensor:
        self.check_columns(len(inputs))
        anchors, positives, negatives = inputs[0], inputs[1], inputs[2:]
        if isinstance(labels, list):
            labels = torch.stack(labels)
        labels = margin_targets(labels, len(anchors), len(negatives), "MarginMSELoss")
        pos = self.activation_fn(self.logits(list(zip(anchors, positives))).view(-1))
        negs = [self.activation_fn(self.logits(list(zip(anchors, n))).view(-1)) for n in negatives]
        margins = pos.unsqueeze(1) - torch.stack(negs, dim=1)
        return self.mse(margins, labels.float().to(margins.device))


def _negative_indices(rows: int, n_cols: int, num_negatives: int | None, device) -> Tensor:
    """For each anchor, candidate indices (col * rows + row) other than its own row's."""
    mask = ~torch.eye(rows, dtype=torch.bool, device=device).repeat(1, n_cols)
    valid = rows * n_cols - n_cols
    if num_negatives is not None and num_negatives < valid:
        return torch.multinomial(mask.float(), num_negatives)
    return torch.arange(rows * n_cols, device=device).repeat(rows, 1)[mask].reshape(rows, -1)


@register("cross")
class MultipleNegativesRankingLoss(CrossLoss):
    """Softmax over (anchor, positive) against sampled in-batch and given hard negatives."""

    columns = (2, None)
    in_batch_negatives = True
    column_names = "anchors, positives, optional hard negatives..."

    def __init__(
        self,
        model: CrossEncoder,
        num_negatives: int | None = 4,
        scale: float = 10.0,
        activation_fn: nn.Module | None = nn.Sigmoid(),
    ) -> None:
        super().__init__(model, activation_fn)
        self.require_single_label()
        self.num_negatives = num_negatives
        self.scale = scale

    def _pairs(self, inputs: Sequence[Sequence[str]]) -> list[list[tuple[str, str]]]:
        """Pair groups: positives, each sampled-negative slot, each hard-negative column."""
        anchors, candidates = list(inputs[0]), [list(c) for c in inputs[1:]]
        rows = len(anchors)
        flat = [c for col in candidates for c in col]
        idx = _negative_indices(rows, len(candidates), self.num_negatives, self.model.device)
        groups = [list(zip(anchors, candidates[0]))]
        for j in range(idx.shape[1]):
            groups.append([(a, flat[int(i)]) for a, i in zip(anchors, idx[:, j])])
        for col in candidates[1:]:
            groups.append(list(zip(anchors, col)))
        return groups

    def _loss_from_logits(self, logits: Tensor, rows: int) -> Tensor:
        scores = logits.reshape(-1, rows).T
        if self.activation_fn is not None:
            scores = self.activation_fn(scores)
        if self.scale:
            scores = scores * self.scale
        return F.cross_entropy(scores, torch.zeros(rows, dtype=torch.long, device=scores.device))

    def forward(self, inputs: Sequence[Sequence[str]], labels: Any = None) -> Tensor:
        self.check_columns(len(inputs))
        groups = self._pairs(inputs)
        logits = torch.cat([self.logits(g).view(-1) for g in groups])
        return self._loss_from_logits(logits, len(inputs[0]))


@register("cross")
class CachedMultipleNegativesRankingLoss(MultipleNegativesRankingLoss):
    """The same loss with GradCache over chunks of ``mini_batch_size`` pairs."""

    def __init__(
        self,
        model: CrossEncoder,
        num_negatives: int | None = 4,
        scale: float = 10.0,
        activation_fn: nn.Module | None = nn.Sigmoid(),
        mini_batch_size: int = 32,
    ) -> None:
        super().__init__(model, num_negatives, scale, activation_fn)
        self.mini_batch_size = mini_batch_size

    def forward(self, inputs: Sequence[Sequence[str]], labels: Any = None) -> Tensor:
        self.check_columns(len(inputs))
        pairs = [p for g in self._pairs(inputs) for p in g]
        chunks = [pairs[i : i + self.mini_batch_size] for i in range(0, len(pairs), self.mini_batch_size)]
        states, cached = [], []
        with torch.no_grad():
            for chunk in chunks:
                states.append(RandContext())
                cached.append(self.logits(chunk).view(-1))
        if not torch.is_grad_enabled():
            return self._loss_from_logits(torch.cat(cached), len(inputs[0]))
        leaves = [c.detach().requires_grad_() for c in cached]
        loss = self._loss_from_logits(torch.cat(leaves), len(inputs[0]))
        loss.backward()
        grads = [leaf.grad for leaf in leaves]
        loss = loss.detach().requires_grad_()
        loss.register_hook(partial(self._replay, chunks=chunks, states=states, grads=grads))
        return loss

    def _replay(self, grad_output: Tensor, *, chunks, states, grads) -> None:
        with torch.enable_grad():
            for chunk, state, grad in zip(chunks, states, grads):
                with state.replay():
                    logits = self.logits(chunk).view(-1)
                (torch.dot(logits.float(), grad.float()) * grad_output).backward()


__all__ = [
    "BinaryCrossEntropyLoss",
    "CachedMultipleNegativesRankingLoss",
    "CrossEntropyLoss",
    "CrossLoss",
    "LambdaLoss",
    "LambdaRankScheme",
    "ListMLELoss",
    "ListNetLoss",
    "ListwiseLoss",
    "MSELoss",
    "MarginMSELoss",
    "MultipleNegativesRankingLoss",
    "NDCGLoss1Scheme",
    "NDCGLoss2PPScheme",
    "NDCGLoss2Scheme",
    "NoWeightingScheme",
    "PListMLELambdaWeight",
    "PListMLELoss",
    "RankNetLoss",
]
