"""L2 normalization of the sentence embedding."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from raytrieve.modules.base import Features, Module


class Normalize(Module):
    st_type = "sentence_transformers.models.Normalize"
    st_aliases = ("sentence_transformers.base.modules.normalize.Normalize",)

    def forward(self, features: Features, **kwargs: Any) -> Features:
        x = features["sentence_embedding"]
        if x.dtype in (torch.float16, torch.bfloat16):  # the norm accumulates in float32
            x = x.float()
        features["sentence_embedding"] = F.normalize(x, p=2, dim=1)
        return features

    @classmethod
    def from_config(cls, config: dict[str, Any], trust_remote_code: bool = False) -> Normalize:
        # Newer sentence-transformers write module_input/output_name; both default to
        # sentence_embedding, the only value we support.
        for key in ("module_input_name", "module_output_name"):
            if config.get(key, "sentence_embedding") != "sentence_embedding":
                from raytrieve.errors import ModelLoadError

                raise ModelLoadError(f"Normalize: {key}={config[key]!r} is not supported (only 'sentence_embedding')")
        return cls()
