"""Loss modifiers: Matryoshka (train every prefix of the embedding to work on its own),
AdaptiveLayer (and every layer), Matryoshka2d (both).

The inner loss computes the embeddings once; its math then runs on each truncated,
re-normalized prefix and the weighted results are summed. For a GradCache loss the cached
embeddings are truncated instead, and every prefix's gradient accumulates into the cache.
Any other loss (one with its own ``forward``, a user's loss) runs once per prefix while the
model's forward is replaced by one that replays the first pass's outputs, truncated.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raytrieve.errors import ConfigError
from raytrieve.losses.base import Features, Loss, LossContract, LossInputError, column_merging_disabled, register
from raytrieve.modules import Transformer


def shrink(t: Tensor, dim: int) -> Tensor:
    if dim > t.shape[-1]:
        raise ConfigError(f"Matryoshka dimension {dim} is larger than the embedding ({t.shape[-1]})")
    return F.normalize(t[..., :dim], p=2, dim=-1)


@register("dense")
class MatryoshkaLoss(LossContract, nn.Module):
    """Sum over ``matryoshka_dims`` of weight x inner loss on the L2-normalized prefix of that size.

    ``n_dims_per_step`` > 0 samples that many dims per step (Python's ``random``).
    """

    required_args: ClassVar[Mapping[str, str]] = {"matryoshka_dims": "[768, 512, 256, 128, 64]"}

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        matryoshka_dims: Sequence[int],
        matryoshka_weights: Sequence[float] | None = None,
        n_dims_per_step: int = -1,
    ) -> None:
        super().__init__()
        if not matryoshka_dims or any(d <= 0 for d in matryoshka_dims):
            raise ConfigError(f"MatryoshkaLoss: matryoshka_dims must be positive sizes, got {list(matryoshka_dims)}")
        weights = list(matryoshka_weights) if matryoshka_weights is not None else [1.0] * len(matryoshka_dims)
        if len(weights) != len(matryoshka_dims):
            raise ConfigError(
                f"MatryoshkaLoss: matryoshka_weights has {len(weights)} weights for {len(matryoshka_dims)} "
                "matryoshka_dims; give one weight per dimension"
            )
        getter = getattr(model, "get_embedding_dimension", None)
        full = getter() if callable(getter) else None
        if isinstance(full, int) and max(matryoshka_dims) > full:
            raise ConfigError(
                f"MatryoshkaLoss: matryoshka_dims {list(matryoshka_dims)} go beyond the model's {full}-d embedding; "
                f"use sizes up to {full}"
            )
        pairs = sorted(zip(matryoshka_dims, weights), key=lambda p: p[0], reverse=True)
        self.matryoshka_dims = tuple(d for d, _ in pairs)
        self.matryoshka_weights = tuple(w for _, w in pairs)
        self.n_dims_per_step = n_dims_per_step
        self.model = model
        self.loss = loss
        if getattr(loss, "uses_gradient_cache", False):
            # A plain attribute on the loss instance, shadowing its method (not a submodule).
            vars(loss)["calculate_loss"] = _CachedPrefixes(loss.calculate_loss, self)

    def selected(self, sort: bool) -> list[int]:
        idx = list(range(len(self.matryoshka_dims)))
        if 0 < self.n_dims_per_step < len(idx):
            idx = random.sample(idx, self.n_dims_per_step)
            if sort:
                idx.sort()
        return idx

    def forward(self, features: Sequence[Features], labels: Tensor | None = None) -> Tensor:
        loss = self.loss
        if getattr(loss, "uses_gradient_cache", False):
            return loss(features, labels)
        # A loss with the plain embed-then-math forward: its math runs on truncated embeddings.
        if not isinstance(loss, Loss) or type(loss).forward is not Loss.forward:
            return self._forward_any_loss(features, labels)
        features = list(features)
        loss.check_columns(len(features))
        embeddings, extra = loss.prepare(features)
        full = embeddings[0].shape[-1]
        total: Any = 0.0
        for i in self.selected(sort=True):
            dim = self.matryoshka_dims[i]
            truncated = [shrink(e, dim) for e in embeddings]
            total = total + self.matryoshka_weights[i] * loss.compute_loss_from_embeddings(
                truncated, _truncated_labels(labels, dim, full), **extra
            )
        return total

    def _forward_any_loss(self, features: Sequence[Features], labels: Tensor | None) -> Tensor:
        features = list(features)
        getter = getattr(self.model, "get_embedding_dimension", None)
        width = getter() if callable(getter) else None
        full = width if isinstance(width, int) else None
        total: Any = 0.0
        with replaced_forward(self.model, _ReplayTruncated) as replay:
            for n, i in enumerate(self.selected(sort=True)):
                dim = self.matryoshka_dims[i]
                replay.start(dim, record=n == 0)
                total = total + self.matryoshka_weights[i] * self.loss(features, _truncated_labels(labels, dim, full))
        return total


def _truncated_labels(labels: Any, dim: int, full: int | None) -> Any:
    # Distillation targets of the embedding's width are truncated with it (not normalized).
    if isinstance(labels, Tensor) and labels.dim() in (2, 3) and full is not None and labels.shape[-1] == full:
        return labels[..., :dim]
    return labels


@contextlib.contextmanager
def replaced_forward(model: nn.Module, wrapper: Callable[[Callable], Any]) -> Iterator[Any]:
    """``model.forward`` is ``wrapper(current forward)`` for the block. Wrappers nest (the
    current forward may itself be a wrapper), and the previous one comes back after."""
    previous = vars(model).get("forward")
    wrapped = wrapper(model.forward)
    model.forward = wrapped
    try:
        yield wrapped
    finally:
        if previous is not None:
            model.forward = previous
        else:
            del model.forward


class _ReplayTruncated:
    """A model forward for a loss that embeds by itself: the first prefix's pass runs the model
    and keeps each output; later prefixes get those outputs again, in call order, so the
    encoder runs once per batch however many prefixes are trained."""

    def __init__(self, forward: Callable) -> None:
        self.forward = forward
        self.outputs: list[Features] = []
        self.dim = 0
        self.record = True
        self.calls = 0

    def start(self, dim: int, record: bool) -> None:
        self.dim, self.record, self.calls = dim, record, 0

    def __call__(self, features: Features, *args: Any, **kwargs: Any) -> Features:
        if self.record:
            self.outputs.append(self.forward(features, *args, **kwargs))
        elif self.calls >= len(self.outputs):
            raise LossInputError(
                "MatryoshkaLoss: the inner loss called the model more often for a smaller dimension than for the "
                "first; wrap only a loss that embeds the same inputs for every dimension"
            )
        output = dict(self.outputs[self.calls])
        self.calls += 1
        output["sentence_embedding"] = shrink(output["sentence_embedding"], self.dim)
        return output


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
                    if leaf.grad is not None:  # None: a column the loss did not use
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


@register("dense")
class AdaptiveLayerLoss(LossContract, nn.Module):
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
        _first_transformer(model)
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
        transformer = _first_transformer(self.model)
        features = list(features)
        # A forward wrapper, not a forward hook, records the final embeddings: a MatryoshkaLoss
        # inside (Matryoshka2d) replays truncated outputs without running the model again,
        # and only the model's real runs (full width) belong in the KL term.
        try:
            with replaced_forward(self.model, _RecordEmbeddings) as recorder, column_merging_disabled():
                transformer.keep_hidden_states = True
                try:
                    loss = self.loss(features, labels) * self.last_layer_weight
                finally:
                    transformer.keep_hidden_states = False
                final = None
                if self.kl_temperature > 0:
                    final = F.softmax(recorder.take() / self.kl_temperature, dim=-1).detach()
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
                    weight = _layer_weight(self.layer_weighting, i) / len(idx) * self.prior_layers_weight
                    loss = loss + layer_loss * weight
                    if final is not None:
                        log_p = F.log_softmax(recorder.take() / self.kl_temperature, dim=-1)
                        kl = F.kl_div(log_p, final, reduction="batchmean")
                        loss = loss + kl * self.kl_temperature * self.kl_div_weight
        finally:
            for f in features:
                f.pop("all_layer_embeddings", None)
        return loss


def _first_transformer(model: nn.Module) -> Transformer:
    stack = getattr(model, "stack", None)
    first = stack[0] if isinstance(stack, nn.Sequential) and len(stack) else None
    if not isinstance(first, Transformer):
        raise ConfigError("AdaptiveLayerLoss needs a model whose first module is a Transformer (a dense encoder)")
    return first


class _RecordEmbeddings:
    def __init__(self, forward: Callable) -> None:
        self.forward = forward
        self.embeddings: list[Tensor] = []

    def __call__(self, features: Features, *args: Any, **kwargs: Any) -> Features:
        output = self.forward(features, *args, **kwargs)
        self.embeddings.append(output["sentence_embedding"])
        return output

    def take(self) -> Tensor:
        out = torch.cat(self.embeddings, dim=0)
        self.embeddings = []
        return out


@register("dense")
class Matryoshka2dLoss(AdaptiveLayerLoss):
    """Matryoshka over embedding sizes inside AdaptiveLayer over layers."""

    required_args = MatryoshkaLoss.required_args

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
