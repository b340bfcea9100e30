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

from raytrieve.encoders import CrossEncoder, DenseEncoder, SparseEncoder, load_encoder, onnx_runtime
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
    # The export holds the decoder's input (SPLADE projects real tokens in torch: test_mlm_head.py);
    # the same modules in a new stack keep reading it as that.
    mlm = _transformer(sparse)
    assert mlm.decoder_deferred and mlm.output_name == "mlm_hidden_states"
    again = SparseEncoder(sparse.modules_list, device="cpu")
    assert again.backend == "onnx" and mlm.decoder_deferred
    torch.testing.assert_close(again.encode(SENTENCES, convert_to_tensor=True).to_dense(), ref, atol=ATOL, rtol=1e-5)

    cross = load_encoder("cross", str(tiny_dirs["cls1"]), backend="onnx")
    want = st.CrossEncoder(str(tiny_dirs["cls1"]), device="cpu").predict(PAIRS)
    np.testing.assert_allclose(cross.predict(PAIRS), want, atol=ATOL)
    # One export per model, in this test's cache.
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 3


def test_export_is_cached_by_content_and_a_wrong_one_is_refused(tiny_dirs, cache, tmp_path, monkeypatch):
    import logging

    first = DenseEncoder(str(tiny_dirs["base"]))
    # The exporter's registry logged a warning per torchvision operator (not a dependency) in
    # every process that exports: a dozen lines in a replica's log or the console.
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    registry.addHandler(handler)
    level = registry.level
    try:
        first.set_backend("onnx")
    finally:
        registry.removeHandler(handler)
    assert not [r.getMessage() for r in seen if "torchvision" in r.getMessage()]
    assert registry.level == level  # quiet during the export only
    (folder,) = list(cache.iterdir())
    assert folder.name == onnx_runtime.cache_key(_transformer(first))
    stamp = (folder / onnx_runtime.FILE).stat().st_mtime_ns

    # Loaded again, and the same weights from another folder: the cached export is used
    # (exporting again would fail here).
    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    moved = tmp_path / "moved"
    shutil.copytree(tiny_dirs["base"], moved)
    with monkeypatch.context() as m:
        m.setattr(onnx_runtime, "export", no_export)
        for path in (tiny_dirs["base"], moved):
            again = _counted(load_encoder("dense", str(path), backend="onnx"))
            np.testing.assert_allclose(again.encode(SENTENCES), first.encode(SENTENCES), atol=ATOL)
            assert _transformer(again).onnx_model.calls > 0  # ONNX Runtime ran the encode
    assert (folder / onnx_runtime.FILE).stat().st_mtime_ns == stamp and len(list(cache.iterdir())) == 1

    # Other weights, another key. A stale export found under it (another model's) is exported
    # afresh; an exporter whose output disagrees with torch is refused, naming the difference.
    changed = DenseEncoder(str(tiny_dirs["base"]))
    with torch.no_grad():
        _transformer(changed).auto_model.embeddings.word_embeddings.weight.mul_(3.0)
    key = onnx_runtime.cache_key(_transformer(changed))
    assert key != folder.name
    shutil.copytree(folder, cache / key)
    changed.set_backend("onnx")
    assert (cache / key / onnx_runtime.FILE).stat().st_mtime_ns != stamp  # replaced by its own export
    np.testing.assert_allclose(changed.encode(SENTENCES[:3]), _torch_encode(changed, SENTENCES[:3]), atol=ATOL)

    other = DenseEncoder(str(tiny_dirs["base"]))
    with torch.no_grad():
        _transformer(other).auto_model.embeddings.word_embeddings.weight.mul_(2.0)
    monkeypatch.setattr(onnx_runtime, "export", lambda module, target: shutil.copytree(folder, target))
    with pytest.raises(ModelLoadError, match="differs from torch float32 by .* use backend: torch"):
        other.set_backend("onnx")
    assert other.backend == "torch" and _transformer(other).onnx_model is None


class _Counting:
    """An ONNX Runtime model that counts its calls (proves an encode went through it)."""

    def __init__(self, model) -> None:
        self.model, self.calls = model, 0

    def current(self, module) -> bool:
        return self.model.current(module)

    def __call__(self, inputs):
        self.calls += 1
        return self.model(inputs)


def _counted(encoder):
    for module in encoder.stack.modules():
        if isinstance(module, Transformer) and module.onnx_model is not None:
            module.onnx_model = _Counting(module.onnx_model)
    return encoder


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
    _counted(encoder)
    with torch.no_grad():
        got = encoder(dict(features))["sentence_embedding"]
    assert _transformer(encoder).onnx_model.calls == 1
    reference = _torch_encode(encoder, SENTENCES[:4])
    np.testing.assert_allclose(got.numpy(), reference, atol=ATOL)

    # An optimizer step changes the weights in place: the export is stale, so torch computes.
    torch.optim.SGD(encoder.parameters(), lr=1.0).step()
    after = encoder.encode(SENTENCES[:4])
    assert encoder.backend == "torch" and not np.allclose(after, reference, atol=1e-3)
    np.testing.assert_allclose(after, _torch_encode(encoder, SENTENCES[:4]), atol=ATOL)
    encoder.set_backend("onnx")  # exported again, from the trained weights
    np.testing.assert_allclose(encoder.encode(SENTENCES[:4]), after, atol=ATOL)
    encoder.set_backend("torch")
    assert _transformer(encoder).onnx_model is None and encoder.backend == "torch"
    assert "onnx" not in encoder.dtype_reason


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
    half = CrossEncoder(str(tiny_dirs["cls1"]))
    half.set_dtype("bfloat16")  # autocast over float32 weights: onnx takes it back to float32
    half.set_backend("onnx")
    assert (half.dtype, half.backend) == ("float32", "onnx")
    quantised = CrossEncoder(str(tiny_dirs["cls1"]))
    quantised.set_dtype("int8")
    with pytest.raises(ConfigError, match="quantised in place: load it again"):
        quantised.set_backend("onnx")
