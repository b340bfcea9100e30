"""The listwise cross-encoder losses: each query comes with a list of documents (any length)
and a label tensor per query; the loss scores every (query, document) pair and compares the
query's scores with its labels as a whole. ListNet, (P)ListMLE, LambdaLoss with its weighting
schemes, RankNet. Importable from raytrieve.losses.cross with the other cross-encoder losses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raytrieve.errors import ConfigError
from raytrieve.losses.base import CrossLoss, LossInputError, register

if TYPE_CHECKING:
    from raytrieve.encoders.cross import CrossEncoder


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
