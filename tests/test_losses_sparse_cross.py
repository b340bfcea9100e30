"""Sparse and cross-encoder losses against sentence-transformers: values and gradients."""

from __future__ import annotations

import pytest
import torch

import raytrieve.losses.cross as CL
import raytrieve.losses.sparse as SL
from raytrieve import CrossEncoder, SparseEncoder
from raytrieve.modules import MLMTransformer, SpladePooling
from tests.test_losses_dense import ANCHORS, NEGATIVES, NEGATIVES2, POSITIVES, check


def _no_dropout_dir(tmp_path, kind: str, seed: int = 0):
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertForSequenceClassification

    from raytrieve import assets

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, num_labels=1)
    model = BertForMaskedLM(cfg) if kind == "mlm" else BertForSequenceClassification(cfg)
    d = tmp_path / kind
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(assets.model_path("all-minilm-l6-v2")).save_pretrained(d)
    return d


@pytest.fixture
def sparse_pair(st, tmp_path):
    mlm = MLMTransformer.from_pretrained(_no_dropout_dir(tmp_path, "mlm"), max_seq_length=24)
    SparseEncoder([mlm, SpladePooling("max")], device="cpu").save(tmp_path / "splade")
    return (SparseEncoder(tmp_path / "splade", device="cpu").train(),
            st.SparseEncoder(str(tmp_path / "splade"), device="cpu").train())


@pytest.fixture(scope="module")
def SS(st):
    from sentence_transformers.sparse_encoder import losses

    return losses


COLS3 = [ANCHORS, POSITIVES, NEGATIVES]


def test_splade_loss_components_and_gradients(sparse_pair, SS):
    ours_model, ref_model = sparse_pair
    ours = SL.SpladeLoss(ours_model, SL.SparseMultipleNegativesRankingLoss(ours_model),
                         document_regularizer_weight=3e-3, query_regularizer_weight=5e-3)
    ref = SS.SpladeLoss(ref_model, SS.SparseMultipleNegativesRankingLoss(ref_model),
                        document_regularizer_weight=3e-3, query_regularizer_weight=5e-3)
    got = ours([ours_model.tokenize(c) for c in COLS3])
    want = ref([ref_model.preprocess(c) for c in COLS3])
    assert list(got) == list(want) == ["base_loss", "document_regularizer_loss", "query_regularizer_loss"]
    for k in got:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4)
    sum(got.values()).backward()
    sum(want.values()).backward()
    for a, b in zip(ours_model.parameters(), ref_model.parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


def test_splade_document_only_and_threshold(sparse_pair, SS):
    ours_model, ref_model = sparse_pair
    kw = dict(document_regularizer_weight=1e-2, use_document_regularizer_only=True, document_regularizer_threshold=5)
    ours = SL.SpladeLoss(ours_model, SL.SparseMarginMSELoss(ours_model), **kw)
    ref = SS.SpladeLoss(ref_model, SS.SparseMarginMSELoss(ref_model), **kw)
    labels = torch.tensor([1.0, 2.0, 0.5, -1.0, 3.0, 0.0])
    got = ours([ours_model.tokenize(c) for c in COLS3], labels)
    want = ref([ref_model.preprocess(c) for c in COLS3], labels)
    assert set(got) == set(want) == {"base_loss", "document_regularizer_loss"}
    for k in got:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4)


def test_sparse_base_losses(sparse_pair, SS):
    labels = torch.tensor([0.9, 0.1, 0.5, 0.5, 0.3, 1.0])
    for ours_cls, ref_cls, cols, lab in [
        ("SparseMultipleNegativesRankingLoss", "SparseMultipleNegativesRankingLoss", COLS3, None),
        ("SparseCoSENTLoss", "SparseCoSENTLoss", COLS3[:2], labels),
        ("SparseAnglELoss", "SparseAnglELoss", COLS3[:2], labels),
        ("SparseCosineSimilarityLoss", "SparseCosineSimilarityLoss", COLS3[:2], labels),
        ("SparseTripletLoss", "SparseTripletLoss", COLS3, None),
    ]:
        for p in sparse_pair:
            p.zero_grad()
        ours = getattr(SL, ours_cls)(sparse_pair[0])
        ref = getattr(SS, ref_cls)(sparse_pair[1])
        ours_v = ours.compute_loss_from_embeddings([sparse_pair[0](sparse_pair[0].tokenize(c))["sentence_embedding"] for c in cols], lab)
        ref_v = ref.compute_loss_from_embeddings([sparse_pair[1](sparse_pair[1].preprocess(c))["sentence_embedding"] for c in cols], lab)
        torch.testing.assert_close(ours_v, ref_v, atol=1e-5, rtol=1e-4, msg=ours_cls)


def test_sparse_distill_kl(sparse_pair, SS):
    teacher = torch.tensor([[3.0, 1.0, 0.0]] * 6) + torch.arange(6.0).unsqueeze(1) / 10
    cols = COLS3 + [NEGATIVES2]
    ours = SL.SparseDistillKLDivLoss(sparse_pair[0])
    ref = SS.SparseDistillKLDivLoss(sparse_pair[1])
    a = ours.compute_loss_from_embeddings([sparse_pair[0](sparse_pair[0].tokenize(c))["sentence_embedding"] for c in cols], teacher)
    b = ref.compute_loss_from_embeddings([sparse_pair[1](sparse_pair[1].preprocess(c))["sentence_embedding"] for c in cols], teacher)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_regularizer_warmup_schedule(sparse_pair):
    loss = SL.SpladeLoss(sparse_pair[0], SL.SparseMultipleNegativesRankingLoss(sparse_pair[0]),
                         document_regularizer_weight=0.3, query_regularizer_weight=0.6)
    sched = SL.SpladeRegularizerWeightScheduler(loss, total_steps=30)  # warm-up: 10 steps, quadratic
    assert sched.step(0) == {"document_regularizer_weight": 0.0, "query_regularizer_weight": 0.0}
    assert sched.step(5)["document_regularizer_weight"] == pytest.approx(0.3 * 0.25)
    assert sched.step(10) == {"document_regularizer_weight": 0.3, "query_regularizer_weight": 0.6}


# -- cross-encoder -----------------------------------------------------------------------------


@pytest.fixture
def cross_pair(st, tmp_path):
    d = _no_dropout_dir(tmp_path, "cls")
    return CrossEncoder(d, device="cpu").train(), st.CrossEncoder(str(d), device="cpu").train()


@pytest.fixture(scope="module")
def CS(st):
    from sentence_transformers.cross_encoder import losses

    return losses


def check_cross(pair, ours_loss, ref_loss, inputs, labels, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    got = ours_loss(inputs, labels)
    if seed is not None:
        torch.manual_seed(seed)
    want = ref_loss(inputs, labels)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    got.backward()
    want.backward()
    for a, b in zip(pair[0].parameters(), pair[1].parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pair[0].parameters())


BIN = torch.tensor([1, 0, 1, 0, 0, 1])
SCORES = torch.tensor([0.9, 0.1, 0.5, 0.5, 0.3, 1.0])


def test_pointwise(cross_pair, CS):
    check_cross(cross_pair, CL.BinaryCrossEntropyLoss(cross_pair[0], pos_weight=torch.tensor(2.0)),
                CS.BinaryCrossEntropyLoss(cross_pair[1], pos_weight=torch.tensor(2.0)), [ANCHORS, POSITIVES], BIN)


def test_mse_and_margin_mse(cross_pair, CS):
    check_cross(cross_pair, CL.MSELoss(cross_pair[0]), CS.MSELoss(cross_pair[1]), [ANCHORS, POSITIVES], SCORES)


def test_margin_mse(cross_pair, CS):
    margins = torch.tensor([1.0, 0.5, 2.0, -0.5, 0.0, 3.0])
    check_cross(cross_pair, CL.MarginMSELoss(cross_pair[0]), CS.MarginMSELoss(cross_pair[1]),
                [ANCHORS, POSITIVES, NEGATIVES], margins)


@pytest.mark.parametrize("num_negatives", [None, 3])
def test_cross_mnrl(cross_pair, CS, num_negatives):
    check_cross(cross_pair, CL.MultipleNegativesRankingLoss(cross_pair[0], num_negatives=num_negatives),
                CS.MultipleNegativesRankingLoss(cross_pair[1], num_negatives=num_negatives),
                [ANCHORS, POSITIVES, NEGATIVES], None, seed=11)


def test_cross_cached_mnrl(cross_pair, CS):
    check_cross(cross_pair, CL.CachedMultipleNegativesRankingLoss(cross_pair[0], num_negatives=3, mini_batch_size=5),
                CS.CachedMultipleNegativesRankingLoss(cross_pair[1], num_negatives=3, mini_batch_size=5),
                [ANCHORS, POSITIVES, NEGATIVES], None, seed=11)


DOCS = [[POSITIVES[0], NEGATIVES[0], NEGATIVES[1]], [POSITIVES[1]], [POSITIVES[2], NEGATIVES[2], NEGATIVES2[2], NEGATIVES[3]],
        [NEGATIVES[4], POSITIVES[3]]]
LIST_LABELS = [torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0]), torch.tensor([1.0, 0.0, 3.0, 0.0]), torch.tensor([0.0, 1.0])]
QUERIES = ANCHORS[:4]


@pytest.mark.parametrize("scheme", ["NoWeightingScheme", "NDCGLoss1Scheme", "NDCGLoss2Scheme", "LambdaRankScheme", "NDCGLoss2PPScheme"])
@pytest.mark.parametrize("k", [None, 2])
def test_lambda_loss_schemes(cross_pair, CS, scheme, k):
    check_cross(cross_pair, CL.LambdaLoss(cross_pair[0], getattr(CL, scheme)(), k=k),
                CS.LambdaLoss(cross_pair[1], getattr(CS, scheme)(), k=k), [QUERIES, DOCS], LIST_LABELS)


@pytest.mark.parametrize("name,kwargs", [("ListNetLoss", {}), ("ListMLELoss", {}), ("PListMLELoss", {}),
                                         ("PListMLELoss", {"respect_input_order": False}), ("RankNetLoss", {"k": 3}),
                                         ("ListNetLoss", {"mini_batch_size": 3})])
def test_listwise(cross_pair, CS, name, kwargs):
    check_cross(cross_pair, getattr(CL, name)(cross_pair[0], **kwargs), getattr(CS, name)(cross_pair[1], **kwargs),
                [QUERIES, DOCS], LIST_LABELS)


def test_cross_errors(cross_pair):
    with pytest.raises(CL.LossInputError, match="BinaryCrossEntropyLoss expects 2"):
        CL.BinaryCrossEntropyLoss(cross_pair[0])([ANCHORS], BIN)
    with pytest.raises(CL.LossInputError, match="list of tensors"):
        CL.ListNetLoss(cross_pair[0])([QUERIES, DOCS], torch.zeros(4))
