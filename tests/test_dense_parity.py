"""DenseEncoder against sentence-transformers on identical weights and inputs (<= 1e-5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raytrieve import DenseEncoder
from raytrieve.modules import Dense, Normalize, Pooling, Transformer
from tests.conftest import SENTENCES

ATOL = 1e-5


@pytest.fixture(scope="module")
def ours_minilm(minilm_dir):
    return DenseEncoder(minilm_dir, device="cpu")


@pytest.fixture(scope="module")
def st_minilm(st, minilm_dir):
    return st.SentenceTransformer(str(minilm_dir), device="cpu")


def test_shipped_minilm_matches(ours_minilm, st_minilm):
    ours = ours_minilm.encode(SENTENCES, batch_size=4)
    ref = st_minilm.encode(SENTENCES, batch_size=4)
    assert ours.shape == ref.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(ours, ref, atol=ATOL)
    # The model ends in Normalize: unit vectors.
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_batch_size_and_order_do_not_change_results(ours_minilm):
    a = ours_minilm.encode(SENTENCES, batch_size=1)
    b = ours_minilm.encode(SENTENCES[::-1], batch_size=64)[::-1]
    np.testing.assert_allclose(a, b, atol=ATOL)
    single = ours_minilm.encode(SENTENCES[3])
    assert single.shape == (384,)
    np.testing.assert_allclose(single, a[3], atol=ATOL)


@pytest.mark.parametrize("truncate_dim", [32, 128])
def test_truncate_dim_then_normalize_matches(ours_minilm, st_minilm, truncate_dim):
    ours = ours_minilm.encode(SENTENCES, truncate_dim=truncate_dim, normalize_embeddings=True)
    ref = st_minilm.encode(SENTENCES, truncate_dim=truncate_dim, normalize_embeddings=True)
    assert ours.shape == (len(SENTENCES), truncate_dim)
    np.testing.assert_allclose(ours, ref, atol=ATOL)


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_precisions_match(ours_minilm, st_minilm, precision):
    ours = ours_minilm.encode(SENTENCES, precision=precision)
    ref = st_minilm.encode(SENTENCES, precision=precision)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    # Identical formula; a float difference of 1e-7 may tip a value over a bucket edge.
    diff = np.abs(ours.astype(np.int32) - ref.astype(np.int32))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_tensor_output_and_similarity(ours_minilm, st_minilm):
    q = ours_minilm.encode(SENTENCES[:4], convert_to_tensor=True)
    d = ours_minilm.encode(SENTENCES[4:9], convert_to_tensor=True)
    assert isinstance(q, torch.Tensor)
    ref = st_minilm.similarity(st_minilm.encode(SENTENCES[:4]), st_minilm.encode(SENTENCES[4:9]))
    torch.testing.assert_close(ours_minilm.similarity(q, d), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours_minilm.similarity_pairwise(q, d[:4]), torch.diagonal(ref[:, :4]), atol=ATOL, rtol=0)


def test_prompts_named_default_and_custom(st, minilm_dir):
    prompts = {"query": "query: ", "document": "passage: "}
    ours = DenseEncoder(minilm_dir, prompts=prompts, device="cpu")
    ref = st.SentenceTransformer(str(minilm_dir), prompts=prompts, device="cpu")
    np.testing.assert_allclose(ours.encode_query(SENTENCES), ref.encode_query(SENTENCES), atol=ATOL)
    np.testing.assert_allclose(ours.encode_document(SENTENCES), ref.encode_document(SENTENCES), atol=ATOL)
    np.testing.assert_allclose(
        ours.encode(SENTENCES, prompt="Represent this: "), ref.encode(SENTENCES, prompt="Represent this: "), atol=ATOL
    )
    # A prompt changes the embedding.
    assert not np.allclose(ours.encode_query(SENTENCES[:2]), ours.encode(SENTENCES[:2]), atol=1e-3)


def test_default_prompts_are_sentence_transformers(st, minilm_dir, splade_dir, tmp_path):
    """sentence-transformers 6 gives every bi-encoder empty "query" and "document" prompts: the
    shipped MiniLM (whose folder saves none) takes prompt_name="query", and encode_document uses
    "document" before a saved "passage". Given prompts win, saved ones fill the rest; saved and
    loaded again, both libraries read the same prompts."""
    from raytrieve import SparseEncoder

    cases = [({}, None), ({"query": "query: "}, None), ({"passage": "passage: "}, None),
             ({"document": "doc: ", "corpus": "c: "}, {"query": "q: ", "document": "d: "})]
    for given, saved in cases:
        folder = minilm_dir
        if saved is not None:  # a folder that saves prompts of its own
            folder = tmp_path / f"saved-{len(saved)}"
            if not folder.exists():
                DenseEncoder(minilm_dir, prompts=saved, device="cpu").save(folder)
        ours = DenseEncoder(folder, prompts=given or None, device="cpu")
        ref = st.SentenceTransformer(str(folder), prompts=given or None, device="cpu")
        assert ours.prompts == ref.prompts, (given, saved)
        assert ours.default_prompt_name == ref.default_prompt_name
        np.testing.assert_allclose(ours.encode(SENTENCES[:3], prompt_name="query"),
                                   ref.encode(SENTENCES[:3], prompt_name="query"), atol=ATOL)
        np.testing.assert_allclose(ours.encode_document(SENTENCES[:3]), ref.encode_document(SENTENCES[:3]), atol=ATOL)
    ours.save(tmp_path / "again")
    assert DenseEncoder(tmp_path / "again", device="cpu").prompts == st.SentenceTransformer(
        str(tmp_path / "again"), device="cpu").prompts == {"query": "q: ", "document": "doc: ", "corpus": "c: "}
    sparse, ref = SparseEncoder(splade_dir, device="cpu"), st.SparseEncoder(str(splade_dir), device="cpu")
    assert sparse.prompts == ref.prompts == {"query": "", "document": ""}
    # An empty prompt is resolved as "" (passing None on to encode would apply a
    # default_prompt_name); the encoding job's manifest and mining's check record it as None, as
    # for a model made before these defaults, so earlier outputs still match.
    from raytrieve.encoders.base import recorded_prompt

    for name in ("query", "document"):
        assert sparse.resolve_prompt(None, sparse.prompt_name_for(name)) == ""
        assert recorded_prompt(sparse.resolve_prompt(None, sparse.prompt_name_for(name))) is None
    # With a default_prompt_name, the empty document prompt stays empty: it is not resolved again.
    prompted = DenseEncoder(minilm_dir, prompts={"query": "query: "}, default_prompt_name="query", device="cpu")
    ref = st.SentenceTransformer(str(minilm_dir), prompts={"query": "query: "}, default_prompt_name="query", device="cpu")
    document = prompted.resolve_prompt(None, prompted.prompt_name_for("document"))
    assert document == "" and recorded_prompt(document) is None
    np.testing.assert_allclose(prompted.encode(SENTENCES[:3], prompt=document),
                               ref.encode_document(SENTENCES[:3]), atol=ATOL)
    np.testing.assert_allclose(prompted.encode_document(SENTENCES[:3]), ref.encode_document(SENTENCES[:3]), atol=ATOL)


def test_texts_by_either_keyword_as_sentence_transformers(ours_minilm, st_minilm):
    """`inputs=` (sentence-transformers 6's name) or `sentences=` (5's) for encode, encode_query
    and encode_document."""
    for method in ("encode", "encode_query", "encode_document"):
        want = getattr(st_minilm, method)(inputs=SENTENCES[:3])
        for kw in ("inputs", "sentences"):
            np.testing.assert_allclose(getattr(ours_minilm, method)(**{kw: SENTENCES[:3]}), want, atol=ATOL)


def test_token_embeddings_match(ours_minilm, st_minilm):
    ours = ours_minilm.encode(SENTENCES[:5], output_value="token_embeddings")
    ref = st_minilm.encode(SENTENCES[:5], output_value="token_embeddings")
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def _tiny_dense(tiny_dirs, pooling_mode, include_prompt=True, dense=False, normalize=False):
    transformer = Transformer.from_pretrained(tiny_dirs["base"], max_seq_length=48)
    modules = [transformer, Pooling(32, pooling_mode, include_prompt=include_prompt)]
    if dense:
        torch.manual_seed(1)
        width = 32 * (1 if isinstance(pooling_mode, str) else len(pooling_mode))
        modules.append(Dense(width, 16))
    if normalize:
        modules.append(Normalize())
    return DenseEncoder(modules, device="cpu", prompts={"query": "query: "})


@pytest.mark.parametrize(
    "pooling_mode",
    ["cls", "mean", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken", ("cls", "mean", "max")],
)
@pytest.mark.parametrize("include_prompt", [True, False])
def test_every_pooling_mode_round_trips_to_sentence_transformers(st, tiny_dirs, tmp_path, pooling_mode, include_prompt):
    ours = _tiny_dense(tiny_dirs, pooling_mode, include_prompt=include_prompt, dense=True, normalize=True)
    ours.save(tmp_path / "m")
    ref = st.SentenceTransformer(str(tmp_path / "m"), device="cpu")
    for kwargs in ({}, {"prompt_name": "query"}):
        np.testing.assert_allclose(
            ours.encode(SENTENCES, **kwargs), ref.encode(SENTENCES, **kwargs), atol=ATOL, err_msg=str(kwargs)
        )


def test_sentence_transformers_save_loads_in_raytrieve(st, tiny_dirs, tmp_path):
    from sentence_transformers.base.modules import Dense as STDense
    from sentence_transformers.base.modules import Normalize as STNormalize
    from sentence_transformers.base.modules import Transformer as STTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling as STPooling

    torch.manual_seed(3)
    ref = st.SentenceTransformer(
        modules=[
            STTransformer(str(tiny_dirs["base"]), max_seq_length=40),
            STPooling(32, "weightedmean", include_prompt=False),
            STDense(32, 24),
            STNormalize(),
        ],
        prompts={"query": "search_query: "},
        similarity_fn_name="dot",
        device="cpu",
    )
    ref.save(str(tmp_path / "st"))
    ours = DenseEncoder(tmp_path / "st", device="cpu")
    assert ours.max_seq_length == 40 and ours.similarity_fn_name == "dot"
    assert ours.prompts["query"] == "search_query: "
    np.testing.assert_allclose(ours.encode_query(SENTENCES), ref.encode_query(SENTENCES), atol=ATOL)
    np.testing.assert_allclose(ours.encode(SENTENCES), ref.encode(SENTENCES), atol=ATOL)


def test_raytrieve_round_trip_keeps_config(tiny_dirs, tmp_path):
    ours = _tiny_dense(tiny_dirs, "mean", dense=True)
    ours.default_prompt_name = "query"
    ours.save(tmp_path / "a")
    again = DenseEncoder(tmp_path / "a", device="cpu")
    assert again.default_prompt_name == "query" and again.prompts == ours.prompts
    assert [type(m).__name__ for m in again.stack] == ["Transformer", "Pooling", "Dense"]
    np.testing.assert_allclose(again.encode(SENTENCES), ours.encode(SENTENCES), atol=0)
    # Saving over an existing model replaces it whole; no temporary folders are left behind.
    again.save(tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
