"""GradCache: contrastive losses at batch sizes whose activations do not fit in memory.

1. Embed every column in mini-batches without autograd, remembering each mini-batch's
   random state (dropout).
2. Compute the loss on those embeddings (as leaves), backpropagate to them, keep their
   gradients: the cache.
3. When the caller runs ``loss.backward()``, a hook re-embeds each mini-batch with autograd
   under its remembered random state and backpropagates the cached gradient through it.

Peak memory is that of one mini-batch plus the embeddings; gradients equal those of the
plain loss on the whole batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from raytrieve.encoders.similarity import cosine
from raytrieve.errors import ConfigError
from raytrieve.losses.base import Features, Loss, LossInputError, register
from raytrieve.losses.ranking import GISTEmbedLoss, MultipleNegativesRankingLoss, gist_loss_rows

if TYPE_CHECKING:
    from raytrieve.encoders.base import EmbeddingEncoder


class RandContext:
    """Snapshot of the CPU and CUDA random states, to replay a forward pass bit for bit."""

    def __init__(self, *tensors: Any) -> None:
        self.cpu_state = torch.get_rng_state()
        devices = sorted({t.device.index or 0 for t in tensors if isinstance(t, Tensor) and t.is_cuda})
        self.cuda_devices = devices
        self.cuda_states = [torch.cuda.get_rng_state(d) for d in devices]

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self.cuda_devices):
            torch.set_rng_state(self.cpu_state)
            for d, s in zip(self.cuda_devices, self.cuda_states):
                torch.cuda.set_rng_state(s, d)
            yield


def minibatch(features: Features, begin: int, end: int) -> Features:
    """Rows begin:end of a tokenized batch, without the trailing all-padding columns."""
    mask = features.get("attention_mask")
    width = None
    if isinstance(mask, Tensor) and mask.dim() == 2:
        cols = mask[begin:end].any(dim=0).nonzero()
        width = int(cols.max()) + 1 if len(cols) else 1
    out: Features = {}
    for key, value in features.items():
        if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == features["input_ids"].shape[0]:
            value = value[begin:end]
            if width is not None and isinstance(mask, Tensor) and value.dim() >= 2 and value.shape[1] == mask.shape[1]:
                value = value[:, :width]
        out[key] = value
    return out


def _ranges(rows: int, size: int) -> list[tuple[int, int]]:
    return [(b, min(b + size, rows)) for b in range(0, rows, size)]


class CachedLoss(Loss):
    """The GradCache mechanics; subclasses define ``calculate_loss`` over lists of mini-batch embeddings."""

    uses_gradient_cache = True

    def __init__(self, model: nn.Module, mini_batch_size: int = 32) -> None:
        super().__init__(model)
        if mini_batch_size <= 0:
            raise ConfigError(f"{type(self).__name__}: mini_batch_size must be positive, got {mini_batch_size}")
        self.mini_batch_size = mini_batch_size

    def embed_minibatch(self, features: Features, with_grad: bool) -> Tensor:
        with contextlib.nullcontext() if with_grad else torch.no_grad():
            return self.model(features)["sentence_embedding"]

    def extra_minibatch(self, features: Features) -> dict[str, Tensor]:
        """Per mini-batch extras computed without grad in step 1 (e.g. guide embeddings)."""
        return {}

    def calculate_loss(
        self, reps: list[list[Tensor]], labels: Tensor | None, with_backward: bool = False, **extra: Any
    ) -> Tensor:
        raise NotImplementedError

    def forward(self, features: Sequence[Features], labels: Tensor | None = None) -> Tensor:
        features = list(features)
        self.check_columns(len(features))
        grad = torch.is_grad_enabled()
        ranges = [_ranges(f["input_ids"].shape[0], self.mini_batch_size) for f in features]
        reps: list[list[Tensor]] = []
        states: list[list[RandContext]] = []
        extras: dict[str, Any] = {}  # name -> per column, per mini-batch tensors
        for f, col_ranges in zip(features, ranges):
            col, col_states = [], []
            for b, e in col_ranges:
                mb = minibatch(f, b, e)
                col_states.append(RandContext(*mb.values()))
                col.append(self.embed_minibatch(mb, with_grad=False).detach().requires_grad_(grad))
                for k, v in self.extra_minibatch(mb).items():
                    extras.setdefault(k, [[] for _ in features])[len(reps)].append(v)
            reps.append(col)
            states.append(col_states)
        if not grad:
            return self.calculate_loss(reps, labels, **extras)
        loss = self.calculate_loss(reps, labels, with_backward=True, **extras)
        cache = [[r.grad for r in col] for col in reps]
        if any(g is None for col in cache for g in col):
            raise LossInputError(f"{type(self).__name__}: an input column does not take part in the loss")
        loss = loss.detach().requires_grad_()
        loss.register_hook(partial(self._replay, features=features, cache=cache, states=states, ranges=ranges))
        return loss

    def _replay(self, grad_output: Tensor, *, features, cache, states, ranges) -> None:
        with torch.enable_grad():
            for f, grads, col_states, col_ranges in zip(features, cache, states, ranges):
                for grad, state, (b, e) in zip(grads, col_states, col_ranges):
                    with state.replay():
                        rep = self.embed_minibatch(minibatch(f, b, e), with_grad=True)
                    # d(loss)/d(params) = J^T (cached d(loss)/d(rep)), scaled by the incoming gradient.
                    dtype = torch.float32 if rep.dtype in (torch.float16, torch.bfloat16) else rep.dtype
                    (torch.dot(rep.flatten().to(dtype), grad.flatten().to(dtype)) * grad_output).backward()


def _chunked(parts: Iterator[Tensor], with_backward: bool) -> Tensor:
    total = None
    for part in parts:
        if with_backward:
            part.backward()
            part = part.detach()
        total = part if total is None else total + part
    assert total is not None, "a batch has at least one mini-batch"
    return total


@register("dense")
class CachedMultipleNegativesRankingLoss(CachedLoss):
    """MultipleNegativesRankingLoss with GradCache: same value and gradients, memory of one mini-batch."""

    columns = (2, None)
    in_batch_negatives = True
    column_names = "anchor, positive, then any number of hard negatives"

    def __init__(
        self,
        model: nn.Module,
        scale: float = 20.0,
        similarity_fct: Callable = cosine,
        mini_batch_size: int = 32,
        gather_across_devices: bool = False,
        directions: Sequence[str] = ("query_to_doc",),
        partition_mode: str = "joint",
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
    ) -> None:
        super().__init__(model, mini_batch_size)
        # The plain loss validates the options and holds the math.
        self.loss = MultipleNegativesRankingLoss(
            model,
            scale=scale,
            similarity_fct=similarity_fct,
            gather_across_devices=gather_across_devices,
            directions=directions,
            partition_mode=partition_mode,
            hardness_mode=hardness_mode,
            hardness_strength=hardness_strength,
        )

    def calculate_loss(self, reps, labels=None, with_backward: bool = False, **extra) -> Tensor:
        queries, docs, local = self.loss._gathered(torch.cat(reps[0]), [torch.cat(r) for r in reps[1:]])
        rows = len(local)
        return _chunked(
            _lazy(
                lambda b, e: self.loss._loss_rows(queries, docs, local[b:e]) * (e - b) / rows,
                rows,
                self.mini_batch_size,
            ),
            with_backward,
        )


def _lazy(fn: Callable[[int, int], Tensor], rows: int, size: int) -> Iterator[Tensor]:
    # One chunk's graph alive at a time: built, backpropagated, freed.
    for b, e in _ranges(rows, size):
        yield fn(b, e)


@register("dense")
class CachedMultipleNegativesSymmetricRankingLoss(CachedMultipleNegativesRankingLoss):
    def __init__(
        self,
        model: nn.Module,
        scale: float = 20.0,
        similarity_fct: Callable = cosine,
        mini_batch_size: int = 32,
        gather_across_devices: bool = False,
    ) -> None:
        super().__init__(
            model,
            scale=scale,
            similarity_fct=similarity_fct,
            mini_batch_size=mini_batch_size,
            gather_across_devices=gather_across_devices,
            directions=("query_to_doc", "doc_to_query"),
            partition_mode="per_direction",
        )


@register("dense")
class CachedGISTEmbedLoss(CachedLoss):
    """GISTEmbedLoss with GradCache."""

    columns = (2, None)
    in_batch_negatives = True
    column_names = "anchor, positive, then optional negatives"
    required_args = GISTEmbedLoss.required_args

    def __init__(
        self,
        model: EmbeddingEncoder,
        guide: EmbeddingEncoder,
        temperature: float = 0.01,
        mini_batch_size: int = 32,
        margin_strategy: str = "absolute",
        margin: float = 0.0,
        contrast_anchors: bool = True,
        contrast_positives: bool = True,
        gather_across_devices: bool = False,
    ) -> None:
        super().__init__(model, mini_batch_size)
        self.gist = GISTEmbedLoss(
            model,
            guide,
            temperature=temperature,
            margin_strategy=margin_strategy,
            margin=margin,
            contrast_anchors=contrast_anchors,
            contrast_positives=contrast_positives,
            gather_across_devices=gather_across_devices,
        )

    def extra_minibatch(self, features: Features) -> dict[str, Tensor]:
        with torch.no_grad():
            guide_features = self.gist._guide_features([features])[0]
            return {"guided": self.gist.guide(guide_features)["sentence_embedding"].detach()}

    def calculate_loss(
        self, reps, labels=None, with_backward: bool = False, guided: list[list[Tensor]] | None = None, **extra
    ) -> Tensor:
        assert guided is not None, "extra_minibatch gives every mini-batch its guide embeddings"
        emb = [torch.cat(r) for r in reps]
        guide_emb = [torch.cat(g) for g in guided]
        rows = emb[0].shape[0]
        return _chunked(
            _lazy(lambda b, e: gist_loss_rows(self.gist, emb, guide_emb, b, e), rows, self.mini_batch_size),
            with_backward,
        )
