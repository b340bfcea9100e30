"""raytrieve: train, encode with and serve retrieval models on Ray.

``from raytrieve import DenseEncoder, SparseEncoder, CrossEncoder`` gives the library; it
needs torch and transformers only. Importing ``raytrieve`` itself is light: the encoders
(and torch) load on first use, Ray and MLflow only in the platform subpackages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "DenseEncoder": "raytrieve.encoders.dense",
    "SparseEncoder": "raytrieve.encoders.sparse",
    "CrossEncoder": "raytrieve.encoders.cross",
}

if TYPE_CHECKING:  # pragma: no cover
    from raytrieve.encoders.cross import CrossEncoder
    from raytrieve.encoders.dense import DenseEncoder
    from raytrieve.encoders.sparse import SparseEncoder


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'raytrieve' has no attribute {name!r}")


__all__ = ["CrossEncoder", "DenseEncoder", "SparseEncoder", "__version__"]
