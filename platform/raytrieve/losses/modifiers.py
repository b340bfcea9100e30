"""Loss modifiers: Matryoshka (train every prefix of the embedding to work on its own),
AdaptiveLayer (and every layer), Matryoshka2d (both).

The inner loss computes the embeddings once; its math then runs on each truncated,
re-normalized prefix and the weighted results are summed. For a GradCache loss the cached
embeddings are truncated instead, and every prefix's gradient accumulates into the cache.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

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
                for t, leaf in zip((t for col in truncated for t in col), (x for col in leaves for x in col)):
                    t.backward(weight * leaf.grad)
        return total


def _layer_weight(scheme: str | Callable[[int], float], i: int) -> float:
    if callable(scheme):
        return float(scheme(i))
    if scheme == "log":
        return 1.0 / (1.0 + math.log(1 + i))
    if scheme == "linear":
        return 1.0 / (1.0 + i)
    return 1.0


class AdaptiveLayerLoss(nn.Module):
    """Train earlier transformer layers to produce useful embeddings too (2D-Matryoshka's
    layer half): the inner loss on the final layer, plus on ``n_layers_per_step`` sampled
    earlier layers (reusing the final pass's hidden states), plus a KL term pulling each
    earlier layer's similarity structure toward the final layer's."""

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        n_layers_per_step: int = 1,
        last_layer_weight: float = 1.0,
        prior_layers_weight: float = 1.0,
        kl_div_weight: float = 1.0,
        kl_temperature: float = 0.3,
        layer_weighting: str | Callable[[int], float] = "uniform",
    ) -> None:
        super().__init__()
        from raytrieve.modules import Transformer

        if not isinstance(model.stack[0], Transformer):
            raise ConfigError("AdaptiveLayerLoss needs a model whose first module is a Transformer")
        if getattr(loss, "uses_gradient_cache", False):
            raise ConfigError("AdaptiveLayerLoss cannot wrap a GradCache (Cached*) loss")
        if not (callable(layer_weighting) or layer_weighting in ("uniform", "log", "linear")):
            raise ConfigError(f"layer_weighting {layer_weighting!r} must be uniform, log, linear or a function")
        self.model, self.loss = model, loss
        self.n_layers_per_step = n_layers_per_step
        self.last_layer_weight, self.prior_layers_weight = last_layer_weight, prior_layers_weight
        self.kl_div_weight, self.kl_temperature = kl_div_weight, kl_temperature
        self.layer_weighting = layer_weighting

    def forward(self, features: Sequence[Features], labels: Tensor | None = None) -> Tensor:
        from raytrieve.losses.base import column_merging_disabled

        transformer = self.model.stack[0]
        recorded: list[Tensor] = []
        hook = self.model.register_forward_hook(lambda m, args, out: recorded.append(out["sentence_embedding"]))

        def embeddings() -> Tensor:
            out = torch.cat(recorded, dim=0)
            recorded.clear()
            return out

        features = list(features)
        try:
            with column_merging_disabled():
                transformer.keep_hidden_states = True
                try:
                    loss = self.loss(features, labels) * self.last_layer_weight
                finally:
                    transformer.keep_hidden_states = False
                if self.kl_temperature > 0:
                    final = F.softmax(embeddings() / self.kl_temperature, dim=-1).detach()
                n_layers = len(features[0]["all_layer_embeddings"])
                idx = list(range(n_layers - 1))
                if 0 < self.n_layers_per_step < n_layers - 1:
                    idx = random.sample(idx, self.n_layers_per_step)
                for i in idx:
                    transformer.cached_layer = i
                    try:
                        layer_loss = self.loss(features, labels)
                    finally:
                        transformer.cached_layer = None
                    loss = (
                        loss + layer_loss * _layer_weight(self.layer_weighting, i) / len(idx) * self.prior_layers_weight
                    )
                    if self.kl_temperature > 0:
                        kl = F.kl_div(
                            F.log_softmax(embeddings() / self.kl_temperature, dim=-1), final, reduction="batchmean"
                        )
                        loss = loss + kl * self.kl_temperature * self.kl_div_weight
        finally:
            hook.remove()
            for f in features:
                f.pop("all_layer_embeddings", None)
        return loss


class Matryoshka2dLoss(AdaptiveLayerLoss):
    """Matryoshka over embedding sizes inside AdaptiveLayer over layers."""

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        matryoshka_dims: Sequence[int],
        matryoshka_weights: Sequence[float] | None = None,
        n_layers_per_step: int = 1,
        n_dims_per_step: int = 1,
        last_layer_weight: float = 1.0,
        prior_layers_weight: float = 1.0,
        kl_div_weight: float = 1.0,
        kl_temperature: float = 0.3,
        layer_weighting: str | Callable[[int], float] = "uniform",
    ) -> None:
        super().__init__(
            model,
            MatryoshkaLoss(model, loss, matryoshka_dims, matryoshka_weights, n_dims_per_step=n_dims_per_step),
            n_layers_per_step=n_layers_per_step,
            last_layer_weight=last_layer_weight,
            prior_layers_weight=prior_layers_weight,
            kl_div_weight=kl_div_weight,
            kl_temperature=kl_temperature,
            layer_weighting=layer_weighting,
        )
