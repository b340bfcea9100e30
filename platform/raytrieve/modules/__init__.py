"""Building blocks of every raytrieve model, one contract: features dict in, features dict out."""

from __future__ import annotations

from pathlib import Path

from raytrieve.errors import UnknownModuleError
from raytrieve.modules.base import Features, InputModule, Module
from raytrieve.modules.dense import Dense
from raytrieve.modules.normalize import Normalize
from raytrieve.modules.pooling import POOLING_MODES, Pooling
from raytrieve.modules.router import Router
from raytrieve.modules.sparse_auto_encoder import SparseAutoEncoder
from raytrieve.modules.splade_pooling import SpladePooling
from raytrieve.modules.static_embedding import SparseStaticEmbedding
from raytrieve.modules.transformer import MLMTransformer, Transformer, find_module_config

MODULE_CLASSES: tuple[type[Module], ...] = (
    Transformer,
    MLMTransformer,
    Pooling,
    Dense,
    Normalize,
    SpladePooling,
    SparseStaticEmbedding,
    SparseAutoEncoder,
    Router,
)
_BY_TYPE: dict[str, type[Module]] = {name: cls for cls in MODULE_CLASSES for name in (cls.st_type, *cls.st_aliases)}


def module_class_for(type_name: str, directory: Path | None = None) -> type[Module]:
    """The class for a modules.json ``type``; a generic Transformer with the fill-mask task is an MLM."""
    cls = _BY_TYPE.get(type_name)
    if cls is None:
        raise UnknownModuleError(
            f"module type {type_name!r}{f' (in {directory})' if directory else ''} is not one raytrieve "
            f"implements; supported types: {sorted(_BY_TYPE)}"
        )
    if cls is Transformer and directory is not None:
        if find_module_config(Path(directory)).get("transformer_task") == "fill-mask":
            return MLMTransformer
    return cls


__all__ = [
    "MODULE_CLASSES",
    "POOLING_MODES",
    "Dense",
    "Features",
    "InputModule",
    "MLMTransformer",
    "Module",
    "Normalize",
    "Pooling",
    "Router",
    "SparseAutoEncoder",
    "SparseStaticEmbedding",
    "SpladePooling",
    "Transformer",
    "module_class_for",
]
