"""SparseEncoder: texts to sparse vocabulary-sized vectors (SPLADE), the
sentence-transformers ``SparseEncoder`` counterpart.

    model = SparseEncoder("splade-tiny")
    emb = model.encode_document(["The cat sat on the mat"])    # torch sparse COO [1, 30522]
    model.decode(emb[0], top_k=5)                              # [("cat", 2.1), ("mat", 1.9), ...]
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from raytrieve.encoders import precision
from raytrieve.encoders.base import EmbeddingEncoder, texts_argument
from raytrieve.errors import InputError
from raytrieve.modules import MLMTransformer, Module, SpladePooling
from raytrieve.modules.splade_pooling import defer_mlm_decoders


def _keep_top(emb: Tensor, k: int | None) -> Tensor:
    """Zero all but the k largest values of each row."""
    if k is None or k >= emb.shape[1]:
        return emb
    values, idx = emb.topk(k, dim=1)
    return torch.zeros_like(emb).scatter_(1, idx, values)


def _sparse_rows(features: dict[str, Any], k: int | None, to_sparse: bool) -> Tensor:
    """A batch's vectors as ``encode`` keeps them (a function: a pool's workers get it pickled)."""
    emb = _keep_top(features["sentence_embedding"].float(), k)
    return emb.to_sparse() if to_sparse else emb


class SparseEncoder(EmbeddingEncoder):
    default_prompt_names = ("query", "document")
    model_type = "SparseEncoder"
    default_similarity = "dot"

    def __init__(
        self, model: Any, *, max_active_dims: int | None = None, dtype: str = "float32", **kwargs: Any
    ) -> None:
        super().__init__(model, **kwargs)
        # SPLADE pooling projects only real tokens onto the vocabulary (modules/mlm_head.py).
        defer_mlm_decoders(self.stack)
        if self.similarity_fn_name not in ("dot", "cosine"):
            raise InputError(f"SparseEncoder similarity must be 'dot' or 'cosine', not {self.similarity_fn_name!r}")
        self.max_active_dims = max_active_dims
        self.set_dtype(dtype)

    @classmethod
    def default_modules(cls, path: Path, trust_remote_code: bool = False) -> list[Module]:
        mlm = MLMTransformer.from_pretrained(path, trust_remote_code=trust_remote_code)
        return [mlm, SpladePooling("max", embedding_dimension=mlm.get_embedding_dimension())]

    def encode(
        self,
        sentences: str | Sequence[str] | None = None,
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        convert_to_tensor: bool = True,
        convert_to_sparse_tensor: bool = True,
        as_dicts: bool = False,
        device: str | torch.device | list[str] | None = None,
        max_active_dims: int | None = None,
        task: str | None = None,
        token_budget: int | None = None,
        pool: dict[str, Any] | None = None,
        chunk_size: int | None = None,
        *,
        inputs: Any = None,
    ) -> Any:
        """Encode to sparse vectors.

        Returns a torch sparse COO tensor [n, vocab] by default; a dense tensor with
        ``convert_to_sparse_tensor=False``; with ``convert_to_tensor=False`` a list of one vector
        per text (sparse, or dense with ``convert_to_sparse_tensor=False``), as sentence-transformers;
        a list of ``{"indices", "values"}`` numpy dicts (sorted by weight, descending) with
        ``as_dicts=True``. ``max_active_dims`` keeps the
        largest weights of each vector. ``token_budget`` and ``Pretokenized`` inputs work as in
        ``DenseEncoder.encode``, and so do ``pool`` and ``chunk_size`` (worker processes).
        """
        sentences = texts_argument(sentences, inputs, "encode")
        texts, single = self._as_list(sentences, "sentences")
        prompt = self.resolve_prompt(prompt, prompt_name)
        k = max_active_dims if max_active_dims is not None else self.max_active_dims
        if k is not None and k <= 0:
            raise InputError(f"max_active_dims must be positive, got {k}")
        dim = self.get_embedding_dimension() or self.input_module(task).get_embedding_dimension()

        collect = partial(_sparse_rows, k=k, to_sparse=convert_to_sparse_tensor or as_dicts)
        emb = self._batched(
            texts,
            batch_size=batch_size,
            task=task,
            prompt=prompt,
            device=device,
            show_progress_bar=show_progress_bar,
            collect=collect,
            token_budget=token_budget,
            empty=collect({"sentence_embedding": torch.empty(0, dim)}),
            pool=pool,
            chunk_size=chunk_size,
        )
        if as_dicts:
            rows = sparse_rows(emb)
            return rows[0] if single else rows
        if emb.is_sparse:
            emb = emb.coalesce()
        if not convert_to_tensor:  # a list of one vector per text, as sentence-transformers
            return emb[0] if single else list(emb.unbind(0))
        return emb[0] if single else emb

    @staticmethod
    def intersection(embeddings_1: Tensor, embeddings_2: Tensor) -> Tensor:
        """The dimensions two sparse vectors share: their element-wise product, keeping positive
        weights (sentence-transformers' ``intersection``). ``embeddings_1``: one vector;
        ``embeddings_2``: one vector or a batch. A sparse tensor of ``embeddings_2``'s shape."""
        a, b = (e if e.is_sparse else e.to_sparse() for e in (embeddings_1, embeddings_2))
        if a.ndim != 1:
            raise InputError(f"embeddings_1: one vector (1 dimension), got shape {tuple(a.shape)}")
        if a.shape[-1] != b.shape[-1]:
            raise InputError(f"embeddings_1 has {a.shape[-1]} dimensions, embeddings_2 {b.shape[-1]}")
        if b.ndim not in (1, 2):
            raise InputError(f"embeddings_2: a vector or a batch of them, got shape {tuple(b.shape)}")
        product = (a * b if b.ndim == 1 else torch.stack([a * row for row in b])).coalesce()
        keep = product.values() > 0
        return torch.sparse_coo_tensor(
            product.indices()[:, keep], product.values()[keep], size=product.size(), device=product.device
        )

    def probe_outputs(self) -> Any:
        kw: dict[str, Any] = {"convert_to_sparse_tensor": False}
        return (
            self.encode_query(list(precision.PROBE_QUERIES), **kw).cpu().numpy(),
            self.encode_document(list(precision.PROBE_DOCUMENTS), **kw).cpu().numpy(),
        )

    def compare_probe(self, reference: Any, candidate: Any, dtype: str) -> Any:
        (ref_q, ref_d), (cand_q, cand_d) = reference, candidate
        return precision.compare_sparse(ref_q, ref_d, cand_q, cand_d, dtype)

    def decode(
        self, embeddings: Any, top_k: int | None = None
    ) -> list[tuple[str, float]] | list[list[tuple[str, float]]]:
        """The (token, weight) pairs of each vector, largest weight first. ``embeddings``: what
        ``encode`` returns, a tensor or array of one or more vectors, or ``as_dicts`` output."""
        vocab = self.get_embedding_dimension()
        if isinstance(embeddings, list) and not embeddings:  # encode([], as_dicts=True)
            return []
        if isinstance(embeddings, dict) or (
            isinstance(embeddings, list) and all(isinstance(e, dict) for e in embeddings)
        ):
            dicts = [embeddings] if isinstance(embeddings, dict) else embeddings
            for i, d in enumerate(dicts):
                if set(d) != {"indices", "values"}:
                    raise InputError(
                        f"embeddings[{i}]: an as_dicts vector has keys indices and values, got {sorted(d)}"
                    )
            rows = []
            for d in dicts:  # by weight, as encode's are (a dict of another maker may not be)
                order = np.argsort(-np.asarray(d["values"]), kind="stable")
                rows.append({"indices": np.asarray(d["indices"])[order], "values": np.asarray(d["values"])[order]})
            single = isinstance(embeddings, dict)
        else:
            emb = _as_tensor(embeddings, "embeddings")
            single = emb.dim() == 1
            emb = emb.unsqueeze(0) if single else emb
            if vocab and emb.shape[1] != vocab:
                raise InputError(
                    f"embeddings have {emb.shape[1]} dimensions; this model's vectors have {vocab} (its vocabulary)"
                )
            rows = sparse_rows(emb)
        tokenizer = self.tokenizer
        decoded = []
        for row in rows:
            idx, val = row["indices"], row["values"]
            if top_k is not None:
                idx, val = idx[:top_k], val[:top_k]
            tokens = tokenizer.convert_ids_to_tokens(idx.tolist())
            decoded.append(list(zip(tokens, val.tolist())))
        return decoded[0] if single else decoded

    @staticmethod
    def sparsity(embeddings: Any) -> dict[str, float]:
        """Mean active dimensions per vector and the share of zeros, of a tensor or array of one or
        more vectors (``as_dicts`` output holds no vocabulary size: encode without it)."""
        if isinstance(embeddings, list) and not embeddings:  # encode([], as_dicts=True)
            return {"active_dims": 0.0, "sparsity_ratio": 1.0}
        if isinstance(embeddings, (dict, list)):
            raise InputError(
                "sparsity takes the tensor encode returns, not as_dicts output (it holds no vocabulary size); "
                "encode with as_dicts=False"
            )
        embeddings = _as_tensor(embeddings, "embeddings")
        emb = embeddings.unsqueeze(0) if embeddings.dim() == 1 else embeddings
        if emb.shape[0] == 0:
            return {"active_dims": 0.0, "sparsity_ratio": 1.0}
        active = (emb.coalesce()._nnz() if emb.is_sparse else int((emb != 0).sum())) / emb.shape[0]
        return {"active_dims": float(active), "sparsity_ratio": float(1.0 - active / emb.shape[1])}


def _as_tensor(x: Any, what: str) -> Tensor:
    """A torch tensor (sparse or dense) of one or more vectors, from a tensor or numpy array."""
    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    if not isinstance(t, Tensor) or t.dim() not in (1, 2):
        shape = f" of shape {list(t.shape)}" if isinstance(t, (Tensor, np.ndarray)) else ""
        raise InputError(f"{what} must be a vector or a [rows, vocabulary] matrix, got {type(x).__name__}{shape}")
    return t.coalesce() if t.is_sparse else t


def sparse_rows(emb: Tensor) -> list[dict[str, np.ndarray]]:
    """Per row: nonzero vocabulary ids and weights, by weight descending."""
    emb = emb.cpu()
    n = emb.shape[0]
    if not emb.is_sparse:
        emb = emb.to_sparse()
    emb = emb.coalesce()
    rows_idx, cols = emb.indices().numpy()
    vals = emb.values().float().numpy()
    keep = vals != 0
    rows_idx, cols, vals = rows_idx[keep], cols[keep], vals[keep]
    # Sort by row, then by weight descending, in one pass.
    order = np.lexsort((-vals, rows_idx))
    rows_idx, cols, vals = rows_idx[order], cols[order], vals[order]
    bounds = np.searchsorted(rows_idx, np.arange(n + 1))
    return [
        {"indices": cols[bounds[i] : bounds[i + 1]].astype(np.int64), "values": vals[bounds[i] : bounds[i + 1]]}
        for i in range(n)
    ]
