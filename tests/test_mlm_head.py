"""SPLADE's vocabulary projection of real tokens only (modules/mlm_head.py,
SpladePooling._pool_projected), against transformers' own logits and sentence-transformers'
SparseEncoder on the same weights: values and gradients."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import NO_DROPOUT, SENTENCES, assert_grads_close, tiny_bert_config

from raytrieve import SparseEncoder
from raytrieve.modules import MLMTransformer, SpladePooling
from raytrieve.modules.mlm_head import mlm_transform

SMALL = dict(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _masked_lm(arch: str) -> torch.nn.Module:
    import transformers as T

    torch.manual_seed(0)
    if arch == "bert":
        return T.BertForMaskedLM(T.BertConfig(**SMALL))
    if arch == "roberta":
        return T.RobertaForMaskedLM(T.RobertaConfig(**SMALL, max_position_embeddings=40))
    if arch == "xlm-roberta":
        return T.XLMRobertaForMaskedLM(T.XLMRobertaConfig(**SMALL, max_position_embeddings=40))
    if arch == "distilbert":
        config = T.DistilBertConfig(vocab_size=1000, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
        return T.DistilBertForMaskedLM(config)
    if arch == "mobilebert":  # its projection also concatenates a dense matrix: not splittable
        return T.MobileBertForMaskedLM(
            T.MobileBertConfig(**SMALL, embedding_size=16, intra_bottleneck_size=32, num_feedforward_networks=1)
        )
    raise AssertionError(arch)


@pytest.mark.parametrize("arch", ["bert", "roberta", "xlm-roberta", "distilbert"])
def test_split_head_gives_the_models_own_logits(arch):
    model = _masked_lm(arch).eval()
    transform = mlm_transform(model)
    assert transform is not None
    ids = torch.randint(5, 1000, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        split = model.get_output_embeddings()(transform(hidden))
    torch.testing.assert_close(split, reference, atol=1e-6, rtol=1e-6)


def test_an_unknown_head_is_not_split():
    assert mlm_transform(_masked_lm("mobilebert")) is None


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory, minilm_dir):
    from transformers import AutoTokenizer, BertForMaskedLM

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("mlm_head") / "mlm"
    BertForMaskedLM(tiny_bert_config(**NO_DROPOUT)).save_pretrained(d)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(d)
    return d


POOLINGS = [("max", "relu"), ("sum", "relu"), ("max", "log1p_relu"), ("sum", "log1p_relu")]


@pytest.mark.parametrize(("strategy", "activation"), POOLINGS)
def test_projected_pooling_matches_sentence_transformers_with_gradients(st, mlm_dir, strategy, activation):
    from sentence_transformers.sparse_encoder import models as st_models

    ours = SparseEncoder(
        [MLMTransformer.from_pretrained(mlm_dir), SpladePooling(strategy, activation_function=activation)],
        device="cpu",
    ).train()
    assert ours.stack[0].decoder_deferred
    st_modules = [
        st_models.MLMTransformer(str(mlm_dir)),
        st_models.SpladePooling(strategy, activation_function=activation),
    ]
    ref = st.SparseEncoder(modules=st_modules, device="cpu").train()
    texts = SENTENCES[:5]  # different lengths: padding inside the batch
    with torch.no_grad():  # inference (amax, no autograd), as encode runs it
        ours.eval(), ref.eval()
        torch.testing.assert_close(
            ours(ours.tokenize(texts))["sentence_embedding"],
            ref(ref.tokenize(texts))["sentence_embedding"],
            atol=1e-5,
            rtol=1e-5,
        )
        ours.train(), ref.train()
    got = ours(ours.tokenize(texts))["sentence_embedding"]
    want = ref(ref.tokenize(texts))["sentence_embedding"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    weights = torch.linspace(0.5, 1.5, got.shape[1])  # a loss that weighs every vocabulary entry
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    ours_grads = dict(ours.stack[0].auto_model.named_parameters())
    checked = 0
    for name, p in st_modules[0].auto_model.named_parameters():
        if p.grad is None:
            continue
        assert_grads_close(ours_grads[name].grad, p.grad, msg=name)  # gradients of 1e4: see its docstring
        checked += 1
    assert checked > 10 and ours.stack[0].auto_model.get_output_embeddings().weight.grad.abs().sum() > 0


def test_left_padding_and_a_row_without_tokens(mlm_dir):
    """The mask, not the position, says which tokens are real; a row the mask empties is all zero."""
    deferred = SparseEncoder([MLMTransformer.from_pretrained(mlm_dir), SpladePooling("max")], device="cpu")
    full = SparseEncoder([MLMTransformer.from_pretrained(mlm_dir), SpladePooling("max")], device="cpu")
    full.stack[0].decoder_deferred = False
    features = deferred.tokenize(SENTENCES[:3])
    # Left-pad by hand: the same tokens moved to the end of each row.
    lengths = features["attention_mask"].sum(1)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        rows = features[key]
        features[key] = torch.stack([torch.roll(r, int(r.shape[0] - n)) for r, n in zip(rows, lengths)])
    features["attention_mask"][2] = 0
    with torch.no_grad():
        got = deferred({k: v.clone() for k, v in features.items()})["sentence_embedding"]
        want = full({k: v.clone() for k, v in features.items()})["sentence_embedding"]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert got[2].abs().sum() == 0 and got[0].abs().sum() > 0


def test_a_weighting_mask_scales_the_logits_as_sentence_transformers_does(st, mlm_dir):
    """A float mask (not 0/1) multiplies the logits: every position is projected and weighted."""
    from sentence_transformers.sparse_encoder import models as st_models

    model = SparseEncoder([MLMTransformer.from_pretrained(mlm_dir), SpladePooling("max")], device="cpu")
    features = model.tokenize(SENTENCES[:3])
    weights = features["attention_mask"].float()
    weights[:, 1:3] *= 0.5
    with torch.no_grad():
        full = model.stack[0].auto_model(
            input_ids=features["input_ids"], attention_mask=features["attention_mask"]
        ).logits
        want = st_models.SpladePooling("max")({"token_embeddings": full, "attention_mask": weights})
        deferred = model.stack[0](dict(features))  # the transformer saw the 0/1 mask; the pooling gets weights
        assert "mlm_decoder" in deferred
        got = model.stack[1]({**deferred, "attention_mask": weights})
    torch.testing.assert_close(got["sentence_embedding"], want["sentence_embedding"], atol=1e-6, rtol=1e-6)


def test_int8_decoder_is_projected_too(mlm_dir):
    """int8 replaces the decoder with a quantised module (not a Linear): the pooling calls it per
    text. Its activations are quantised per call (one text, not the padded batch), so the oracle
    is the full-logits path on the same int8 model: as close to float32 as it, and close to it."""
    model = SparseEncoder([MLMTransformer.from_pretrained(mlm_dir), SpladePooling("max")], device="cpu")
    reference = model.encode(SENTENCES, convert_to_sparse_tensor=False)
    model.set_dtype("int8")
    assert type(model.stack[0].auto_model.get_output_embeddings()) is not torch.nn.Linear
    deferred = model.encode(SENTENCES, convert_to_sparse_tensor=False)
    model.stack[0].decoder_deferred = False
    full = model.encode(SENTENCES, convert_to_sparse_tensor=False)
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(deferred, reference).min() >= cosine(full, reference).min() - 0.01
    assert cosine(deferred, full).min() > 0.98, cosine(deferred, full)


def test_max_over_tokens_backward_is_autograd_through_max():
    """The training path of max pooling (only the winners' rows in backward) against autograd
    through the dense block's max: values, and the gradient of a mostly-zero upstream gradient
    (as relu leaves it), a text without tokens included. float64: no ties to break differently."""
    import itertools

    from raytrieve.modules.splade_pooling import _MaxOverTokens

    g = torch.Generator().manual_seed(0)
    lengths = [5, 0, 9, 1]
    weight = torch.randn(300, 16, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randn(sum(lengths), 16, generator=g, dtype=torch.float64, requires_grad=True)
    offsets = [0, *itertools.accumulate(lengths)]
    got = _MaxOverTokens.apply(tokens, weight, offsets)
    want = torch.stack([
        (weight @ tokens[s:e].T).max(dim=1).values if e > s else weight.new_zeros(300)
        for s, e in itertools.pairwise(offsets)
    ])
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    upstream = torch.randn(4, 300, generator=g, dtype=torch.float64) * (torch.rand(4, 300, generator=g) < 0.1)
    got_w, got_t = torch.autograd.grad(got, [weight, tokens], upstream)
    want_w, want_t = torch.autograd.grad(want, [weight, tokens], upstream)
    torch.testing.assert_close(got_w, want_w, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got_t, want_t, atol=1e-12, rtol=1e-12)
    assert got_w.abs().sum() > 0 and got_t[5:14].abs().sum() > 0


@pytest.mark.parametrize("share", [1.0, 0.1])
def test_max_pooling_under_bf16_autocast_trains_on_the_inference_values(mlm_dir, share):
    """Under bf16 autocast the training path pools the same values as inference (amax of the
    same bf16 block), and its gradients, backward called inside autocast, are autograd's through
    the whole logits' max (the undeferred decoder) up to bf16's ties, which each path may break
    its own way."""
    texts = SENTENCES[:4]
    model = SparseEncoder([MLMTransformer.from_pretrained(mlm_dir), SpladePooling("max")], device="cpu").train()
    ref = SparseEncoder([MLMTransformer.from_pretrained(mlm_dir), SpladePooling("max")], device="cpu").train()
    ref.stack[0].decoder_deferred = False
    features = model.tokenize(texts)
    vocab = model.stack[0].auto_model.config.vocab_size
    # share: the entries with a gradient (all: the [vocab, tokens] form; 10%: the gathered rows)
    keep = torch.rand(vocab, generator=torch.Generator().manual_seed(0)) < share
    weights = torch.linspace(0.5, 1.5, vocab) * keep
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            want = model({k: v.clone() for k, v in features.items()})["sentence_embedding"]
        got = model({k: v.clone() for k, v in features.items()})["sentence_embedding"]
        ref_got = ref({k: v.clone() for k, v in features.items()})["sentence_embedding"]
        # Inside autocast, as the training step calls backward.
        (got * weights).sum().backward()
        (ref_got * weights).sum().backward()
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    ref_params = dict(ref.stack[0].auto_model.named_parameters())
    for name, p in model.stack[0].auto_model.named_parameters():
        expected = ref_params[name].grad
        assert p.grad is not None and expected is not None, name
        if name.endswith("key.bias"):  # softmax ignores a key bias: its gradient is rounding noise
            continue
        relative = (p.grad - expected).norm() / expected.norm()
        assert relative < 0.02, (name, float(relative))  # 0.005 at most here
