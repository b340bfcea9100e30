"""A feed-forward projection of the sentence embedding (Linear + activation)."""

from __future__ import annotations

from typing import Any

from torch import nn

from raytrieve.errors import DimensionMismatchError, ModelLoadError
from raytrieve.modules.activations import activation_from_name, activation_name
from raytrieve.modules.base import Features, Module


class Dense(Module):
    st_type = "sentence_transformers.models.Dense"
    st_aliases = ("sentence_transformers.base.modules.dense.Dense",)
    has_weights = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation_function: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = bias
        self.activation_function = nn.Tanh() if activation_function is None else activation_function
        self.linear = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, features: Features, **kwargs: Any) -> Features:
        x = features["sentence_embedding"]
        if x.shape[-1] != self.in_features:
            raise DimensionMismatchError(
                f"Dense expects {self.in_features}-d input but the previous module gives {x.shape[-1]}-d; "
                "fix in_features of the Dense module"
            )
        features["sentence_embedding"] = self.activation_function(self.linear(x))
        return features

    def get_embedding_dimension(self) -> int:
        return self.out_features

    def config_dict(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias,
            "activation_function": activation_name(self.activation_function),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], trust_remote_code: bool = False) -> Dense:
        config = dict(config)
        if config.pop("use_residual", False):
            raise ModelLoadError("Dense: use_residual=True is not supported yet")
        for key in ("module_input_name", "module_output_name"):
            value = config.pop(key, None)
            if value not in (None, "sentence_embedding"):
                raise ModelLoadError(f"Dense: {key}={value!r} is not supported (only 'sentence_embedding')")
        act = config.pop("activation_function", None)
        activation = (
            activation_from_name(act, trust_remote_code=trust_remote_code, where="Dense config") if act else None
        )
        return cls(activation_function=activation, **config)
