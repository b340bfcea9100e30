"""An index folder as `raytrieve index build` writes it (the dense index, the encoding job's
manifest as source.json and, given texts, documents/), built from given vectors without the
encoding job."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_dense_index(folder: Path, ids: list[str], vectors: np.ndarray, corpus: dict, model: str,
                      model_path: Path, max_seq_length: int = 128, truncate_dim: int | None = None,
                      texts: list[str] | None = None) -> Path:
    """``corpus``: the manifest's corpus entry (path, format, id_column, text_column...);
    ``truncate_dim``: the documents were encoded with dense.truncate_dim (``vectors`` already cut);
    ``texts``: each id's text, for documents/ (what Serve returns)."""
    from raytrieve import _io
    from raytrieve.assets import content_fingerprint
    from raytrieve.index import DenseIndex
    from raytrieve.index.documents import write_documents

    DenseIndex.build(ids, vectors, similarity="cosine").save(folder / "dense")
    if texts is not None:
        write_documents(folder, ids, texts)
    dense = {"model": model, "model_path": str(model_path), "prompt": None, "max_seq_length": max_seq_length,
             "similarity": "cosine", "dim": int(vectors.shape[1]), "precision": "float32", "truncate_dim": truncate_dim,
             "normalize": True, "ranges": None,
             # As the job records its model's files; a made-up path: a manifest from before it did.
             "weights": content_fingerprint(model_path) if model_path.is_dir() else None}
    manifest = {"format": "raytrieve-vectors", "version": 2, "fingerprint": "test",
                "corpus": {"input_rows": len(ids), "bad_rows": 0, **corpus}, "rows": len(ids), "side": "document",
                "dense": dense, "shards": []}
    _io.write_json(folder / "source.json", manifest)
    return folder
