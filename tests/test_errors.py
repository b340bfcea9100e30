"""Bad input gets a clear error naming the thing and the fix; empty input gives empty output."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from raytrieve import CrossEncoder, DenseEncoder, SparseEncoder
from raytrieve.errors import (
    DimensionMismatchError,
    InputError,
    ModelLoadError,
    RaytrieveError,
    UnknownModuleError,
)
from raytrieve.modules import Pooling, Transformer


@pytest.fixture(scope="module")
def tiny_dense(tiny_dirs):
    t = Transformer.from_pretrained(tiny_dirs["base"], max_seq_length=32)
    return DenseEncoder([t, Pooling(32, "mean")], device="cpu", prompts={"query": "q: "})


def test_path_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        DenseEncoder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a model directory"):
        DenseEncoder(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file"):
        SparseEncoder(tmp_path / "file.txt")


def test_unknown_module_type_names_it(tiny_dense, tmp_path):
    tiny_dense.save(tmp_path / "m")
    spec = json.loads((tmp_path / "m" / "modules.json").read_text())
    spec[1]["type"] = "my_package.FancyPooling"
    (tmp_path / "m" / "modules.json").write_text(json.dumps(spec))
    with pytest.raises(UnknownModuleError, match=r"my_package\.FancyPooling"):
        DenseEncoder(tmp_path / "m")


def test_missing_module_folder_and_weights(tiny_dirs, tmp_path):
    from raytrieve.modules import Dense

    t = Transformer.from_pretrained(tiny_dirs["base"])
    DenseEncoder([t, Pooling(32), Dense(32, 8)], device="cpu").save(tmp_path / "m")
    (tmp_path / "m" / "2_Dense" / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="2_Dense"):
        DenseEncoder(tmp_path / "m")
    shutil.rmtree(tmp_path / "m" / "2_Dense")
    with pytest.raises(ModelLoadError, match="does not exist"):
        DenseEncoder(tmp_path / "m")


def test_mismatched_dimensions(tiny_dirs, tmp_path):
    t = Transformer.from_pretrained(tiny_dirs["base"])
    with pytest.raises(DimensionMismatchError, match="set the Pooling embedding_dimension to 32"):
        DenseEncoder([t, Pooling(64, "mean")], device="cpu")
    from raytrieve.modules import Dense

    with pytest.raises(DimensionMismatchError, match="in_features"):
        DenseEncoder([t, Pooling(32), Dense(16, 8)], device="cpu")


def test_unknown_prompt_name_lists_the_known_ones(tiny_dense):
    with pytest.raises(InputError, match=r"unknown prompt_name 'passage'.*\['document', 'query'\]"):
        tiny_dense.encode(["a"], prompt_name="passage")


def test_bad_inputs(tiny_dense, tiny_dirs):
    with pytest.raises(InputError, match=r"sentences\[1\] must be a string"):
        tiny_dense.encode(["a", 3])
    with pytest.raises(InputError, match="precision"):
        tiny_dense.encode(["a"], precision="fp4")
    with pytest.raises(InputError, match="truncate_dim"):
        tiny_dense.encode(["a"], truncate_dim=64)
    with pytest.raises(InputError, match="batch_size"):
        tiny_dense.encode(["a"], batch_size=0)
    cross = CrossEncoder(tiny_dirs["cls1"], device="cpu")
    with pytest.raises(InputError, match=r"pairs\[0\]"):
        cross.predict([("only one",)])
    for bad in (-1, 0, 1.5, True):  # -1 sliced off the worst document
        with pytest.raises(InputError, match=r"top_k must be a positive integer, or None for every document"):
            cross.rank("q", ["a", "b"], top_k=bad)
    assert len(cross.rank("q", ["a", "b"], top_k=5)) == 2
    import numpy as np

    assert len(cross.rank("q", ["a", "b"], top_k=np.int64(1))) == 1  # a numpy integer is an integer
    # All are RaytrieveErrors and ValueErrors, so generic handlers keep working.
    assert issubclass(InputError, RaytrieveError) and issubclass(InputError, ValueError)


def test_misused_library_calls_get_input_errors_that_say_what_to_pass(tiny_dense, tiny_dirs, tmp_path):
    """Each raised a bare TypeError, KeyError, AttributeError or torch RuntimeError, or silently
    did something else (a dict's keys encoded, a string ranked as its characters)."""
    from sentence_transformers import SentenceTransformer

    theirs = SentenceTransformer(str(tiny_dirs["base"]), device="cpu")  # an nn.Sequential of its own modules
    for bad in (None, 5, theirs):
        with pytest.raises(InputError, match=rf"DenseEncoder: model must be a model folder, .* or a list of raytrieve "
                                             rf"modules; got {type(bad).__name__}"):
            DenseEncoder(bad)
    for bad in ({"a": 1}, {"a"}):
        with pytest.raises(InputError, match=rf"sentences must be a string or a list of strings, got "
                                             rf"{type(bad).__name__}; pass a list"):
            tiny_dense.encode(bad)
    a, b = tiny_dense.encode(["a", "b"]), np.zeros((2, 16), dtype=np.float32)
    with pytest.raises(InputError, match="same dimension, got 32 and 16"):
        tiny_dense.similarity(a, b)
    with pytest.raises(InputError, match="same dimension, got 32 and 16"):
        tiny_dense.similarity_pairwise(a, b)
    with pytest.raises(InputError, match=r"got shapes \[1, 2, 32\] and \[2, 32\]"):
        tiny_dense.similarity(a[None], a)
    # A reranker saved in the sentence-transformers format is not an embedding model: it failed
    # at encode with KeyError 'sentence_embedding'.
    reranker = CrossEncoder(tiny_dirs["cls1"], device="cpu").save(tmp_path / "reranker")
    for kind in (DenseEncoder, SparseEncoder):
        with pytest.raises(InputError, match=rf"{kind.__name__}: .*reranker is a cross-encoder .* load it with "
                                             "CrossEncoder"):
            kind(reranker, device="cpu")
    cross = CrossEncoder(reranker, device="cpu")
    with pytest.raises(InputError, match="a list of such pairs, got str"):
        cross.predict("abc")
    with pytest.raises(InputError, match=r"documents must be a list of strings, got one string; pass \[document\]"):
        cross.rank("q", "abc")
    sparse = SparseEncoder(tiny_dirs["mlm"], device="cpu")
    emb = sparse.encode(["a cat", "a dog"])
    with pytest.raises(InputError, match="embeddings have 5 dimensions; this model's vectors have 30522"):
        sparse.decode(np.zeros(5, dtype=np.float32))
    with pytest.raises(InputError, match="sparsity takes the tensor encode returns, not as_dicts output"):
        sparse.sparsity(sparse.encode(["a cat"], as_dicts=True))
    with pytest.raises(InputError, match="must be a vector or a \\[rows, vocabulary\\] matrix, got str"):
        sparse.sparsity("a cat")
    # What encode returns in any of its forms decodes the same, and so does a numpy copy.
    want = sparse.decode(emb, top_k=3)
    assert sparse.decode(emb.to_dense().numpy(), top_k=3) == want
    assert sparse.decode(sparse.encode(["a cat", "a dog"], as_dicts=True), top_k=3) == want
    assert sparse.decode(sparse.encode("a cat", as_dicts=True), top_k=3) == want[0]
    assert sparse.sparsity(emb.to_dense().numpy()) == sparse.sparsity(emb)
    assert sparse.decode([]) == [] and sparse.sparsity([]) == sparse.sparsity(sparse.encode([]))  # empty: empty
    row = sparse.encode("a cat", as_dicts=True)
    shuffled = {"indices": row["indices"][::-1].copy(), "values": row["values"][::-1].copy()}
    assert sparse.decode(shuffled, top_k=3) == want[0]  # a dict in another order: largest weight first still
    # Stacks given as any iterable of modules load as a list does; a dict's keys view is texts.
    t = Transformer.from_pretrained(tiny_dirs["base"], max_seq_length=32)
    for stack in (torch.nn.Sequential(t, Pooling(32, "mean")), torch.nn.ModuleList([t, Pooling(32, "mean")])):
        assert DenseEncoder(stack, device="cpu").encode({"a": 1, "b": 2}.keys()).shape == (2, 32)


def test_sentence_transformers_spellings_of_the_dimension_and_a_rerankers_max_length(tiny_dense, tiny_dirs, st):
    """sentence-transformers 6.2 keeps get_sentence_embedding_dimension (warning of its rename)
    and CrossEncoder(max_length=): code ported from it ran into AttributeError and TypeError."""
    with pytest.warns(FutureWarning, match="renamed get_embedding_dimension"):
        assert tiny_dense.get_sentence_embedding_dimension() == tiny_dense.get_embedding_dimension() == 32
    folder = str(tiny_dirs["cls1_spread"])
    pair = ("inverse of a matrix", "word " * 60)
    ours = CrossEncoder(folder, device="cpu", max_length=16)
    assert ours.max_seq_length == 16
    ref = st.CrossEncoder(folder, device="cpu", max_length=16).predict([pair])
    np.testing.assert_allclose(ours.predict([pair]), ref, rtol=1e-5, atol=1e-6)
    assert not np.allclose(CrossEncoder(folder, device="cpu").predict([pair]), ref, rtol=1e-3)  # the cut matters
    with pytest.raises(InputError, match="max_length must be a positive number of tokens, got 0"):
        CrossEncoder(folder, device="cpu", max_length=0)


def test_more_sentence_transformers_spellings_a_porting_user_calls(tiny_dirs, st, tmp_path):
    """helper-93's port: get_max_seq_length(), model[0], encode(output_value=None), a
    CrossEncoder's .max_length, SparseEncoder.intersection and a sparse encode's
    convert_to_tensor=False raised or answered otherwise than sentence-transformers 6.2."""
    import torch

    from raytrieve import SparseEncoder

    t = Transformer.from_pretrained(tiny_dirs["base"], max_seq_length=32)
    ours = DenseEncoder([t, Pooling(32, "mean")], device="cpu")
    ours.save(tmp_path / "dense")
    theirs = st.SentenceTransformer(str(tmp_path / "dense"), device="cpu")
    assert ours.get_max_seq_length() == theirs.get_max_seq_length() == 32
    assert type(ours[0]).__name__ == type(theirs[0]).__name__ == "Transformer"
    assert ours[0].auto_model.config.hidden_size == theirs[0].auto_model.config.hidden_size
    # The long text pads the batch to 32 tokens, the hidden size: a sentence embedding must not
    # be taken for a per-token output then.
    texts = ["a short one", "a somewhat longer sentence than that", "word " * 60]
    got, want = ours.encode(texts, output_value=None), theirs.encode(texts, output_value=None)
    assert all(g["sentence_embedding"].shape == (32,) for g in got)
    for g, w in zip(got, want):
        real = w["attention_mask"].bool()  # sentence-transformers keeps the batch's padding; ours cuts it
        torch.testing.assert_close(g["sentence_embedding"], w["sentence_embedding"].float(), atol=1e-5, rtol=0)
        torch.testing.assert_close(g["token_embeddings"], w["token_embeddings"][real].float(), atol=1e-5, rtol=0)
        assert g["input_ids"].tolist() == w["input_ids"][real].tolist()

    cross = CrossEncoder(tiny_dirs["cls1"], device="cpu")
    cross.max_length = 20
    assert cross.max_length == cross.max_seq_length == 20 == st.CrossEncoder(str(tiny_dirs["cls1"]), max_length=20).max_length

    sparse = SparseEncoder(tiny_dirs["mlm"], device="cpu")
    sparse.save(tmp_path / "sparse")
    st_sparse = st.SparseEncoder(str(tmp_path / "sparse"), device="cpu")
    texts = texts[:2]
    rows = sparse.encode(texts, convert_to_tensor=False)
    ref = st_sparse.encode(texts, convert_to_tensor=False)
    assert isinstance(rows, list) and len(rows) == len(ref) == 2 and all(r.is_sparse for r in rows)
    for r, w in zip(rows, ref):
        torch.testing.assert_close(r.to_dense(), w.to_dense(), atol=1e-5, rtol=0)
    # Neither a tensor nor sparse: a list of dense vectors, one per text (it was one numpy array).
    rows = sparse.encode(texts, convert_to_tensor=False, convert_to_sparse_tensor=False)
    ref = st_sparse.encode(texts, convert_to_tensor=False, convert_to_sparse_tensor=False)
    assert isinstance(rows, list) and len(rows) == len(ref) == 2 and not any(r.is_sparse for r in rows)
    for r, w in zip(rows, ref):
        assert r.shape == w.shape
        torch.testing.assert_close(r, w, atol=1e-5, rtol=0)
    q, docs = sparse.encode(texts[0]), sparse.encode(texts)
    for b in (docs[1], docs):
        got = sparse.intersection(q, b)
        want = st_sparse.intersection(q, b)
        assert got.is_sparse and got.shape == want.shape
        torch.testing.assert_close(got.to_dense(), want.to_dense(), atol=1e-6, rtol=0)
    with pytest.raises(InputError, match="embeddings_1: one vector"):
        sparse.intersection(docs, docs)


def test_empty_input_returns_empty_results(tiny_dense, tiny_dirs):
    assert tiny_dense.encode([]).shape == (0, 32)
    assert tiny_dense.encode([], convert_to_tensor=True).shape == (0, 32)
    sparse = SparseEncoder(tiny_dirs["mlm"], device="cpu")
    assert sparse.encode([]).shape == (0, 30522)
    assert sparse.encode([], as_dicts=True) == []
    cross = CrossEncoder(tiny_dirs["cls1"], device="cpu")
    assert cross.predict([]).shape == (0,)
    assert cross.rank("q", []) == []


def test_save_refuses_to_replace_a_foreign_directory(tiny_dense, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("precious")
    with pytest.raises(ModelLoadError, match="refusing to replace"):
        tiny_dense.save(tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "precious"


def test_failed_save_leaves_previous_model_intact(tiny_dense, tmp_path, monkeypatch):
    tiny_dense.save(tmp_path / "m")
    before = sorted(p.name for p in (tmp_path / "m").rglob("*"))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("raytrieve.encoders.st_format.write_st_config", boom)
    with pytest.raises(OSError, match="disk full"):
        tiny_dense.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp dirs left
    again = DenseEncoder(tmp_path / "m", device="cpu")
    np.testing.assert_allclose(again.encode(["x"]), tiny_dense.encode(["x"]), atol=0)


def test_untrusted_activation_is_refused(tiny_dirs, tmp_path):
    cross = CrossEncoder(tiny_dirs["cls1"], device="cpu")
    cross.save(tmp_path / "c")
    cfg_path = tmp_path / "c" / "config_sentence_transformers.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["activation_fn"] = "os.system"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        CrossEncoder(tmp_path / "c", device="cpu")
    assert isinstance(CrossEncoder(tiny_dirs["cls1"], device="cpu").activation_fn, torch.nn.Sigmoid)


def test_max_seq_length_past_the_position_embeddings_is_refused(tiny_dirs, st):
    """A length the model cannot run (its config's 128 positions here) is refused when set, not
    when the first long input fails mid-encode; at the limit a longer input is truncated and
    scores as sentence-transformers' CrossEncoder does at that length."""
    from raytrieve.encoders import load_encoder
    from raytrieve.errors import ConfigError

    folder = str(tiny_dirs["cls1_spread"])
    with pytest.raises(ConfigError, match=r"max_seq_length 129 is more than the 128 positions this model can run .* "
                       r"at most 128"):
        load_encoder("cross", folder, device="cpu", max_seq_length=129)
    model = CrossEncoder(folder, device="cpu")
    with pytest.raises(ConfigError, match="at most 128"):
        model.max_seq_length = 500
    model.max_seq_length = 128
    pair = ("inverse of a matrix", "word " * 400)
    ref = st.CrossEncoder(folder, device="cpu", max_length=128).predict([pair])
    np.testing.assert_allclose(model.predict([pair]), ref, rtol=1e-5, atol=1e-6)


def test_position_limits_follow_the_position_table(tiny_dirs, tmp_path, caplog):
    """Absolute positions: the table's rows (BERT), less the rows up to padding where positions
    start after it (RoBERTa: 66 rows, 64 positions); relative positions (DeBERTa-v2 without
    absolute ones): no limit. From a saved folder too, where an old sentence-transformers layout
    keeps the transformer in 0_Transformer/. A folder's own length past the limit is cut to it."""
    import logging

    from transformers import DebertaV2Config, DebertaV2Model, RobertaConfig, RobertaModel

    from raytrieve.modules.transformer import position_limit, saved_position_limit

    small = dict(vocab_size=100, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    with torch.device("meta"):
        roberta = RobertaModel(RobertaConfig(max_position_embeddings=66, pad_token_id=1, **small))
        deberta = DebertaV2Model(DebertaV2Config(max_position_embeddings=64, position_biased_input=False, **small))
    assert position_limit(roberta) == 64 and position_limit(deberta) is None
    assert saved_position_limit(tiny_dirs["cls1"]) == 128
    old_layout = tmp_path / "old"
    shutil.copytree(tiny_dirs["base"], old_layout / "0_Transformer")
    (old_layout / "modules.json").write_text(json.dumps(
        [{"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"}]))
    assert saved_position_limit(old_layout) == 128 and saved_position_limit(tmp_path) is None
    with caplog.at_level(logging.WARNING, logger="raytrieve.modules.transformer"):
        t = Transformer.from_pretrained(tiny_dirs["base"], max_seq_length=500)
    assert t.max_seq_length == 128 and "max_seq_length 500 is more than the 128 positions" in caplog.text



def test_a_routers_position_limit_is_its_smallest_routes(tiny_dirs, tiny_models, tmp_path):
    """A Router's transformers sit in its routes' folders (router_config.json): the saved limit
    is the smallest route's, and a length past it is refused with the config's key before work."""
    from tests.conftest import tiny_bert_config
    from transformers import AutoTokenizer, BertModel

    from raytrieve.errors import ConfigError
    from raytrieve.model_ref import check_max_seq_length
    from raytrieve.modules import Router
    from raytrieve.modules.transformer import saved_position_limit

    short = tmp_path / "short"
    BertModel(tiny_bert_config(max_position_embeddings=48)).save_pretrained(short)
    AutoTokenizer.from_pretrained(tiny_dirs["base"]).save_pretrained(short)
    folder = tmp_path / "router"
    DenseEncoder([Router.for_query_document(
        [Transformer.from_pretrained(tiny_dirs["base"]), Pooling(32, "mean")],
        [Transformer.from_pretrained(short), Pooling(32, "mean")])], device="cpu").save(folder)
    assert saved_position_limit(folder) == 48
    assert saved_position_limit(tiny_models["router"]) == 128  # inference-free SPLADE: the MLM route
    with pytest.raises(ConfigError, match=r"cfg.dense.max_seq_length: 64 is more than the 48 positions"):
        check_max_seq_length(folder, 64, "cfg.dense.max_seq_length")
    check_max_seq_length(folder, 48, "cfg.dense.max_seq_length")
