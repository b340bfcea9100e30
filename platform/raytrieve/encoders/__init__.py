"""The three model kinds on one shared base."""

from __future__ import annotations

import logging
from typing import Any

from raytrieve.encoders import onnx_runtime
from raytrieve.encoders.base import set_max_seq_length
from raytrieve.encoders.cross import CrossEncoder
from raytrieve.encoders.dense import DenseEncoder
from raytrieve.encoders.sparse import SparseEncoder
from raytrieve.kinds import model_kind

__all__ = ["CrossEncoder", "DenseEncoder", "SparseEncoder", "load_encoder"]

log = logging.getLogger(__name__)


def load_encoder(
    kind: Any,
    name_or_path: Any,
    *,
    device: str = "cpu",
    max_seq_length: int | None = None,
    trust_remote_code: bool = False,
    dtype: str = "float32",
    backend: str = "torch",
) -> Any:
    """A model of ``kind`` ("dense", "sparse", "cross" or its ModelKind) from any model reference (a variant, a
    folder or an MLflow model URI, as the constructors take), truncating at ``max_seq_length``
    (every route of a Router model) when given, computing in ``dtype`` (encoders/precision.py;
    "auto" is chosen after truncation, on the texts the model will see), its transformers run by
    ``backend`` (torch, or onnx: ONNX Runtime, float32 on CPU; encoders/onnx_runtime.py)."""
    onnx_runtime.check_backend(backend, dtype, device)  # before loading anything
    model = model_kind(kind, "kind").encoder_class()(name_or_path, device=device, trust_remote_code=trust_remote_code)
    if max_seq_length:
        set_max_seq_length(model, max_seq_length)
    if backend != "torch":
        model.set_backend(backend)
    model.set_dtype(dtype)
    if dtype != "float32":
        log.info("%s %s: %s", kind, name_or_path, model.dtype_reason)
    return model
