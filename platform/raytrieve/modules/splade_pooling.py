"""SPLADE pooling: log(1 + relu(MLM logits)), max- or sum-pooled over the tokens.

The result is one weight per vocabulary entry, mostly zero: the sparse embedding.
"""

from __future__ import annotations

from typing import Any

import torch

from raytrieve.errors import ConfigError
from raytrieve.modules.base import Features, Module


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
        # is the memory peak of SPLADE, chunking bounds it without changing the result.
        self.chunk_size = chunk_size

    def forward(self, features: Features, **kwargs: Any) -> Features:
        logits = features["token_embeddings"]
        # Half-precision logits (autocast) pool in float32: log1p, max and sum lose less there.
        acc = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
        mask = features["attention_mask"].unsqueeze(-1).to(acc)
        seq_len = logits.shape[1]
        step = self.chunk_size if self.chunk_size and self.chunk_size > 0 else max(seq_len, 1)
        pooled = None
        for start in range(0, seq_len, step):
            x = torch.log1p(torch.relu(logits[:, start : start + step].to(acc) * mask[:, start : start + step]))
            if self.activation_function == "log1p_relu":
                x = torch.log1p(x)
            part = x.max(dim=1).values if self.pooling_strategy == "max" else x.sum(dim=1)
            if pooled is None:
                pooled = part
            else:
                pooled = torch.maximum(pooled, part) if self.pooling_strategy == "max" else pooled + part
        if pooled is None:  # zero-length sequences
            pooled = logits.new_zeros(logits.shape[0], logits.shape[-1], dtype=acc)
        if self.embedding_dimension is None:
            self.embedding_dimension = int(pooled.shape[1])
        features["sentence_embedding"] = pooled
        return features

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
