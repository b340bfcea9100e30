"""A k-sparse autoencoder over a dense sentence embedding: CSR (Contrastive Sparse
Representation, "Beyond Matryoshka", arXiv 2503.01776).

The encoder keeps the ``k`` largest latents of ``W (x - b_pre) + b_lat`` (ReLU'd); the
decoder is the encoder's transposed weight (tied) plus ``b_pre``. Encoding needs only the
top-k latents; training also returns the reconstructions that CSRLoss compares with the
backbone embedding: from the top k, from the top 4k, and from the top ``k_aux`` latents
that have been dead (never active) for more than ``dead_threshold`` training steps, which
gives dead latents a gradient again.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raytrieve.errors import ConfigError, DimensionMismatchError, InputError
from raytrieve.modules.base import Features, Module

# sentence-transformers' name for the tied weight (the decoder's view of the encoder's).
_TIED_NAME = "decoder.linear.weight"


class SparseAutoEncoder(Module):
    st_type = "sentence_transformers.sparse_encoder.models.SparseAutoEncoder"
    st_aliases = ("sentence_transformers.sparse_encoder.modules.sparse_auto_encoder.SparseAutoEncoder",)
    has_weights = True

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int = 512,
        k: int = 8,
        k_aux: int = 512,
        normalize: bool = False,
        dead_threshold: int = 30,
    ) -> None:
        super().__init__()
        for name, value in (("input_dim", input_dim), ("hidden_dim", hidden_dim), ("k", k)):
            if value <= 0:
                raise ConfigError(f"SparseAutoEncoder: {name} must be positive, got {value}")
        if k > hidden_dim:
            raise ConfigError(f"SparseAutoEncoder: k={k} exceeds hidden_dim={hidden_dim}; lower k or widen hidden_dim")
        if not 0 <= k_aux <= hidden_dim:
            raise ConfigError(
                f"SparseAutoEncoder: k_aux={k_aux} must be in [0, hidden_dim={hidden_dim}] (0 disables it)"
            )
        self.input_dim, self.hidden_dim = input_dim, hidden_dim
        self.k, self.k_aux = k, k_aux
        self.normalize = normalize
        self.dead_threshold = dead_threshold
        self.pre_bias = nn.Parameter(torch.zeros(input_dim))
        self.encoder = nn.Linear(input_dim, hidden_dim, bias=False)
        self.latent_bias = nn.Parameter(torch.zeros(hidden_dim))
        # Training steps since each latent was last among the active top-k (the dead-latent clock).
        self.register_buffer("stats_last_nonzero", torch.zeros(hidden_dim, dtype=torch.long))
        self._register_load_state_dict_pre_hook(_read_tied_name)

    def _standardize(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if not self.normalize:
            return x, {}
        mu = x.mean(dim=-1, keepdim=True)
        x = x - mu
        std = x.std(dim=-1, keepdim=True)
        return x / (std + 1e-5), {"mu": mu, "std": std}

    def encode_pre_act(self, x: Tensor) -> Tensor:
        return F.linear(x - self.pre_bias, self.encoder.weight, self.latent_bias)

    def decode(self, latents: Tensor, info: dict[str, Tensor] | None = None) -> Tensor:
        out = F.linear(latents, self.encoder.weight.t()) + self.pre_bias
        if self.normalize:
            if not info:
                raise InputError("SparseAutoEncoder.decode: normalize=True needs the mu and std of its input (info)")
            out = out * info["std"] + info["mu"]
        return out

    def top_k(self, pre_act: Tensor, k: int, compute_aux: bool = True) -> tuple[Tensor, Tensor | None]:
        """(ReLU of the k largest latents, zeros elsewhere; the same over dead latents or None)."""
        top = torch.topk(pre_act, k=k, dim=-1)
        latents = F.relu(torch.zeros_like(pre_act).scatter(-1, top.indices, top.values))
        if self.training and torch.is_grad_enabled():
            hit = torch.zeros_like(self.stats_last_nonzero)
            hit.scatter_add_(0, top.indices.reshape(-1), (top.values > 1e-5).to(hit.dtype).reshape(-1))
            self.stats_last_nonzero *= 1 - hit.clamp(max=1)
            self.stats_last_nonzero += 1
        aux = None
        if self.k_aux and compute_aux:
            dead = pre_act * (self.stats_last_nonzero > self.dead_threshold)
            top_dead = torch.topk(dead, k=self.k_aux)
            aux = F.relu(torch.zeros_like(pre_act).scatter(-1, top_dead.indices, top_dead.values))
        return latents, aux

    def forward(self, features: Features, max_active_dims: int | None = None, **kwargs: Any) -> Features:
        k = max_active_dims if max_active_dims is not None else self.k
        x = features["sentence_embedding"]
        if x.shape[-1] != self.input_dim:
            raise DimensionMismatchError(
                f"SparseAutoEncoder expects {self.input_dim}-d input but the previous module gives {x.shape[-1]}-d; "
                "fix input_dim of the SparseAutoEncoder module"
            )
        prepared, info = self._standardize(x)
        pre_act = self.encode_pre_act(prepared)
        if torch.is_inference_mode_enabled():
            # Encoding: the sparse code is all that is used.
            features["sentence_embedding"], _ = self.top_k(pre_act, k, compute_aux=False)
            return features
        if 4 * k > self.hidden_dim:
            raise ConfigError(
                f"SparseAutoEncoder: training reconstructs from the top 4k latents, but 4 x k={k} exceeds "
                f"hidden_dim={self.hidden_dim}; lower k or widen hidden_dim"
            )
        latents_k, latents_aux = self.top_k(pre_act, k)
        latents_4k, _ = self.top_k(pre_act, 4 * k, compute_aux=False)
        recons_k = self.decode(latents_k, info)
        decoder_bias = self.pre_bias * info["std"] if self.normalize else self.pre_bias
        recons_aux = None
        if latents_aux is not None:
            # The auxiliary reconstruction targets a residual: no mean is added back.
            recons_aux = F.linear(latents_aux, self.encoder.weight.t()) + self.pre_bias
            if self.normalize:
                recons_aux = recons_aux * info["std"]
        features.update(
            {
                "sentence_embedding_backbone": x,
                "sentence_embedding_encoded": pre_act,
                "sentence_embedding_encoded_4k": latents_4k,
                "auxiliary_embedding": latents_aux,
                "decoded_embedding_k": recons_k,
                "decoded_embedding_4k": self.decode(latents_4k, info),
                "decoded_embedding_aux": recons_aux,
                "decoded_embedding_k_pre_bias": recons_k - decoder_bias,
                "sentence_embedding": latents_k,
            }
        )
        return features

    def get_embedding_dimension(self) -> int:
        """The code's width; only k (or max_active_dims) of them are non-zero per input."""
        return self.hidden_dim

    def config_dict(self) -> dict[str, Any]:
        return {
            "input_dim": self.input_dim,
            "hidden_dim": self.hidden_dim,
            "k": self.k,
            "k_aux": self.k_aux,
            "normalize": self.normalize,
            "dead_threshold": self.dead_threshold,
        }


def _read_tied_name(state: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """sentence-transformers saves the tied weight under the decoder's name only."""
    tied = prefix + _TIED_NAME
    if tied in state and prefix + "encoder.weight" not in state:
        state[prefix + "encoder.weight"] = state.pop(tied)
    else:
        state.pop(tied, None)
