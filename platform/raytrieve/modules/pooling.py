"""Pool token embeddings into one sentence embedding.

Modes: cls, mean, max, mean_sqrt_len_tokens, weightedmean, lasttoken; several modes are
concatenated in the order given. With ``include_prompt=False`` the prompt's tokens (the
count arrives as ``features["prompt_length"]``) are left out of the pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from raytrieve.errors import ConfigError, DimensionMismatchError
from raytrieve.modules.base import Features, Module

POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# The boolean flags sentence-transformers < 6 wrote, in the order it concatenated them.
_LEGACY_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


class Pooling(Module):
    st_type = "sentence_transformers.models.Pooling"
    st_aliases = ("sentence_transformers.sentence_transformer.modules.pooling.Pooling",)

    def __init__(
        self,
        embedding_dimension: int,
        pooling_mode: str | Sequence[str] = "mean",
        include_prompt: bool = True,
    ) -> None:
        super().__init__()
        modes = (pooling_mode,) if isinstance(pooling_mode, str) else tuple(pooling_mode)
        unknown = [m for m in modes if m not in POOLING_MODES]
        if unknown or not modes:
            raise ConfigError(f"Pooling: unknown pooling_mode {unknown or modes}; choose from {list(POOLING_MODES)}")
        self.embedding_dimension = embedding_dimension
        self.modes = modes
        self.include_prompt = include_prompt

    def get_embedding_dimension(self) -> int:
        return self.embedding_dimension * len(self.modes)

    def forward(self, features: Features, **kwargs: Any) -> Features:
        tokens: Tensor = features["token_embeddings"]
        if tokens.shape[-1] != self.embedding_dimension:
            raise DimensionMismatchError(
                f"Pooling expects {self.embedding_dimension}-d token embeddings but the transformer gives "
                f"{tokens.shape[-1]}-d; set Pooling embedding_dimension to {tokens.shape[-1]}"
            )
        mask: Tensor = features["attention_mask"]
        full_mask = mask
        prompt_length = features.get("prompt_length")
        if prompt_length and not self.include_prompt:
            # A copy: cached losses replay the same features dict and must see the original mask.
            mask = mask.clone()
            pad = mask.to(torch.int32).argmax(dim=1)  # > 0 only under left padding
            positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
            mask[positions < (pad + prompt_length).unsqueeze(1)] = 0
        outputs = [self._pool(mode, tokens, mask, full_mask, features) for mode in self.modes]
        features["sentence_embedding"] = torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]
        return features

    @staticmethod
    def _pool(mode: str, tokens: Tensor, mask: Tensor, full_mask: Tensor, features: Features) -> Tensor:
        # Half-precision token embeddings (autocast inference or training) pool in float32 and
        # stay float32: the sentence embedding keeps what the sum gained.
        acc_dtype = torch.float32 if tokens.dtype in (torch.float16, torch.bfloat16) else tokens.dtype
        if mode == "cls":
            if "cls_token_embeddings" in features:
                return features["cls_token_embeddings"].to(acc_dtype)
            first = mask.to(torch.int).argmax(dim=1)
            return tokens[torch.arange(tokens.shape[0], device=tokens.device), first].to(acc_dtype)
        if mode == "max":
            m = mask.unsqueeze(-1).to(tokens.dtype)
            return tokens.masked_fill(m == 0, float("-inf")).max(dim=1).values.to(acc_dtype)
        if mode in ("mean", "mean_sqrt_len_tokens"):
            m = mask.unsqueeze(-1).to(tokens.dtype)
            total = (tokens * m).sum(dim=1, dtype=acc_dtype)
            count = torch.clamp(m.sum(dim=1, dtype=acc_dtype), min=1e-9)
            denom = count if mode == "mean" else torch.sqrt(count)
            return total / denom
        if mode == "weightedmean":
            m = mask.unsqueeze(-1).to(acc_dtype)
            weights = torch.arange(1, tokens.shape[1] + 1, device=tokens.device, dtype=acc_dtype).view(1, -1, 1)
            pad = full_mask.to(torch.int32).argmax(dim=1)  # left padding shifts positions
            weights = weights - pad.view(-1, 1, 1)
            wm = m * weights
            return (tokens * wm).sum(dim=1) / torch.clamp(wm.sum(dim=1), min=1e-9)
        # lasttoken: the last attended position (works for left and right padding).
        seq_len = tokens.shape[1]
        values, idx = mask.flip(1).max(1)
        idx = torch.where(values == 0, seq_len - 1, idx)
        last = seq_len - idx - 1
        masked = tokens * mask.unsqueeze(-1).to(tokens.dtype)
        return masked[torch.arange(tokens.shape[0], device=tokens.device), last].to(acc_dtype)

    def config_dict(self) -> dict[str, Any]:
        # The boolean-flag form is read by every sentence-transformers release (2.x to 6.x).
        if len(set(self.modes)) != len(self.modes) or list(self.modes) != sorted(
            self.modes, key=list(_LEGACY_FLAGS.values()).index
        ):
            return {
                "embedding_dimension": self.embedding_dimension,
                "pooling_mode": list(self.modes),
                "include_prompt": self.include_prompt,
            }
        config: dict[str, Any] = {"word_embedding_dimension": self.embedding_dimension}
        for flag, mode in _LEGACY_FLAGS.items():
            config[flag] = mode in self.modes
        config["include_prompt"] = self.include_prompt
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any], trust_remote_code: bool = False) -> Pooling:
        config = dict(config)
        dim = config.pop("embedding_dimension", config.pop("word_embedding_dimension", None))
        if dim is None:
            raise ConfigError("Pooling config: missing embedding_dimension (or word_embedding_dimension)")
        mode = config.pop("pooling_mode", None)
        flags = [m for flag, m in _LEGACY_FLAGS.items() if config.pop(flag, False)]
        if mode is None:
            mode = flags or "mean"
        include_prompt = config.pop("include_prompt", True)
        return cls(int(dim), mode, include_prompt=include_prompt)
