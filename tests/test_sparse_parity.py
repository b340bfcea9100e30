"""SparseEncoder against sentence-transformers' SparseEncoder on identical weights (<= 1e-5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raytrieve import SparseEncoder
from raytrieve.modules import MLMTransformer, Router, SparseStaticEmbedding, SpladePooling
from tests.conftest import SENTENCES

ATOL = 1e-5


@pytest.fixture(scope="module")
def ours_splade(splade_dir):
    return SparseEncoder(splade_dir, device="cpu")


@pytest.fixture(scope="module")
def st_splade(st, splade_dir):
    return st.SparseEncoder(str(splade_dir), device="cpu")


def test_shipped_splade_matches(ours_splade, st_splade):
    ours = ours_splade.encode(SENTENCES, batch_size=4)
    ref = st_splade.encode(SENTENCES, batch_size=4)
    assert ours.is_sparse and ours.shape == ref.shape == (len(SENTENCES), 30522)
    torch.testing.assert_close(ours.to_dense(), ref.to_dense(), atol=ATOL, rtol=0)


def test_texts_by_either_keyword_as_sentence_transformers(ours_splade, st_splade):
    """`inputs=` (sentence-transformers 6's name) or `sentences=` (5's), also for encode_query
    and encode_document; both at once is refused."""
    from raytrieve.errors import InputError

    for method in ("encode", "encode_query", "encode_document"):
        want = getattr(st_splade, method)(inputs=SENTENCES[:3]).to_dense()
        for kw in ("inputs", "sentences"):
            got = getattr(ours_splade, method)(**{kw: SENTENCES[:3]}).to_dense()
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        with pytest.raises(InputError, match=f"{method}: got both sentences and inputs"):
            getattr(ours_splade, method)(SENTENCES[:3], inputs=SENTENCES[:3])


def test_raw_masked_lm_folder_gives_the_same_model(st, splade_dir):
    # The package's plain transformers folder, read without modules.json by both libraries.
    from raytrieve import assets

    raw = assets.package_dir(assets.get_variant("splade-tiny").source)
    ours = SparseEncoder(raw, device="cpu").encode(SENTENCES[:6], convert_to_sparse_tensor=False)
    ref = st.SparseEncoder(str(raw), device="cpu").encode(SENTENCES[:6], convert_to_sparse_tensor=False)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("k", [1, 8, 64])
def test_max_active_dims_matches(ours_splade, st_splade, k):
    ours = ours_splade.encode(SENTENCES, max_active_dims=k).to_dense()
    ref = st_splade.encode(SENTENCES, max_active_dims=k).to_dense()
    assert int((ours != 0).sum(dim=1).max()) <= k
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_decode_sparsity_and_similarity(ours_splade, st_splade):
    ours = ours_splade.encode(SENTENCES[:4])
    ref = st_splade.encode(SENTENCES[:4])
    got, want = ours_splade.decode(ours, top_k=10), st_splade.decode(ref, top_k=10)
    for g, w in zip(got, want):
        assert [t for t, _ in g] == [t for t, _ in w]
        np.testing.assert_allclose([v for _, v in g], [v for _, v in w], atol=ATOL)
    stats = ours_splade.sparsity(ours)
    assert stats["active_dims"] == pytest.approx(st_splade.sparsity(ref)["active_dims"])
    assert 0.99 < stats["sparsity_ratio"] < 1.0
    torch.testing.assert_close(ours_splade.similarity(ours, ours), st_splade.similarity(ref, ref), atol=1e-4, rtol=1e-6)


def test_as_dicts_are_sorted_nonzeros(ours_splade):
    dense = ours_splade.encode(SENTENCES[:3], convert_to_sparse_tensor=False)
    rows = ours_splade.encode(SENTENCES[:3], as_dicts=True)
    for row, vec in zip(rows, dense):
        assert np.all(np.diff(row["values"]) <= 0)
        np.testing.assert_allclose(vec[row["indices"]].numpy(), row["values"], atol=0)
        assert len(row["indices"]) == int((vec != 0).sum())


def test_router_asymmetric_model_both_directions(st, tiny_dirs, tmp_path):
    torch.manual_seed(0)
    mlm = MLMTransformer.from_pretrained(tiny_dirs["mlm"], max_seq_length=32)
    static = SparseStaticEmbedding(mlm.tokenizer, weight=torch.rand(30522))
    ours = SparseEncoder([Router.for_query_document([static], [mlm, SpladePooling("max")])], device="cpu")
    assert mlm.decoder_deferred  # the document route projects real tokens only (test_mlm_head.py)
    ours.save(tmp_path / "router")
    ref = st.SparseEncoder(str(tmp_path / "router"), device="cpu")
    for fn in ("encode_query", "encode_document"):
        a = getattr(ours, fn)(SENTENCES, convert_to_sparse_tensor=False)
        b = getattr(ref, fn)(SENTENCES, convert_to_sparse_tensor=False)
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=fn)
    # Query and document routes really differ.
    assert not torch.allclose(
        ours.encode_query(SENTENCES[:2], convert_to_sparse_tensor=False),
        ours.encode_document(SENTENCES[:2], convert_to_sparse_tensor=False),
    )
    # sentence-transformers save -> raytrieve load.
    ref.save(str(tmp_path / "router_st"))
    back = SparseEncoder(tmp_path / "router_st", device="cpu")
    torch.testing.assert_close(
        back.encode_query(SENTENCES, convert_to_sparse_tensor=False),
        ref.encode_query(SENTENCES, convert_to_sparse_tensor=False),
        atol=ATOL,
        rtol=0,
    )


def test_sentence_transformers_sparse_save_loads(st, tiny_dirs, tmp_path):
    ref = st.SparseEncoder(str(tiny_dirs["mlm"]), device="cpu")
    ref.save(str(tmp_path / "st"))
    ours = SparseEncoder(tmp_path / "st", device="cpu")
    assert [type(m).__name__ for m in ours.stack] == ["MLMTransformer", "SpladePooling"]
    torch.testing.assert_close(
        ours.encode(SENTENCES, convert_to_sparse_tensor=False),
        ref.encode(SENTENCES, convert_to_sparse_tensor=False),
        atol=ATOL,
        rtol=0,
    )


def test_a_served_prompt_named_passage_takes_the_document_route(tiny_dirs, tmp_path):
    """TEI's `prompt_name` on a Router model: "passage" (or "corpus") is a document prompt, so the
    replica runs the document route with it, as encode_document(prompt_name="passage") does. With
    sentence-transformers 6's default (empty) "document" prompt beside a saved "passage", the
    route had been found by the prompt encode_document picks, which is no longer "passage".
    No Ray: ModelRunner is what a replica runs."""
    from raytrieve.serve.config import DeploymentConfig
    from raytrieve.serve.deployments import ModelRunner

    torch.manual_seed(0)
    mlm = MLMTransformer.from_pretrained(tiny_dirs["mlm"], max_seq_length=32)
    static = SparseStaticEmbedding(mlm.tokenizer, weight=torch.rand(30522))
    # No default route: a request whose route is not found fails instead of passing by the default.
    model = SparseEncoder([Router.for_query_document([static], [mlm, SpladePooling("max")], default_route=None)],
                          device="cpu", prompts={"passage": "passage: "})
    model.save(tmp_path / "router")
    runner = ModelRunner("sparse", DeploymentConfig(model=str(tmp_path / "router"), dtype="float32", torch_threads=1))

    def served(prompt_name):  # the replica's (indices, values) rows as dense vectors
        out = torch.zeros(3, 30522)
        for r, (indices, values) in enumerate(runner._compute(SENTENCES[:3], None, prompt_name)[0]):
            out[r, torch.as_tensor(np.asarray(indices))] = torch.as_tensor(np.asarray(values, dtype=np.float32))
        return out

    for name in ("passage", "document"):
        want = model.encode_document(SENTENCES[:3], prompt_name=name, convert_to_sparse_tensor=False)
        torch.testing.assert_close(served(name), want, atol=ATOL, rtol=0, msg=name)
    want = model.encode_query(SENTENCES[:3], convert_to_sparse_tensor=False)
    torch.testing.assert_close(served("query"), want, atol=ATOL, rtol=0)
    assert not torch.allclose(served("passage"), served("document"))  # the prompt is put before the text
