"""In-batch-negative ranking losses: MultipleNegativesRanking (InfoNCE) and its symmetric
form, GISTEmbed (a guide model masks false negatives), MegaBatchMargin.

Every one accepts ``gather_across_devices``: the candidates of all data-parallel ranks
become negatives of every local anchor (see losses/gather.py for the gradient).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raytrieve.encoders.similarity import cosine
from raytrieve.errors import ConfigError
from raytrieve.losses.base import Loss, LossInputError, register
from raytrieve.losses.gather import all_gather_with_grad, local_offset

if TYPE_CHECKING:
    from raytrieve.encoders.base import EmbeddingEncoder

DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
HARDNESS_MODES = (None, "in_batch_negatives", "hard_negatives", "all_negatives")


def ranking_loss_rows(
    queries: Tensor,
    docs: Sequence[Tensor],
    local_indices: Tensor,
    *,
    scale: float,
    similarity_fct: Callable[[Tensor, Tensor], Tensor],
    directions: Sequence[str],
    partition_mode: str,
    hardness_mode: str | None,
    hardness_strength: float,
) -> Tensor:
    """Mean InfoNCE loss of the anchors at ``local_indices``.

    ``queries`` [W, d] and each of ``docs`` [W, d] hold the whole (possibly gathered)
    batch; docs[0] are the positives, docs[1:] hard negatives. Scores of each direction
    are scaled by ``scale``; the positive is query i against doc i.
    """
    world = queries.shape[0]
    n_docs = len(docs)
    docs_all = torch.cat(list(docs), dim=0)
    rows = torch.arange(len(local_indices), device=queries.device)
    local_q = queries[local_indices]
    local_d = docs[0][local_indices]
    scores: dict[str, Tensor] = {"query_to_doc": similarity_fct(local_q, docs_all)}
    own = None
    if "doc_to_doc" in directions or (hardness_mode is not None and hardness_strength > 0):
        own = torch.zeros(len(local_indices), world, dtype=torch.bool, device=queries.device)
        own[rows, local_indices] = True
        own = own.repeat(1, n_docs)  # a query's own positive and own hard negatives
    if "query_to_query" in directions:
        qq = similarity_fct(local_q, queries)
        qq[rows, local_indices] = float("-inf")
        scores["query_to_query"] = qq
    if "doc_to_query" in directions:
        scores["doc_to_query"] = similarity_fct(queries, local_d).T
    if "doc_to_doc" in directions:
        assert own is not None  # made above for doc_to_doc
        scores["doc_to_doc"] = similarity_fct(docs_all, local_d).T.masked_fill(own, float("-inf"))
    penalty = None
    if hardness_mode is not None and hardness_strength > 0:
        # Up-weight hard candidates: add their (unscaled, detached) similarity to their logit.
        penalty = hardness_strength * scores["query_to_doc"].detach()
        assert own is not None  # made above when hardness is on
        if hardness_mode == "hard_negatives":
            exclude = ~own
            exclude[:, :world] = True
        elif hardness_mode == "in_batch_negatives":
            exclude = own
        else:  # all_negatives: everything but the own positive
            exclude = own.clone()
            exclude[:, world:] = False
        penalty = penalty.masked_fill(exclude, 0.0)
    scores = {k: v * scale for k, v in scores.items()}
    if penalty is not None:
        scores["query_to_doc"] = scores["query_to_doc"] + penalty
    positive = scores["query_to_doc"][rows, local_indices]
    if partition_mode == "joint":
        log_z = torch.logsumexp(torch.cat(list(scores.values()), dim=1), dim=1)
    else:
        log_z = sum(torch.logsumexp(s, dim=1) for s in scores.values()) / len(scores)
    return -(positive - log_z).mean()


@register("dense")
class MultipleNegativesRankingLoss(Loss):
    """InfoNCE over (anchor, positive, *hard negatives): every other candidate in the batch is a negative.

    ``directions`` adds symmetric terms (doc_to_query), query-query and doc-doc
    negatives; ``partition_mode`` "joint" normalizes over all of them at once,
    "per_direction" averages one softmax per direction. ``hardness_mode`` and
    ``hardness_strength`` up-weight hard candidates.
    """

    columns = (2, None)
    in_batch_negatives = True
    column_names = "anchor, positive, then any number of hard negatives"

    def __init__(
        self,
        model: nn.Module,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cosine,
        gather_across_devices: bool = False,
        directions: Sequence[str] = ("query_to_doc",),
        partition_mode: str = "joint",
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
    ) -> None:
        super().__init__(model)
        if scale <= 0:
            raise ConfigError(f"{type(self).__name__}: scale must be positive, got {scale}")
        directions = tuple(directions)
        if not directions or not set(directions) <= set(DIRECTIONS) or "query_to_doc" not in directions:
            raise ConfigError(f"directions {directions} must include 'query_to_doc' and be drawn from {DIRECTIONS}")
        if partition_mode not in ("joint", "per_direction"):
            raise ConfigError(f"partition_mode {partition_mode!r} must be 'joint' or 'per_direction'")
        if partition_mode == "per_direction" and {"query_to_query", "doc_to_doc"} & set(directions):
            raise ConfigError("partition_mode='per_direction' supports only query_to_doc and doc_to_query")
        if hardness_mode not in HARDNESS_MODES:
            raise ConfigError(f"hardness_mode {hardness_mode!r} must be one of {HARDNESS_MODES}")
        if hardness_strength < 0:
            raise ConfigError(f"hardness_strength must be >= 0, got {hardness_strength}")
        self.scale = scale
        self.similarity_fct = similarity_fct
        self.gather_across_devices = gather_across_devices
        self.directions = directions
        self.partition_mode = partition_mode
        self.hardness_mode = hardness_mode
        self.hardness_strength = hardness_strength

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    def _gathered(self, queries: Tensor, docs: list[Tensor]) -> tuple[Tensor, list[Tensor], Tensor]:
        rows = queries.shape[0]
        offset = 0
        if self.gather_across_devices:
            queries = all_gather_with_grad(queries)
            docs = [all_gather_with_grad(d) for d in docs]
            offset = local_offset(rows)
        return queries, docs, torch.arange(offset, offset + rows, device=queries.device)

    def _loss_rows(self, queries: Tensor, docs: list[Tensor], local_indices: Tensor) -> Tensor:
        return ranking_loss_rows(
            queries,
            docs,
            local_indices,
            scale=self.scale,
            similarity_fct=self.similarity_fct,
            directions=self.directions,
            partition_mode=self.partition_mode,
            hardness_mode=self.hardness_mode,
            hardness_strength=self.hardness_strength,
        )

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        if len(embeddings) < 2:
            raise LossInputError(f"{type(self).__name__} expects at least 2 columns (anchor, positive)")
        queries, docs, local = self._gathered(embeddings[0], list(embeddings[1:]))
        return self._loss_rows(queries, docs, local)


@register("dense")
class MultipleNegativesSymmetricRankingLoss(MultipleNegativesRankingLoss):
    """MNRL plus the document-to-query direction, each direction its own softmax."""

    def __init__(
        self,
        model: nn.Module,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cosine,
        gather_across_devices: bool = False,
    ) -> None:
        super().__init__(
            model,
            scale=scale,
            similarity_fct=similarity_fct,
            gather_across_devices=gather_across_devices,
            directions=("query_to_doc", "doc_to_query"),
            partition_mode="per_direction",
        )


def _cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    # nn.CosineSimilarity semantics (eps 1e-8 on each norm), as GISTEmbed defines it.
    return F.cosine_similarity(a.unsqueeze(1), b.unsqueeze(0), dim=-1)


@register("dense")
class GISTEmbedLoss(Loss):
    """MNRL whose in-batch negatives are dropped when a guide model finds them at least as
    similar to the anchor as the positive is (they are probably false negatives)."""

    columns = (2, None)
    in_batch_negatives = True
    column_names = "anchor, positive, then optional negatives"
    model: EmbeddingEncoder  # retokenizing for the guide needs the model's tokenizer
    # In a config, the guide is a dense model by reference (losses/registry.py loads it).
    required_args: ClassVar[Mapping[str, str]] = {"guide": "all-minilm-l6-v2"}

    def __init__(
        self,
        model: EmbeddingEncoder,
        guide: EmbeddingEncoder,
        temperature: float = 0.01,
        margin_strategy: str = "absolute",
        margin: float = 0.0,
        contrast_anchors: bool = True,
        contrast_positives: bool = True,
        gather_across_devices: bool = False,
    ) -> None:
        super().__init__(model)
        if margin_strategy not in ("absolute", "relative"):
            raise ConfigError(f"margin_strategy {margin_strategy!r} must be 'absolute' or 'relative'")
        self.guide = guide
        self.temperature = temperature
        self.margin_strategy = margin_strategy
        self.margin = margin
        self.contrast_anchors = contrast_anchors
        self.contrast_positives = contrast_positives
        self.gather_across_devices = gather_across_devices
        model_tok, guide_tok = getattr(model, "tokenizer", None), getattr(guide, "tokenizer", None)
        self.must_retokenize = (
            model_tok is None
            or guide_tok is None
            or model_tok.get_vocab() != guide_tok.get_vocab()
            or guide.max_seq_length < model.max_seq_length
        )

    def _guide_features(self, features: Sequence[dict]) -> list[dict]:
        if not self.must_retokenize:
            return [dict(f) for f in features]
        out = []
        for f in features:
            texts = self.model.tokenizer.batch_decode(f["input_ids"], skip_special_tokens=True)
            tok = self.guide.tokenize(texts)
            out.append({k: v.to(self.guide.device) if isinstance(v, Tensor) else v for k, v in tok.items()})
        return out

    def prepare(self, features):
        guide_features = self._guide_features(features)
        embeddings = self.embed(features)
        with torch.no_grad():
            guided = [self.guide(f)["sentence_embedding"].detach() for f in guide_features]
        return embeddings, {"guided": guided}

    def compute_loss_from_embeddings(self, embeddings, labels=None, guided: list[Tensor] | None = None) -> Tensor:
        assert guided is not None, "prepare() gives the guide's embeddings"
        return gist_loss_rows(self, embeddings, guided, 0, embeddings[0].shape[0])


def gist_loss_rows(loss: GISTEmbedLoss, emb: list[Tensor], guided: list[Tensor], begin: int, end: int) -> Tensor:
    """GISTEmbed loss of anchors begin:end, weighted by their share of the batch (chunks sum to the mean)."""
    anchor, anchor_g = emb[0], guided[0]
    cands, cands_g = list(emb[1:]), list(guided[1:])
    rows = anchor.shape[0]
    a, ag = anchor[begin:end], anchor_g[begin:end]
    offset = 0
    if loss.gather_across_devices:
        cands = [all_gather_with_grad(c) for c in cands]
        cands_g = [all_gather_with_grad(c) for c in cands_g]
        if loss.contrast_anchors:
            # sentence-transformers contrasts local anchors only; every rank's anchors make
            # N ranks compute exactly the loss of 1 process on the whole batch.
            anchor, anchor_g = all_gather_with_grad(anchor), all_gather_with_grad(anchor_g)
        offset = local_offset(rows)
    n = a.shape[0]
    idx = torch.arange(n, device=a.device)
    ap, gap = _cosine_matrix(a, cands[0]), _cosine_matrix(ag, cands_g[0])
    guided_sim = gap.diagonal(offset=offset + begin).view(-1, 1)

    def mask(g: Tensor, s: Tensor, protect: Tensor | None = None) -> Tensor:
        if loss.margin_strategy == "absolute":
            m = g > (guided_sim - loss.margin)
        else:
            m = g > (guided_sim - guided_sim.abs() * loss.margin)
        if protect is not None:
            m = m & ~protect
        return s.masked_fill(m, float("-inf"))

    protect = torch.zeros_like(gap, dtype=torch.bool)
    protect[idx, offset + begin + idx] = True
    blocks = [mask(gap, ap, protect)]
    if loss.contrast_anchors:
        blocks.append(mask(_cosine_matrix(ag, anchor_g), _cosine_matrix(a, anchor)))
    if loss.contrast_positives:
        own = slice(offset + begin, offset + begin + n)
        blocks.append(mask(_cosine_matrix(cands_g[0][own], cands_g[0]), _cosine_matrix(cands[0][own], cands[0])))
    for c, cg in zip(cands[1:], cands_g[1:]):
        blocks.append(mask(_cosine_matrix(ag, cg), _cosine_matrix(a, c)))
    scores = torch.cat(blocks, dim=1) / loss.temperature
    target = torch.arange(offset + begin, offset + begin + n, device=a.device)
    return F.cross_entropy(scores, target) * n / rows
