"""Inference precision (raytrieve.encoders.precision): the quality guards on the shipped real
models and real retrieval data (docstrings of installed packages), against float32 on the same
inputs; float32 stays exact; auto refuses a format that fails its guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raytrieve import CrossEncoder, DenseEncoder, SparseEncoder
from raytrieve.encoders import precision
from raytrieve.errors import InputError, ModelLoadError
from tests.conftest import SENTENCES

HALF = "bfloat16"


@pytest.fixture(scope="module")
def pairs():
    """Real (query, document) pairs: docstring summaries and the docstrings' bodies."""
    from raytrieve.data.pydocs import deduplicate, package_pairs

    found = deduplicate(package_pairs("requests") + package_pairs("packaging") + package_pairs("fsspec"))
    assert len(found) >= 160, len(found)
    return found[:160]


def _top(q: np.ndarray, d: np.ndarray, k: int = 10) -> np.ndarray:
    return np.argsort(-(q @ d.T), axis=1, kind="stable")[:, :k]


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)]))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


@pytest.mark.slow
def test_dense_bfloat16_keeps_every_embedding_and_the_top_10(minilm_dir, pairs):
    queries, docs = [p.query for p in pairs], [p.document for p in pairs]
    model = DenseEncoder(minilm_dir)
    # Half the shipped 256 tokens: emulated bfloat16 (a CPU without it) is ~10x slower than float32.
    model.max_seq_length = 128
    ref_q, ref_d = model.encode(queries), model.encode(docs)
    assert model.set_dtype(HALF) == HALF
    half_q, half_d = model.encode(queries), model.encode(docs)
    assert half_d.dtype == np.float32
    assert _cosines(ref_d, half_d).min() >= 0.999 and _cosines(ref_q, half_q).min() >= 0.999
    assert _overlap(_top(ref_q, ref_d), _top(half_q, half_d)) >= 0.98
    # The guard's probe texts agree with the real data.
    assert precision.guard(model, HALF).passed


@pytest.mark.slow
def test_sparse_bfloat16_keeps_top_terms_and_dot_product_order(splade_dir, pairs):
    queries, docs = [p.query for p in pairs[:60]], [p.document for p in pairs[:60]]
    model = SparseEncoder(splade_dir)
    model.max_seq_length = 128

    def encode(side, texts):
        return getattr(model, f"encode_{side}")(texts, convert_to_sparse_tensor=False).numpy()

    ref_q, ref_d = encode("query", queries), encode("document", docs)
    model.set_dtype(HALF)
    half_q, half_d = encode("query", queries), encode("document", docs)
    # Each text's 5 heaviest terms stay among its 10 heaviest (near-ties may swap places).
    for ref, half in ((ref_q, half_q), (ref_d, half_d)):
        for r, h in zip(ref, half):
            assert set(np.argsort(-h)[:5]) <= set(np.argsort(-r)[:10])
    assert precision.spearman((ref_q @ ref_d.T).ravel(), (half_q @ half_d.T).ravel()) >= 0.99
    assert _overlap(_top(ref_q, ref_d), _top(half_q, half_d)) >= 0.95


@pytest.mark.slow
def test_cross_encoder_bfloat16_keeps_the_ranking(minilm_dir, reranker_dir, pairs):
    """Rerank candidates as the pipeline makes them: each query's dense top 10."""
    queries, docs = [p.query for p in pairs[:6]], [p.document for p in pairs[:120]]
    dense = DenseEncoder(minilm_dir)
    top = _top(dense.encode(queries), dense.encode(docs))
    candidates = [(q, docs[j]) for q, row in zip(queries, top) for j in row]
    model = CrossEncoder(reranker_dir)
    model.max_seq_length = 128  # the order of size the serving tests and demo use; keeps the test short
    ref, ref_head = model.predict(candidates), model.predict(candidates[:20])
    model.set_dtype(HALF)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert len(head._forward_hooks) == 1  # the scores' layer recomputes in float32
    half = model.predict(candidates)
    assert half.dtype == np.float32
    assert precision.spearman(ref, half) >= 0.99
    # The head's float32 output is what keeps close candidates apart: back in float32, exact again.
    model.set_dtype("float32")
    assert not head._forward_hooks
    np.testing.assert_array_equal(model.predict(candidates[:20]), ref_head)


def test_float32_is_exact_after_any_round_trip(tiny_dirs):
    dense = DenseEncoder(tiny_dirs["base"])
    before = dense.encode(SENTENCES)
    dense.set_dtype(HALF)
    changed = dense.encode(SENTENCES)
    assert not np.array_equal(changed, before)  # bfloat16 really ran
    dense.set_dtype("float32")
    np.testing.assert_array_equal(dense.encode(SENTENCES), before)
    np.testing.assert_array_equal(DenseEncoder(tiny_dirs["base"], dtype="float32").encode(SENTENCES), before)


def _fragile_model(tiny_dir) -> DenseEncoder:
    """A model that keeps its signal as a small offset on a large value: y = x + 1000, then
    y - 1000. float32 holds it exactly; bfloat16 rounds 1000 + x to multiples of 4 and loses x."""
    from raytrieve.modules import Dense

    base = DenseEncoder(tiny_dir)
    dim = base.get_embedding_dimension()
    assert dim is not None
    up, down = (Dense(dim, dim, bias=True, activation_function=torch.nn.Identity()) for _ in range(2))
    with torch.no_grad():
        for layer, shift in ((up, 1000.0), (down, -1000.0)):
            layer.linear.weight.copy_(torch.eye(dim))
            layer.linear.bias.fill_(shift)
    return DenseEncoder([*base.modules_list, up, down])


def test_auto_refuses_a_format_that_fails_the_guard(tiny_dirs, monkeypatch):
    # auto tries bfloat16 as on a CPU that has it, whatever this one has.
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    model = _fragile_model(tiny_dirs["base"])
    ref = model.encode(SENTENCES)
    # The guard is right about this model: in bfloat16 its embeddings are something else.
    model.set_dtype(HALF)
    assert _cosines(ref, model.encode(SENTENCES)).min() < 0.9
    model.set_dtype("float32")
    result = precision.guard(model, HALF)
    assert not result.passed and result.value < precision.DENSE_MIN_COSINE
    # auto tries bfloat16, and the guard turns it down.
    assert model.set_dtype("auto") == "float32"
    assert "bfloat16 fails its guard" in model.dtype_reason
    np.testing.assert_array_equal(model.encode(SENTENCES), ref)


def test_auto_picks_bfloat16_on_a_cpu_that_has_it(minilm_dir):
    # The oracle is torch's own CPU probe (cpuinfo, through CPUID), not the /proc/cpuinfo flags
    # the code reads: the two must agree on whether bfloat16 matmuls run in hardware.
    fast = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert precision.cpu_has_fast_bf16() == fast
    model = DenseEncoder(minilm_dir, dtype="auto")
    assert model.dtype == ("bfloat16" if fast else "float32"), model.dtype_reason
    if fast:
        assert "passes its guard" in model.dtype_reason


@pytest.mark.slow
def test_int8_quantises_every_linear_and_its_guard_matches_real_data(minilm_dir, pairs, tmp_path):
    docs = [p.document for p in pairs[:120]]
    model = DenseEncoder(minilm_dir)
    ref = model.encode(docs)
    verdict = precision.guard(model, "int8")  # tried on a copy: the model stays float32
    assert model.dtype == "float32" and not any(
        "quantized" in type(m).__module__ for m in model.modules()
    )
    model.set_dtype("int8")
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert not linears, "every nn.Linear is replaced by its dynamic int8 version"
    cos = _cosines(ref, model.encode(docs))
    assert cos.min() > 0.9  # int8 really computes the model, roughly
    assert verdict.passed == bool(cos.min() >= precision.DENSE_MIN_COSINE), (verdict, cos.min())
    with pytest.raises(ModelLoadError, match="int8"):
        model.save(tmp_path / "m")
    with pytest.raises(InputError, match="load it again"):
        model.set_dtype("float32")


def test_bad_dtypes_name_the_choices():
    with pytest.raises(InputError, match=r"'fp8' is not one of \['auto', 'float32'"):
        precision.check_dtype("fp8", torch.device("cpu"))
    with pytest.raises(InputError, match="int8 .* runs on CPU only; on cuda use bfloat16 or float16"):
        precision.check_dtype("int8", torch.device("cuda"))


def test_spearman_matches_scipy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a = rng.normal(size=200)
    b = a + rng.normal(scale=0.5, size=200)
    b[:20] = b[0]  # ties
    assert precision.spearman(a, b) == pytest.approx(spearmanr(a, b)[0], abs=1e-12)


@pytest.mark.slow
def test_bf16_training_loss_matches_float32_and_goes_down(minilm_dir, pairs):
    """What ``training.bf16`` does on a CPU that has bf16 (and on a GPU): the step's forward and
    loss under autocast, float32 weights and optimizer. A fixed batch of real pairs, MNRL."""
    from raytrieve.losses import MultipleNegativesRankingLoss

    model = DenseEncoder(minilm_dir)
    model.max_seq_length = 64  # emulated bfloat16 (a CPU without it) is ~20x slower than float32
    model.eval()  # no dropout: the two formats see the same network
    loss_fn = MultipleNegativesRankingLoss(model)
    batch = pairs[:8]
    features = [model.tokenize([p.query for p in batch]), model.tokenize([p.document for p in batch])]

    def loss(bf16: bool) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return loss_fn(features, None)

    with torch.no_grad():
        start32, start16 = loss(False).item(), loss(True).item()
    assert abs(start16 - start32) <= 1e-2, (start16, start32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    for _ in range(3):
        optimizer.zero_grad()
        value = loss(True)
        assert value.dtype == torch.float32  # the loss itself is float32
        value.backward()
        optimizer.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32
    with torch.no_grad():
        assert loss(False).item() < start32 - 1e-3
