"""Similarity functions between embeddings, by the names sentence-transformers saves.

``similarity(a, b)`` gives the [len(a), len(b)] matrix, ``pairwise`` the row-wise scores.
Distances are negated so that, for every function, higher means more similar.
Sparse (COO) inputs work for dot and cosine.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from raytrieve.errors import InputError

SIMILARITY_FUNCTIONS = ("cosine", "dot", "euclidean", "manhattan")


def to_tensor(x: Tensor | np.ndarray | list) -> Tensor:
    if isinstance(x, Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(x)
    else:
        t = torch.as_tensor(np.asarray(x))
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if not t.is_sparse and (not torch.is_floating_point(t) or t.dtype in (torch.float16, torch.bfloat16)):
        t = t.float()  # half precision similarities lose too much; losses and scores use float32
    return t


def _normalize(t: Tensor) -> Tensor:
    if t.is_sparse:
        t = t.coalesce()
        norms = torch.sqrt(torch.sparse.sum(t * t, dim=1).to_dense()).clamp(min=1e-12)
        idx, vals = t.indices(), t.values()
        return torch.sparse_coo_tensor(idx, vals / norms[idx[0]], t.shape).coalesce()
    return F.normalize(t, p=2, dim=1)


def _float32(t: Tensor):
    """Autocast off for the block: similarities (and the losses built on them) stay float32 when
    the model runs under bf16/fp16 autocast (training.bf16, inference dtype)."""
    return torch.autocast(t.device.type, enabled=False)


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    with _float32(a):
        return _product(a, b)


def _product(a: Tensor, b: Tensor) -> Tensor:
    if a.is_sparse or b.is_sparse:
        with warnings.catch_warnings():  # torch's "sparse CSR is beta" notice, raised internally
            warnings.simplefilter("ignore", UserWarning)
            out = torch.sparse.mm(a.coalesce() if a.is_sparse else a, b.t().coalesce() if b.is_sparse else b.t())
            return out.to_dense() if out.is_sparse else out
    return a @ b.t()


def cosine(a, b) -> Tensor:
    return _matmul(_normalize(to_tensor(a)), _normalize(to_tensor(b)))


def dot(a, b) -> Tensor:
    return _matmul(to_tensor(a), to_tensor(b))


def _dense(a) -> Tensor:
    t = to_tensor(a)
    return t.to_dense() if t.is_sparse else t


def euclidean(a, b) -> Tensor:
    a, b = _dense(a), _dense(b)
    with _float32(a):
        return -torch.cdist(a, b, p=2.0)


def manhattan(a, b) -> Tensor:
    a, b = _dense(a), _dense(b)
    with _float32(a):
        return -torch.cdist(a, b, p=1.0)


def _pairwise_cosine(a, b) -> Tensor:
    return (_dense_norm(a) * _dense_norm(b)).sum(dim=-1)


def _dense_norm(a) -> Tensor:
    return F.normalize(_dense(a), p=2, dim=1)


def _pairwise_dot(a, b) -> Tensor:
    return (_dense(a) * _dense(b)).sum(dim=-1)


def _pairwise_euclidean(a, b) -> Tensor:
    return -torch.sqrt(((_dense(a) - _dense(b)) ** 2).sum(dim=-1))


def _pairwise_manhattan(a, b) -> Tensor:
    return -(_dense(a) - _dense(b)).abs().sum(dim=-1)


_MATRIX: dict[str, Callable[..., Tensor]] = {
    "cosine": cosine,
    "dot": dot,
    "euclidean": euclidean,
    "manhattan": manhattan,
}
_PAIRWISE: dict[str, Callable[..., Tensor]] = {
    "cosine": _pairwise_cosine,
    "dot": _pairwise_dot,
    "euclidean": _pairwise_euclidean,
    "manhattan": _pairwise_manhattan,
}
# Names older sentence-transformers configs and users write for the same functions.
_ALIASES = {"cos_sim": "cosine", "dot_score": "dot", "dot_product": "dot", "l2": "euclidean", "l1": "manhattan"}


def canonical_name(name: str) -> str:
    name = _ALIASES.get(name, name)
    if name not in _MATRIX:
        raise InputError(f"unknown similarity function {name!r}; choose from {list(SIMILARITY_FUNCTIONS)}")
    return name


def _operands(a, b) -> tuple[Tensor, Tensor]:
    """Both sides as [rows, dims] tensors of the same dims, or an error naming the shapes."""
    a_t, b_t = to_tensor(a), to_tensor(b)
    if a_t.dim() != 2 or b_t.dim() != 2:
        raise InputError(
            f"similarity takes vectors or [rows, dims] matrices, got shapes {list(a_t.shape)} and {list(b_t.shape)}"
        )
    if a_t.shape[1] != b_t.shape[1]:
        raise InputError(
            f"similarity needs embeddings of the same dimension, got {a_t.shape[1]} and {b_t.shape[1]} "
            "(embeddings of two models, or one truncated?)"
        )
    return a_t, b_t


def similarity(a, b, name: str = "cosine") -> Tensor:
    return _MATRIX[canonical_name(name)](*_operands(a, b))


def pairwise(a, b, name: str = "cosine") -> Tensor:
    a_t, b_t = _operands(a, b)
    if a_t.shape[0] != b_t.shape[0]:
        raise InputError(f"pairwise similarity needs equal row counts, got {a_t.shape[0]} and {b_t.shape[0]}")
    return _PAIRWISE[canonical_name(name)](a_t, b_t)
