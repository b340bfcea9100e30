"""backend: onnx (encoders/onnx_runtime.py): each kind's outputs through ONNX Runtime equal
sentence-transformers' (float32, torch) on the same weights; the export is cached by the model's
content, a wrong export is refused, training still runs in torch, and settings ONNX Runtime
cannot honour are refused before any model loads. Served over HTTP: tests/test_serve.py
(tiny-dense and tiny-cross run with backend onnx there)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from raytrieve.encoders import CrossEncoder, DenseEncoder, load_encoder, onnx_runtime
from raytrieve.errors import ConfigError, ModelLoadError
from raytrieve.modules import Transformer
from tests.conftest import SENTENCES

ATOL = 1e-5
PAIRS = [(q, d) for q in SENTENCES[:3] for d in SENTENCES[3:7]]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh export cache for the test (RAYTRIEVE_CACHE)."""
    monkeypatch.setenv("RAYTRIEVE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


def _transformer(encoder) -> Transformer:
    return next(m for m in encoder.stack.modules() if isinstance(m, Transformer))


def test_each_kind_equals_sentence_transformers(tiny_dirs, st, cache):
    """Texts of different lengths in one batch (padding) and one at a time, as a query comes."""
    dense = load_encoder("dense", str(tiny_dirs["base"]), backend="onnx")
    assert dense.backend == "onnx" and dense.dtype == "float32" and _transformer(dense).onnx_model is not None
    want = st.SentenceTransformer(str(tiny_dirs["base"]), device="cpu").encode(SENTENCES, batch_size=4)
    np.testing.assert_allclose(dense.encode(SENTENCES, batch_size=4), want, atol=ATOL)
    np.testing.assert_allclose(dense.encode(SENTENCES[2]), want[2], atol=ATOL)

    sparse = load_encoder("sparse", str(tiny_dirs["mlm"]), backend="onnx")
    theirs = st.SparseEncoder(str(tiny_dirs["mlm"]), device="cpu")
    got = sparse.encode(SENTENCES, convert_to_tensor=True).to_dense()
    ref = theirs.encode(SENTENCES, convert_to_tensor=True).to_dense()
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=1e-5)

    cross = load_encoder("cross", str(tiny_dirs["cls1"]), backend="onnx")
    want = st.CrossEncoder(str(tiny_dirs["cls1"]), device="cpu").predict(PAIRS)
    np.testing.assert_allclose(cross.predict(PAIRS), want, atol=ATOL)
    # One export per model, in this test's cache.
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 3


def test_export_is_cached_by_content_and_a_wrong_one_is_refused(tiny_dirs, cache, monkeypatch):
    first = DenseEncoder(str(tiny_dirs["base"]))
    first.set_backend("onnx")
    (folder,) = list(cache.iterdir())
    assert folder.name == onnx_runtime.cache_key(_transformer(first))
    stamp = (folder / onnx_runtime.FILE).stat().st_mtime_ns

    # Loaded again: the cached export is used (exporting again would fail here).
    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_runtime, "export", no_export)
    again = load_encoder("dense", str(tiny_dirs["base"]), backend="onnx")
    assert (folder / onnx_runtime.FILE).stat().st_mtime_ns == stamp
    np.testing.assert_allclose(again.encode(SENTENCES), first.encode(SENTENCES), atol=ATOL)
    monkeypatch.undo()
    monkeypatch.setenv("RAYTRIEVE_CACHE", str(cache.parent))

    # Other weights, another key; and an export that is not of this model is refused with the difference.
    changed = DenseEncoder(str(tiny_dirs["base"]))
    with torch.no_grad():
        _transformer(changed).auto_model.embeddings.word_embeddings.weight.mul_(3.0)
    key = onnx_runtime.cache_key(_transformer(changed))
    assert key != folder.name
    shutil.copytree(folder, cache / key)
    with pytest.raises(ModelLoadError, match="differs from torch float32 by .* use backend: torch"):
        changed.set_backend("onnx")
    assert changed.backend == "torch" and _transformer(changed).onnx_model is None
    shutil.rmtree(cache / key)
    changed.set_backend("onnx")  # exported afresh: its own weights
    np.testing.assert_allclose(changed.encode(SENTENCES[:3]), _torch_encode(changed, SENTENCES[:3]), atol=ATOL)


def _torch_encode(encoder, texts):
    """``encoder``'s own outputs with its transformers in torch (the reference for its export)."""
    module = _transformer(encoder)
    session, module.onnx_model = module.onnx_model, None
    try:
        return encoder.encode(texts)
    finally:
        module.onnx_model = session


def test_training_runs_in_torch_and_gradients_flow(tiny_dirs, cache):
    """ONNX Runtime is for inference only: a module in train mode computes in torch."""
    encoder = DenseEncoder(str(tiny_dirs["base"]))
    encoder.set_backend("onnx")
    assert _transformer(encoder).onnx_model is not None
    features = encoder.tokenize(SENTENCES[:4])
    encoder.train()
    out = encoder(dict(features))["sentence_embedding"]
    assert out.requires_grad
    out.sum().backward()
    assert _transformer(encoder).auto_model.embeddings.word_embeddings.weight.grad is not None
    encoder.eval()  # back to inference: ONNX Runtime again, equal to torch in eval mode (no dropout)
    with torch.no_grad():
        got = encoder(dict(features))["sentence_embedding"]
        encoder.set_backend("torch")
        torch.testing.assert_close(got, encoder(dict(features))["sentence_embedding"], atol=ATOL, rtol=1e-5)
    assert _transformer(encoder).onnx_model is None and encoder.backend == "torch"


def test_what_onnx_cannot_do_is_refused_before_loading(tiny_dirs, cache):
    from raytrieve.config import from_dict
    from raytrieve.serve.config import ServeConfig

    with pytest.raises(ConfigError, match="onnx computes in float32; set dtype: float32"):
        load_encoder("dense", "/nonexistent/folder", backend="onnx", dtype="bfloat16")
    with pytest.raises(ConfigError, match=r"unknown backend 'tensorrt'; choose from \['torch', 'onnx'\]"):
        load_encoder("dense", "/nonexistent/folder", backend="tensorrt")
    with pytest.raises(ConfigError, match="onnx runs on CPU"):
        load_encoder("dense", "/nonexistent/folder", backend="onnx", device="cuda")
    with pytest.raises(ConfigError, match=r"dense\[1\]\.backend: onnx computes in float32"):
        from_dict(ServeConfig, {"dense": [{"model": "a"}, {"model": "b", "backend": "onnx", "dtype": "int8"}]})
    with pytest.raises(ConfigError, match=r"reranker\.backend: onnx runs on CPU"):
        from_dict(ServeConfig, {"reranker": {"model": "a", "backend": "onnx", "num_gpus": 1}})
    # dtype auto under onnx is float32 (no guard to run: the export is checked against float32).
    model = CrossEncoder(str(tiny_dirs["cls1"]))
    model.set_backend("onnx")
    assert model.set_dtype("auto") == "float32" and "onnx" in model.dtype_reason
    with pytest.raises(ConfigError, match="onnx computes in float32"):
        model.set_dtype("int8")
