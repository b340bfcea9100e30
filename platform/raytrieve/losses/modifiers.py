"""Loss modifiers: Matryoshka (train every prefix of the embedding to work on its own).

The inner loss computes the embeddings once; its math then runs on each truncated,
re-normalized prefix and the weighted results are summed. For a GradCache loss the cached
embeddings are truncated instead, and every prefix's gradient accumulates into the cache.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raytrieve.errors import ConfigError
from raytrieve.losses.base import Features, Loss


def shrink(t: Tensor, dim: int) -> Tensor:
    if dim > t.shape[-1]:
        raise ConfigError(f"Matryoshka dimension {dim} is larger than the embedding ({t.shape[-1]})")
    return F.normalize(t[..., :dim], p=2, dim=-1)


class MatryoshkaLoss(nn.Module):
    """Sum over ``matryoshka_dims`` of weight x inner loss on the L2-normalized prefix of that size.

    ``n_dims_per_step`` > 0 samples that many dims per step (Python's ``random``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: Loss,
        matryoshka_dims: Sequence[int],
        matryoshka_weights: Sequence[float] | None = None,
        n_dims_per_step: int = -1,
    ) -> None:
        super().__init__()
        if not matryoshka_dims or any(d <= 0 for d in matryoshka_dims):
            raise ConfigError(f"MatryoshkaLoss: matryoshka_dims must be positive sizes, got {list(matryoshka_dims)}")
        weights = list(matryoshka_weights) if matryoshka_weights is not None else [1.0] * len(matryoshka_dims)
        if len(weights) != len(matryoshka_dims):
            raise ConfigError("MatryoshkaLoss: matryoshka_weights must have one weight per dimension")
        full = model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") else None
        if full is not None and max(matryoshka_dims) > full:
            raise ConfigError(f"MatryoshkaLoss: dimension {max(matryoshka_dims)} exceeds the model's {full}")
        pairs = sorted(zip(matryoshka_dims, weights), key=lambda p: p[0], reverse=True)
        self.matryoshka_dims = tuple(d for d, _ in pairs)
        self.matryoshka_weights = tuple(w for _, w in pairs)
        self.n_dims_per_step = n_dims_per_step
        self.model = model
        self.loss = loss
        if getattr(loss, "uses_gradient_cache", False):
            loss.calculate_loss = _CachedPrefixes(loss.calculate_loss, self)

    def selected(self, sort: bool) -> list[int]:
        idx = list(range(len(self.matryoshka_dims)))
        if 0 < self.n_dims_per_step < len(idx):
            idx = random.sample(idx, self.n_dims_per_step)
            if sort:
                idx.sort()
        return idx

    def forward(self, features: Sequence[Features], labels: Tensor | None = None) -> Tensor:
        if getattr(self.loss, "uses_gradient_cache", False):
            return self.loss(features, labels)
        features = list(features)
        self.loss.check_columns(len(features))
        embeddings, extra = self.loss.prepare(features)
        full = embeddings[0].shape[-1]
        total: Any = 0.0
        for i in self.selected(sort=True):
            dim = self.matryoshka_dims[i]
            dim_labels = labels
            # Distillation targets of the embedding's width are truncated with it (not normalized).
            if isinstance(labels, Tensor) and labels.dim() in (2, 3) and labels.shape[-1] == full:
                dim_labels = labels[..., :dim]
            truncated = [shrink(e, dim) for e in embeddings]
            total = total + self.matryoshka_weights[i] * self.loss.compute_loss_from_embeddings(
                truncated, dim_labels, **extra
            )
        return total


class _CachedPrefixes:
    """Wraps a GradCache loss's calculate_loss: run it on each prefix, sum the cached gradients."""

    def __init__(self, fn, owner: MatryoshkaLoss) -> None:
        self.fn = fn
        self.owner = owner

    def __call__(self, reps: list[list[Tensor]], *args: Any, **kwargs: Any) -> Tensor:
        total: Any = 0.0
        grad = torch.is_grad_enabled()
        for i in self.owner.selected(sort=False):
            dim, weight = self.owner.matryoshka_dims[i], self.owner.matryoshka_weights[i]
            truncated = [[shrink(r, dim) for r in col] for col in reps]
            leaves = [[t.detach().requires_grad_() for t in col] for col in truncated] if grad else truncated
            total = total + weight * self.fn(leaves, *args, **kwargs)
            if grad:
                for t, leaf in zip((t for col in truncated for t in col), (l for col in leaves for l in col)):
                    t.backward(weight * leaf.grad)
        return total
