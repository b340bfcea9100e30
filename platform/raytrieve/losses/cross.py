"""Cross-encoder losses. Inputs are text columns (the loss pairs and tokenizes them):
pointwise ``[queries, documents]`` with a label per pair, ``[anchors, positives, *negatives]``
for ranking, and listwise ``[queries, list of documents per query]`` with a list of label
tensors (one per query, any length).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raytrieve.errors import ConfigError
from raytrieve.losses.base import LossContract, LossInputError, register
from raytrieve.losses.cached import RandContext
from raytrieve.losses.pairwise import margin_targets

if TYPE_CHECKING:
    from raytrieve.encoders.cross import CrossEncoder


class CrossLoss(LossContract, nn.Module):
    columns = (2, 2)
    column_names = "queries, documents"

    def __init__(self, model: CrossEncoder, activation_fn: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.activation_fn = activation_fn if activation_fn is not None else nn.Identity()

    def logits(self, pairs: Sequence[tuple[str, str]]) -> Tensor:
        """Raw scores [len(pairs), num_labels] (no activation)."""
        features = self.model.tokenize(list(pairs))
        features = {k: v.to(self.model.device) if isinstance(v, Tensor) else v for k, v in features.items()}
        return self.model(features)["scores"]

    def require_single_label(self) -> None:
        if self.model.num_labels != 1:
            raise ConfigError(
                f"{type(self).__name__} needs a model with num_labels=1, this one has {self.model.num_labels}"
            )


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


# -- listwise ------------------------------------------------------------------------------


class ListwiseLoss(CrossLoss):
    """Shared prelude: score every (query, document) pair, lay the scores out as [queries, max docs]."""

    column_names = "queries, a list of documents per query (+ a list of label tensors)"
    needs_labels = True
    listwise = True
    logit_pad = -1e16

    def __init__(
        self, model: CrossEncoder, activation_fn: nn.Module | None = None, mini_batch_size: int | None = None
    ) -> None:
        super().__init__(model, activation_fn)
        self.require_single_label()
        self.mini_batch_size = mini_batch_size

    def matrices(self, inputs: Sequence[Any], labels: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        self.check_columns(len(inputs))
        queries, docs_list = inputs
        if isinstance(labels, Tensor):
            raise LossInputError(f"{type(self).__name__}: labels must be a list of tensors, one per query")
        if len(labels) != len(queries) or any(len(lab) != len(d) for lab, d in zip(labels, docs_list)):
            raise LossInputError(f"{type(self).__name__}: each query needs one label per document")
        pairs = [(q, d) for q, docs in zip(queries, docs_list) for d in docs]
        size = self.mini_batch_size or len(queries)
        if size <= 0:
            size = len(pairs)
        logits = torch.cat([self.logits(pairs[i : i + size]).view(-1) for i in range(0, len(pairs), size)]).float()
        logits = self.activation_fn(logits)
        rows, width = len(queries), max(len(d) for d in docs_list)
        device = logits.device
        mask = torch.zeros(rows, width, dtype=torch.bool, device=device)
        for i, d in enumerate(docs_list):
            mask[i, : len(d)] = True
        logit_matrix = torch.full((rows, width), self.logit_pad, device=device, dtype=logits.dtype)
        logit_matrix = logit_matrix.masked_scatter(mask, logits)
        label_matrix = torch.full((rows, width), float("-inf"), device=device)
        label_matrix = label_matrix.masked_scatter(mask, torch.cat([lab.float() for lab in labels]).to(device))
        return logit_matrix, label_matrix, mask


@register("cross")
class ListNetLoss(ListwiseLoss):
    """Cross-entropy between softmax(labels) and softmax(scores) per query."""

    def forward(self, inputs, labels) -> Tensor:
        logits, targets, _ = self.matrices(inputs, labels)
        return F.cross_entropy(logits, targets.softmax(dim=1))


class PListMLELambdaWeight:
    """Position weights 2^(n - r) - 1 for rank r of n documents: early positions count most."""

    def __init__(self, rank_discount_fn=None) -> None:
        self.rank_discount_fn = rank_discount_fn

    def __call__(self, mask: Tensor) -> Tensor:
        if self.rank_discount_fn is not None:
            return self.rank_discount_fn(mask)
        n = mask.sum(dim=1, keepdim=True).float()
        ranks = torch.arange(1, mask.shape[1] + 1, device=mask.device).float().unsqueeze(0)
        shift = (n - 127).clamp(min=0)  # keep 2^x finite for very long lists
        return (torch.pow(2.0, n - ranks - shift) - torch.pow(2.0, -shift)) * mask


@register("cross")
class PListMLELoss(ListwiseLoss):
    """Plackett-Luce likelihood of the given order (input order, or sorted by label), position-weighted."""

    logit_pad = 1e-16

    def __init__(
        self,
        model: CrossEncoder,
        lambda_weight: PListMLELambdaWeight | None = PListMLELambdaWeight(),
        activation_fn: nn.Module | None = None,
        mini_batch_size: int | None = None,
        respect_input_order: bool = True,
    ) -> None:
        super().__init__(model, activation_fn, mini_batch_size)
        self.lambda_weight = lambda_weight
        self.respect_input_order = respect_input_order

    def forward(self, inputs, labels) -> Tensor:
        logits, targets, mask = self.matrices(inputs, labels)
        if not mask.any():
            return torch.tensor(0.0, requires_grad=True, device=logits.device)
        if self.respect_input_order:
            scores, smask = logits, mask
        else:
            _, order = targets.sort(descending=True, dim=1)
            scores, smask = logits.gather(1, order), mask.gather(1, order)
        masked = scores.masked_fill(~smask, torch.finfo(torch.float32).min)
        log_norm = torch.logcumsumexp(masked.flip(1), dim=1).flip(1)
        log_probs = scores - log_norm
        if self.lambda_weight is not None:
            w = self.lambda_weight(mask)
            log_probs = log_probs * (w / (w.sum(dim=1, keepdim=True) + 1e-10))
        log_probs = log_probs.masked_fill(~smask, 0.0)
        per_query = -log_probs.sum(dim=1)
        if not per_query.any():
            return torch.tensor(0.0, requires_grad=True, device=logits.device)
        return per_query.mean()


@register("cross")
class ListMLELoss(PListMLELoss):
    def __init__(
        self,
        model: CrossEncoder,
        activation_fn: nn.Module | None = None,
        mini_batch_size: int | None = None,
        respect_input_order: bool = True,
    ) -> None:
        super().__init__(model, None, activation_fn, mini_batch_size, respect_input_order)


# LambdaLoss weighting schemes: W[b, i, j] for predicted positions i, j, from gains G [b, n]
# (in predicted order, divided by the ideal DCG) and discounts D [1, n] = log2(1 + rank).
class NoWeightingScheme:
    def __call__(self, gain: Tensor, discount: Tensor, true_sorted: Tensor) -> Tensor:
        return torch.tensor(1.0, device=gain.device)


class NDCGLoss1Scheme:
    def __call__(self, gain, discount, true_sorted):
        return (gain / discount)[:, :, None]


class NDCGLoss2Scheme:
    def __call__(self, gain, discount, true_sorted):
        n = gain.shape[1]
        pos = torch.arange(n, device=gain.device)
        delta = (pos[:, None] - pos[None, :]).abs()
        d = discount[0]
        w = (1.0 / d[delta - 1].abs() - 1.0 / d[delta].abs()).abs()
        w = w.masked_fill(delta == 0, 0.0)
        return w[None, :, :] * (gain[:, :, None] - gain[:, None, :]).abs()


class LambdaRankScheme:
    def __call__(self, gain, discount, true_sorted):
        inv = 1.0 / discount.expand_as(gain)
        return (inv[:, :, None] - inv[:, None, :]).abs() * (gain[:, :, None] - gain[:, None, :]).abs()


class NDCGLoss2PPScheme:
    def __init__(self, mu: float = 10.0) -> None:
        self.mu = mu

    def __call__(self, gain, discount, true_sorted):
        return self.mu * NDCGLoss2Scheme()(gain, discount, true_sorted) + LambdaRankScheme()(
            gain, discount, true_sorted
        )


@register("cross")
class LambdaLoss(ListwiseLoss):
    """Pairwise logistic loss on score differences, weighted toward pairs whose swap would
    change NDCG most (the weighting scheme), over pairs with either position in the top k."""

    def __init__(
        self,
        model: CrossEncoder,
        weighting_scheme: Any = NDCGLoss2PPScheme(),
        k: int | None = None,
        sigma: float = 1.0,
        eps: float = 1e-10,
        reduction_log: str = "binary",
        activation_fn: nn.Module | None = None,
        mini_batch_size: int | None = None,
    ) -> None:
        super().__init__(model, activation_fn, mini_batch_size)
        if reduction_log not in ("natural", "binary"):
            raise ConfigError(f"reduction_log {reduction_log!r} must be 'natural' or 'binary'")
        self.weighting_scheme = weighting_scheme if weighting_scheme is not None else NoWeightingScheme()
        self.k, self.sigma, self.eps, self.reduction_log = k, sigma, eps, reduction_log

    def forward(self, inputs, labels) -> Tensor:
        logits, targets, _ = self.matrices(inputs, labels)
        n = logits.shape[1]
        pred_sorted, idx = logits.sort(descending=True, dim=-1)
        true_sorted, _ = targets.sort(descending=True, dim=-1)
        true_in_pred = targets.gather(1, idx)
        diffs = true_in_pred[:, :, None] - true_in_pred[:, None, :]
        pair_mask = torch.isfinite(diffs)
        if not isinstance(self.weighting_scheme, NDCGLoss1Scheme):
            pair_mask = pair_mask & (diffs > 0)
        k = self.k or n
        topk = torch.zeros(n, n, dtype=torch.bool, device=logits.device)
        topk[:k, :] = True
        topk[:, :k] = True
        true_in_pred = true_in_pred.clamp(min=0)
        true_sorted = true_sorted.clamp(min=0)
        discount = torch.log2(1.0 + torch.arange(1, n + 1, device=logits.device, dtype=torch.float))[None, :]
        max_dcg = ((2**true_sorted - 1) / discount)[:, :k].sum(dim=-1).clamp(min=self.eps)
        gain = (2**true_in_pred - 1) / max_dcg[:, None]
        weights = self.weighting_scheme(gain, discount, true_in_pred)
        score_diffs = (pred_sorted[:, :, None] - pred_sorted[:, None, :]).clamp(-1e8, 1e8)
        score_diffs = score_diffs.masked_fill(torch.isnan(score_diffs), 0.0)
        losses = weights * F.logsigmoid(self.sigma * score_diffs)
        if self.reduction_log == "binary":
            losses = losses / math.log(2)
        selected = losses[pair_mask & topk]
        return -selected.sum() / max(selected.numel(), 1)


@register("cross")
class RankNetLoss(LambdaLoss):
    """LambdaLoss without weights: plain pairwise logistic (RankNet)."""

    def __init__(
        self,
        model: CrossEncoder,
        k: int | None = None,
        sigma: float = 1.0,
        eps: float = 1e-10,
        reduction_log: str = "binary",
        activation_fn: nn.Module | None = None,
        mini_batch_size: int | None = None,
    ) -> None:
        super().__init__(model, NoWeightingScheme(), k, sigma, eps, reduction_log, activation_fn, mini_batch_size)
