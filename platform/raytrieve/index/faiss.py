"""The FAISS backend of DenseIndex: building, searching, saving and loading a FAISS
inner-product index (``flat``, ``ivf`` or ``hnsw``).

The ``faiss`` package is optional (``pip install faiss-cpu``) and imported only when a FAISS
index is built or read. ``import faiss`` below is the installed package, not this module:
imports are absolute.

On disk it is the file ``faiss.index`` in the index directory; the kind and its resolved
parameters are in the directory's manifest (written by DenseIndex).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from raytrieve.errors import DataError, InputError
from raytrieve.index import base

# The parameters each kind takes; anything else is refused with this list.
FAISS_PARAMS = {"flat": (), "ivf": ("nlist", "nprobe"), "hnsw": ("M", "ef_construction", "ef_search")}
FAISS_FILE = "faiss.index"
TRAIN_PER_LIST = 256  # FAISS's max_points_per_centroid: it samples a larger training set down to this


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise InputError(
            "backend='faiss' needs the faiss package: pip install faiss-cpu (or use backend='exact')"
        ) from None
    return faiss


class FaissIndex:
    """A built FAISS index with its kind and resolved parameters; search returns scores and
    corpus rows ordered as the exact path orders them (score descending, then lower row)."""

    def __init__(self, index: Any, kind: str, params: dict[str, Any]) -> None:
        # Use build() or load().
        self.index, self.kind, self.params = index, kind, dict(params)
        _apply_search_params(index, kind, self.params)

    @staticmethod
    def check(kind: str, params: dict[str, Any] | None) -> Any:
        """What can be refused before any vector is read: the kind, the parameters, and FAISS
        itself (returned, imported)."""
        base.choice("faiss_index", kind, tuple(FAISS_PARAMS))
        params = dict(params or {})
        unknown = sorted(set(params) - set(FAISS_PARAMS[kind]))
        if unknown:
            raise InputError(
                f"faiss_params (--faiss-param): unknown key(s) {unknown} for faiss_index={kind!r} (--faiss-index); "
                f"valid: {list(FAISS_PARAMS[kind])}"
            )
        for key, value in params.items():  # FAISS takes C ints: a string, 0 or a negative crashed it (abort)
            least = 2 if key == "M" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InputError(f"faiss_params[{key!r}]={value!r} (--faiss-param): must be a whole number >= {least}")
        return import_faiss()

    @classmethod
    def build(
        cls, vectors: np.ndarray, kind: str, params: dict[str, Any] | None = None, chunk: int = 65536
    ) -> FaissIndex:
        """An inner-product index over float32 ``vectors`` [n, dim] (an array or a memory map,
        added ``chunk`` rows at a time); defaults fill ``params``. IVF trains on at most
        ``TRAIN_PER_LIST`` rows per list, evenly spaced: FAISS itself samples no more."""
        faiss = cls.check(kind, params)
        params = dict(params or {})
        n, dim = vectors.shape
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "ivf":
            params = {"nlist": max(1, round(math.sqrt(n))), **params}
            params.setdefault("nprobe", min(params["nlist"], 16))
            if params["nlist"] > n:
                raise InputError(
                    f"faiss_params['nlist']={params['nlist']} exceeds the {n} vectors; IVF needs nlist <= n"
                )
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
            sample = n if n <= TRAIN_PER_LIST * params["nlist"] else TRAIN_PER_LIST * params["nlist"]
            rows = np.linspace(0, n - 1, sample).astype(np.int64) if sample < n else slice(None)
            index.train(np.ascontiguousarray(vectors[rows], dtype=np.float32))
        else:
            params = {"M": 32, "ef_construction": 80, "ef_search": 64, **params}
            index = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = params["ef_construction"]
        for lo in range(0, n, chunk):
            index.add(np.ascontiguousarray(vectors[lo : lo + chunk], dtype=np.float32))
        return cls(index, kind, params)

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores float32 [nq, k] and rows int64 [nq, k] for prepared float32 queries."""
        scores, labels = self.index.search(np.ascontiguousarray(q), k)
        valid = labels >= 0  # FAISS pads missing hits with label -1
        scores = np.where(valid, scores, -np.inf).astype(np.float32)
        return base.sort_top_k(scores, np.where(valid, labels, -1).astype(np.int64), k)

    def save(self, directory: Path) -> None:
        import_faiss().write_index(self.index, str(directory / FAISS_FILE))

    @classmethod
    def load(cls, directory: Path, kind: str, params: dict[str, Any], count: int, dim: int) -> FaissIndex:
        """Read ``faiss.index`` from ``directory``; it must hold ``count`` vectors of ``dim``."""
        faiss = import_faiss()
        file = directory / FAISS_FILE
        try:
            index = faiss.read_index(str(file))
        except RuntimeError as e:
            reason = str(e).splitlines()[0]
            raise DataError(f"{file}: missing or unreadable FAISS index ({reason}); {base.REBUILD_HINT}") from None
        if index.ntotal != count or index.d != dim:
            raise DataError(
                f"{file}: holds {index.ntotal} vectors of dim {index.d}, manifest says {count} x {dim}; "
                f"{base.REBUILD_HINT}"
            )
        return cls(index, kind, params)


def _apply_search_params(index: Any, kind: str, params: dict[str, Any]) -> None:
    # The manifest's parameters are the ones in force, whatever a faiss.index file carries.
    if kind == "ivf":
        index.nprobe = params["nprobe"]
    elif kind == "hnsw":
        index.hnsw.efSearch = params["ef_search"]
