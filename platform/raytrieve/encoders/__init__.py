"""The three model kinds on one shared base."""

from __future__ import annotations

from typing import Any

from raytrieve.encoders.base import set_max_seq_length
from raytrieve.encoders.cross import CrossEncoder
from raytrieve.encoders.dense import DenseEncoder
from raytrieve.encoders.sparse import SparseEncoder
from raytrieve.kinds import model_kind

__all__ = ["CrossEncoder", "DenseEncoder", "SparseEncoder", "load_encoder"]


def load_encoder(
    kind: Any,
    name_or_path: Any,
    *,
    device: str = "cpu",
    max_seq_length: int | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """A model of ``kind`` ("dense", "sparse", "cross" or its ModelKind) from any model reference (a variant, a
    folder or an MLflow model URI, as the constructors take), truncating at ``max_seq_length``
    (every route of a Router model) when given."""
    model = model_kind(kind, "kind").encoder_class()(name_or_path, device=device, trust_remote_code=trust_remote_code)
    if max_seq_length:
        set_max_seq_length(model, max_seq_length)
    return model
