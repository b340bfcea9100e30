"""The three model kinds on one shared base."""

from raytrieve.encoders.cross import CrossEncoder
from raytrieve.encoders.dense import DenseEncoder
from raytrieve.encoders.sparse import SparseEncoder

__all__ = ["DenseEncoder", "SparseEncoder", "CrossEncoder"]
