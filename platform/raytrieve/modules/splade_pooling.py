"""SPLADE pooling: log(1 + relu(MLM logits)), max- or sum-pooled over the tokens.

The result is one weight per vocabulary entry, mostly zero: the sparse embedding. After an
MLMTransformer that defers its decoder (modules/mlm_head.py), the logits are computed here, for
real tokens only; otherwise they arrive whole as ``token_embeddings``.
"""

from __future__ import annotations

import itertools
from typing import Any, cast

import torch
from torch import Tensor, nn

from raytrieve.errors import ConfigError
from raytrieve.modules.base import Features, Module
from raytrieve.modules.transformer import MLMTransformer

HALF = (torch.float16, torch.bfloat16)


class SpladePooling(Module):
    st_type = "sentence_transformers.sparse_encoder.models.SpladePooling"
    st_aliases = ("sentence_transformers.sparse_encoder.modules.splade_pooling.SpladePooling",)

    def __init__(
        self,
        pooling_strategy: str = "max",
        activation_function: str = "relu",
        embedding_dimension: int | None = None,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if pooling_strategy not in ("max", "sum"):
            raise ConfigError(f"SpladePooling: pooling_strategy {pooling_strategy!r} must be 'max' or 'sum'")
        if activation_function not in ("relu", "log1p_relu"):
            raise ConfigError(
                f"SpladePooling: activation_function {activation_function!r} must be 'relu' or 'log1p_relu'"
            )
        self.pooling_strategy = pooling_strategy
        self.activation_function = activation_function
        self.embedding_dimension = embedding_dimension
        # Pool the sequence in chunks of this many tokens: the [batch, seq, vocab] activation
        # is the memory peak of SPLADE, chunking bounds it without changing the result. Only
        # for logits handed in whole; projected tokens (_pool_projected) hold one text at a time.
        self.chunk_size = chunk_size

    def forward(self, features: Features, **kwargs: Any) -> Features:
        mask = features["attention_mask"]
        if "mlm_decoder" not in features:
            pooled = self._pool_logits(features["token_embeddings"], mask)
        elif _binary(mask):  # MLMTransformer.defer_decoder: project real tokens only
            pooled = self._pool_projected(features["mlm_hidden_states"], features["mlm_decoder"], mask)
        else:  # a weighting mask scales the logits themselves: project every position
            pooled = self._pool_logits(features["mlm_decoder"](features["mlm_hidden_states"]), mask)
        if self.embedding_dimension is None:
            self.embedding_dimension = int(pooled.shape[1])
        features["sentence_embedding"] = pooled
        return features

    def _activate(self, x: Tensor) -> Tensor:
        x = torch.log1p(torch.relu(x))
        return torch.log1p(x) if self.activation_function == "log1p_relu" else x

    def _pool_logits(self, logits: Tensor, attention_mask: Tensor) -> Tensor:
        # Half-precision logits (autocast) pool in float32: log1p, max and sum lose less there.
        acc = torch.float32 if logits.dtype in HALF else logits.dtype
        mask = attention_mask.unsqueeze(-1).to(acc)
        seq_len = logits.shape[1]
        step = self.chunk_size if self.chunk_size and self.chunk_size > 0 else max(seq_len, 1)
        pooled = None
        for start in range(0, seq_len, step):
            x = self._activate(logits[:, start : start + step].to(acc) * mask[:, start : start + step])
            part = x.max(dim=1).values if self.pooling_strategy == "max" else x.sum(dim=1)
            if pooled is None:
                pooled = part
            else:
                pooled = torch.maximum(pooled, part) if self.pooling_strategy == "max" else pooled + part
        if pooled is None:  # zero-length sequences
            pooled = logits.new_zeros(logits.shape[0], logits.shape[-1], dtype=acc)
        return pooled

    def _pool_projected(self, hidden: Tensor, decoder: nn.Module, attention_mask: Tensor) -> Tensor:
        """The same pooling from the decoder's input: each text's real tokens are projected onto
        the vocabulary alone, as a [vocab, tokens] block (reduced along its contiguous axis).

        Max pooling takes the maximum logit before the activation: log1p(relu(.)) is monotone, so
        the value is the same and the activation runs on one row per text instead of a block.
        Padding never gets projected; the mask's zeros floor every weight at 0, as here."""
        linear = type(decoder) is nn.Linear
        acc = torch.float32 if hidden.dtype in HALF else hidden.dtype
        keep = attention_mask.bool()
        # (An int8 decoder has no ``weight``: ``linear`` is checked first.)
        training = linear and torch.is_grad_enabled() and (hidden.requires_grad or decoder.weight.requires_grad)
        if training and self.pooling_strategy == "max":
            return self._pool_projected_max_for_training(hidden, cast(nn.Linear, decoder), keep, acc)
        # An int8-quantised decoder (not a plain Linear) only computes [n, vocab] with its bias.
        bias = decoder.bias.to(acc).unsqueeze(1) if linear else 0.0
        rows = []
        for i in range(hidden.shape[0]):
            tokens = hidden[i][keep[i]]  # [n, hidden]
            if tokens.shape[0] == 0:  # no real token: every weight 0, as the mask makes it
                rows.append(hidden.new_zeros(self._vocab(decoder), dtype=acc))
                continue
            block = decoder.weight @ tokens.T if linear else decoder(tokens).T  # [vocab, n]
            if self.pooling_strategy == "max":
                # Under autograd max(dim) routes each gradient to one token, as sentence-transformers'
                # pooling does; without it amax gives the same values 1.5-3x faster (no indices).
                top = block.max(dim=1, keepdim=True).values if block.requires_grad else block.amax(1, keepdim=True)
                top = top.to(acc) + bias
                rows.append(self._activate(top).squeeze(1))
            else:
                rows.append(self._activate(block.to(acc) + bias).sum(dim=1))
        if not rows:
            return hidden.new_zeros(0, self._vocab(decoder), dtype=acc)
        return torch.stack(rows)

    def _pool_projected_max_for_training(self, hidden: Tensor, decoder: nn.Linear, keep: Tensor, acc: torch.dtype):
        """Max pooling of the projected tokens under autograd (_MaxOverTokens), the bias and the
        activation after the maximum as above; a text without real tokens is all zero."""
        lengths = keep.sum(dim=1)
        tokens = hidden[keep]  # [every real token, hidden], text by text
        offsets = [0, *torch.cumsum(lengths, 0).tolist()]
        top = _MaxOverTokens.apply(tokens, decoder.weight, offsets)  # [texts, vocab]
        pooled = self._activate(top.to(acc) + decoder.bias.to(acc))
        empty = lengths == 0
        return pooled.masked_fill(empty.unsqueeze(1), 0.0) if bool(empty.any()) else pooled

    @staticmethod
    def _vocab(decoder: nn.Module) -> int:
        out_features: Any = decoder.out_features  # a Linear's, or its int8 replacement's
        return int(out_features)

    def get_embedding_dimension(self) -> int | None:
        return self.embedding_dimension

    def config_dict(self) -> dict[str, Any]:
        return {
            "pooling_strategy": self.pooling_strategy,
            "activation_function": self.activation_function,
            "word_embedding_dimension": self.embedding_dimension,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], trust_remote_code: bool = False) -> SpladePooling:
        config = dict(config)
        dim = config.pop("embedding_dimension", config.pop("word_embedding_dimension", None))
        return cls(
            pooling_strategy=config.get("pooling_strategy", "max"),
            activation_function=config.get("activation_function", "relu"),
            embedding_dimension=dim,
            chunk_size=config.get("chunk_size"),
        )


class _MaxOverTokens(torch.autograd.Function):
    """For each text, the maximum over its tokens of ``weight @ token``: [texts, vocab].

    Autograd through ``(weight @ tokens.T).max(dim=1)`` keeps each text's [vocab, tokens] block
    for backward and spends it on two dense matmuls, a scatter into a zero block and a weight
    gradient added per text: most of a SPLADE training step on a CPU (splade-tiny, batch 32 x 128
    tokens, bf16 autocast, 2 cores: 1.12 s a step that way, 0.60 s this way). Only the winning
    token of a (text, vocabulary) entry gets its gradient, and most entries get none (relu passes
    none below 0). So forward keeps only the maxima (``amax``, 3x faster than ``max`` with its
    indices), and backward finds the winners of the entries with a gradient alone, recomputing
    their rows of the block in the forward's dtype, and multiplies only those rows: the same
    gradient, except where two tokens tie (often in bf16) or tie within the rounding of the
    recomputed rows, where it may go to the other one."""

    @staticmethod
    def forward(ctx: Any, tokens: Tensor, weight: Tensor, offsets: list[int]) -> Tensor:
        tops = [
            (weight @ tokens[start:end].T).amax(dim=1)  # autocast applies to the matmul
            if end > start
            else None  # no real token: the caller zeroes the row
            for start, end in itertools.pairwise(offsets)
        ]
        dtype = next((t.dtype for t in tops if t is not None), weight.dtype)
        ctx.offsets, ctx.dtype = offsets, dtype
        ctx.save_for_backward(tokens, weight)
        zero = weight.new_zeros(weight.shape[0], dtype=dtype)
        return torch.stack([zero if t is None else t for t in tops]) if tops else zero.new_zeros(0, zero.shape[0])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        tokens, weight = ctx.saved_tensors
        acc = torch.float32 if tokens.dtype in HALF else tokens.dtype
        lengths = torch.tensor(ctx.offsets, device=tokens.device).diff()
        # Text by text, rows ascending; a text without tokens has nothing to send its gradient to.
        grad = grads[0].masked_fill((lengths == 0).unsqueeze(1), 0)
        text, row = grad.nonzero(as_tuple=True)
        grad_tokens = tokens.new_zeros(tokens.shape, dtype=acc) if ctx.needs_input_grad[0] else None
        grad_weight = weight.new_zeros(weight.shape, dtype=acc) if ctx.needs_input_grad[1] else None
        # Backward may run inside the training step's autocast: the dtypes here are chosen, not cast.
        with torch.autocast(tokens.device.type, enabled=False):
            vocab, done = weight.shape[0], 0
            for i, n in enumerate(torch.bincount(text, minlength=len(ctx.offsets) - 1).tolist()):
                if not n:
                    continue
                start, end = ctx.offsets[i], ctx.offsets[i + 1]
                rows = row[done : done + n]
                done += n
                # The winners found again in the forward's dtype: [n, the text's tokens].
                winner = (weight[rows].to(ctx.dtype) @ tokens[start:end].to(ctx.dtype).T).argmax(dim=1)
                # [rows, tokens] with each row's gradient at its winner: the two products below are
                # the gradient, summed by matmuls as autograd sums it. With most of the vocabulary
                # carrying a gradient (an MLM not yet made sparse by FLOPS) the whole
                # [vocab, tokens] form is cheaper than gathering nearly every row.
                dense = 4 * n > vocab
                picks = torch.zeros(vocab if dense else n, end - start, dtype=acc, device=tokens.device)
                picks[rows if dense else torch.arange(n, device=rows.device), winner] = grad[i, rows].to(acc)
                if grad_tokens is not None:
                    grad_tokens[start:end] = picks.T @ (weight if dense else weight[rows]).to(acc)
                if grad_weight is not None:
                    own = tokens[start:end].to(acc)
                    if dense:
                        grad_weight += picks @ own
                    else:
                        grad_weight.index_add_(0, rows, picks @ own)
        return (
            None if grad_tokens is None else grad_tokens.to(tokens.dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None,
        )


def _binary(mask: Tensor) -> bool:
    """Whether the attention mask only keeps or drops tokens (0/1), as every tokenizer's does."""
    return bool(((mask == 0) | (mask == 1)).all())


def defer_mlm_decoders(stack: nn.Module) -> None:
    """Let each SpladePooling project its own MLMTransformer's tokens: every MLMTransformer
    directly followed by a SpladePooling (in a stack, or in a Router's route) defers its
    decoder (MLMTransformer.defer_decoder)."""
    for sequence in [m for m in stack.modules() if isinstance(m, nn.Sequential)]:
        for first, second in itertools.pairwise(sequence):
            if isinstance(first, MLMTransformer) and isinstance(second, SpladePooling):
                first.defer_decoder()
