"""Sparse and cross-encoder losses against sentence-transformers: values and gradients."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import NO_DROPOUT, assert_grads_close, tiny_bert_config
from tests.test_losses_dense import ANCHORS, NEGATIVES, NEGATIVES2, POSITIVES

import raytrieve.losses.cross as CL
import raytrieve.losses.sparse as SL
from raytrieve import CrossEncoder, SparseEncoder
from raytrieve.modules import MLMTransformer, SpladePooling


def _no_dropout_dir(tmp_path, kind: str, seed: int = 0, num_labels: int = 1):
    from transformers import AutoTokenizer, BertForMaskedLM, BertForSequenceClassification

    from raytrieve.model_ref import resolve_model

    torch.manual_seed(seed)
    cfg = tiny_bert_config(**NO_DROPOUT, num_labels=num_labels)
    model = BertForMaskedLM(cfg) if kind == "mlm" else BertForSequenceClassification(cfg)
    d = tmp_path / f"{kind}{num_labels}"
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(resolve_model("all-minilm-l6-v2")).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """The model folders, built once per module; tests load fresh models from them."""
    root = tmp_path_factory.mktemp("sparse_cross_losses")
    mlm = MLMTransformer.from_pretrained(_no_dropout_dir(root, "mlm"), max_seq_length=24)
    SparseEncoder([mlm, SpladePooling("max")], device="cpu").save(root / "splade")
    return {
        "splade": root / "splade",
        "cls1": _no_dropout_dir(root, "cls"),
        "cls3": _no_dropout_dir(root, "cls", num_labels=3),
    }


@pytest.fixture
def sparse_pair(st, model_dirs):
    return (
        SparseEncoder(model_dirs["splade"], device="cpu").train(),
        st.SparseEncoder(str(model_dirs["splade"]), device="cpu").train(),
    )


@pytest.fixture(scope="module")
def SS(st):
    from sentence_transformers.sparse_encoder import losses

    return losses


COLS3 = [ANCHORS, POSITIVES, NEGATIVES]


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


SCORE_LABELS = torch.tensor([0.9, 0.1, 0.5, 0.5, 0.3, 1.0])
MARGIN_LABELS = torch.tensor([1.0, 2.0, 0.5, -1.0, 3.0, 0.0])
TEACHER_SCORES = torch.tensor([[3.0, 1.0, 0.0]] * 6) + torch.arange(6.0).unsqueeze(1) / 10


def _teacher_embeddings() -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    return torch.rand(6, 30522, generator=g) * (torch.rand(6, 30522, generator=g) < 0.01)


# (input columns, labels) of every sparse base loss.
SPARSE_BASES = {
    "SparseMultipleNegativesRankingLoss": (COLS3, None),
    "SparseCoSENTLoss": (COLS3[:2], SCORE_LABELS),
    "SparseAnglELoss": (COLS3[:2], SCORE_LABELS),
    "SparseCosineSimilarityLoss": (COLS3[:2], SCORE_LABELS),
    "SparseTripletLoss": (COLS3, None),
    "SparseDistillKLDivLoss": ([*COLS3, NEGATIVES2], TEACHER_SCORES),
    "SparseMarginMSELoss": (COLS3, MARGIN_LABELS),
    "SparseMSELoss": (COLS3[:2], "teacher embeddings"),
}


def _base_case(name: str):
    cols, labels = SPARSE_BASES[name]
    return cols, _teacher_embeddings() if isinstance(labels, str) else labels


def _grads_match(ours_model, ref_model) -> None:
    ours_p, ref_p = list(ours_model.parameters()), list(ref_model.parameters())
    assert ours_p and len(ours_p) == len(ref_p)
    for a, b in zip(ours_p, ref_p):
        if b.grad is None:
            assert a.grad is None or torch.count_nonzero(a.grad) == 0
            continue
        assert_grads_close(a.grad, b.grad)  # sparse gradients reach 1e4: see its docstring
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ours_p)


@pytest.mark.parametrize("name", list(SPARSE_BASES))
def test_sparse_loss_own_forward(sparse_pair, SS, name):
    """Our loss called on its own (it embeds the columns through the model) against the base
    component of sentence-transformers' SpladeLoss, which is how sentence-transformers runs its
    sparse losses (called alone they raise there)."""
    ours_model, ref_model = sparse_pair
    cols, labels = _base_case(name)
    got = getattr(SL, name)(ours_model)([ours_model.tokenize(c) for c in cols], labels)
    ref_features = [ref_model.preprocess(c) for c in cols]
    if name == "SparseMSELoss":  # the one sparse loss with a forward of its own there
        want = SS.SparseMSELoss(ref_model)(ref_features, labels)
    else:
        ref = SS.SpladeLoss(ref_model, getattr(SS, name)(ref_model), document_regularizer_weight=0.0)
        want = ref(ref_features, labels)["base_loss"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    got.backward()
    want.backward()
    _grads_match(ours_model, ref_model)


@pytest.mark.parametrize("name", list(SPARSE_BASES))
def test_splade_loss_forward_with_flops(sparse_pair, SS, name):
    """SpladeLoss around each base loss with FLOPS regularizers on documents and queries (the
    query one with a threshold): every component, and the gradient of their sum."""
    ours_model, ref_model = sparse_pair
    cols, labels = _base_case(name)
    kw = dict(document_regularizer_weight=3e-3, query_regularizer_weight=5e-3, query_regularizer_threshold=40)
    ours = SL.SpladeLoss(ours_model, getattr(SL, name)(ours_model), **kw)
    ref = SS.SpladeLoss(ref_model, getattr(SS, name)(ref_model), **kw)
    got = ours([ours_model.tokenize(c) for c in cols], labels)
    if name == "SparseMSELoss":
        # sentence-transformers 6.2's SpladeLoss hands the label tensor to MSELoss's
        # compute_loss_from_embeddings, which zips it with the columns (column i against teacher
        # row i). A per-column list of the teacher embeddings gives it the loss its own forward
        # (and ours, in SpladeLoss too) computes: every column against the batch's teachers.
        labels = [labels] * len(cols)
    want = ref([ref_model.preprocess(c) for c in cols], labels)
    assert list(got) == list(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4, msg=k)
    sum(got.values()).backward()
    sum(want.values()).backward()
    _grads_match(ours_model, ref_model)


@pytest.mark.parametrize("threshold", [None, 2])
def test_flops_loss(SS, threshold):
    """FlopsLoss has no forward of its own (here or in sentence-transformers): its math and gradient."""
    emb = torch.tensor([[0.0, 2.0, 0.0, 1.0], [3.0, 1.0, 4.0, 1.0], [0.0, 0.0, 0.5, 0.0]], requires_grad=True)
    ref_emb = emb.detach().clone().requires_grad_()
    got = SL.FlopsLoss(None, threshold=threshold).compute_loss_from_embeddings(emb)
    want = SS.FlopsLoss(None, threshold=threshold).compute_loss_from_embeddings(ref_emb)
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    torch.testing.assert_close(emb.grad, ref_emb.grad)


def test_regularizer_warmup_schedule(sparse_pair):
    loss = SL.SpladeLoss(
        sparse_pair[0],
        SL.SparseMultipleNegativesRankingLoss(sparse_pair[0]),
        document_regularizer_weight=0.3,
        query_regularizer_weight=0.6,
    )
    sched = SL.SpladeRegularizerWeightScheduler(loss, total_steps=30)  # warm-up: 10 steps, quadratic
    assert sched.step(0) == {"document_regularizer_weight": 0.0, "query_regularizer_weight": 0.0}
    assert sched.step(5)["document_regularizer_weight"] == pytest.approx(0.3 * 0.25)
    assert sched.step(10) == {"document_regularizer_weight": 0.3, "query_regularizer_weight": 0.6}


# -- cross-encoder -----------------------------------------------------------------------------


@pytest.fixture
def cross_pair(st, model_dirs):
    d = model_dirs["cls1"]
    return CrossEncoder(d, device="cpu").train(), st.CrossEncoder(str(d), device="cpu").train()


@pytest.fixture(scope="module")
def CS(st):
    from sentence_transformers.cross_encoder import losses

    return losses


def check_cross(pair, ours_loss, ref_loss, inputs, labels, seed=None, ref_inputs=None):
    if seed is not None:
        torch.manual_seed(seed)
    got = ours_loss(inputs, labels)
    if seed is not None:
        torch.manual_seed(seed)
    want = ref_loss(inputs if ref_inputs is None else ref_inputs, labels)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    got.backward()
    want.backward()
    for a, b in zip(pair[0].parameters(), pair[1].parameters(), strict=True):  # same parameters, same order
        assert a.shape == b.shape
        if b.grad is None:
            assert a.grad is None or torch.count_nonzero(a.grad) == 0
            continue
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pair[0].parameters())


BIN = torch.tensor([1, 0, 1, 0, 0, 1])
SCORES = torch.tensor([0.9, 0.1, 0.5, 0.5, 0.3, 1.0])


def test_pointwise(cross_pair, CS):
    check_cross(
        cross_pair,
        CL.BinaryCrossEntropyLoss(cross_pair[0], pos_weight=torch.tensor(2.0)),
        CS.BinaryCrossEntropyLoss(cross_pair[1], pos_weight=torch.tensor(2.0)),
        [ANCHORS, POSITIVES],
        BIN,
    )


@pytest.fixture
def cross3_pair(st, model_dirs):
    d = model_dirs["cls3"]
    return CrossEncoder(d, device="cpu").train(), st.CrossEncoder(str(d), device="cpu").train()


@pytest.mark.parametrize("labels", ["ids", "ids_column", "soft"])
def test_cross_entropy_class_ids_and_soft_labels(cross3_pair, CS, labels):
    target = {
        "ids": torch.tensor([0, 2, 1, 1, 0, 2]),
        "ids_column": torch.tensor([[0], [2], [1], [1], [0], [2]]),
        "soft": torch.softmax(torch.arange(18.0).reshape(6, 3).sin() * 3, dim=1),
    }[labels]
    check_cross(
        cross3_pair,
        CL.CrossEntropyLoss(cross3_pair[0]),
        CS.CrossEntropyLoss(cross3_pair[1]),
        [ANCHORS, POSITIVES],
        target,
    )


def test_cross_entropy_label_errors(cross3_pair):
    loss = CL.CrossEntropyLoss(cross3_pair[0])
    # Class ids stored as floats (a csv column) are still class ids.
    ids = torch.tensor([0, 2, 1, 1, 0, 2])
    torch.testing.assert_close(loss([ANCHORS, POSITIVES], ids.float()), loss([ANCHORS, POSITIVES], ids))
    with pytest.raises(CL.LossInputError, match=r"labels of shape \(6, 2\).*\[6, 3\]"):
        loss([ANCHORS, POSITIVES], torch.rand(6, 2))
    with pytest.raises(CL.LossInputError, match="fit neither class ids"):
        loss([ANCHORS, POSITIVES], torch.tensor([0.5, 1, 0, 0, 1, 2]))


def test_mse_and_margin_mse(cross_pair, CS):
    check_cross(cross_pair, CL.MSELoss(cross_pair[0]), CS.MSELoss(cross_pair[1]), [ANCHORS, POSITIVES], SCORES)


def test_margin_mse(cross_pair, CS):
    margins = torch.tensor([1.0, 0.5, 2.0, -0.5, 0.0, 3.0])
    check_cross(
        cross_pair,
        CL.MarginMSELoss(cross_pair[0]),
        CS.MarginMSELoss(cross_pair[1]),
        [ANCHORS, POSITIVES, NEGATIVES],
        margins,
    )


@pytest.mark.parametrize("num_negatives", [None, 3])
def test_cross_mnrl(cross_pair, CS, num_negatives):
    check_cross(
        cross_pair,
        CL.MultipleNegativesRankingLoss(cross_pair[0], num_negatives=num_negatives),
        CS.MultipleNegativesRankingLoss(cross_pair[1], num_negatives=num_negatives),
        [ANCHORS, POSITIVES, NEGATIVES],
        None,
        seed=11,
    )


def test_cross_cached_mnrl(cross_pair, CS):
    check_cross(
        cross_pair,
        CL.CachedMultipleNegativesRankingLoss(cross_pair[0], num_negatives=3, mini_batch_size=5),
        CS.CachedMultipleNegativesRankingLoss(cross_pair[1], num_negatives=3, mini_batch_size=5),
        [ANCHORS, POSITIVES, NEGATIVES],
        None,
        seed=11,
    )


DOCS = [
    [POSITIVES[0], NEGATIVES[0], NEGATIVES[1]],
    [POSITIVES[1]],
    [POSITIVES[2], NEGATIVES[2], NEGATIVES2[2], NEGATIVES[3]],
    [NEGATIVES[4], POSITIVES[3]],
]
LIST_LABELS = [
    torch.tensor([2.0, 0.0, 1.0]),
    torch.tensor([1.0]),
    torch.tensor([1.0, 0.0, 3.0, 0.0]),
    torch.tensor([0.0, 1.0]),
]
QUERIES = ANCHORS[:4]


@pytest.mark.parametrize(
    "scheme", ["NoWeightingScheme", "NDCGLoss1Scheme", "NDCGLoss2Scheme", "LambdaRankScheme", "NDCGLoss2PPScheme"]
)
@pytest.mark.parametrize("k", [None, 2])
def test_lambda_loss_schemes(cross_pair, CS, scheme, k):
    check_cross(
        cross_pair,
        CL.LambdaLoss(cross_pair[0], getattr(CL, scheme)(), k=k),
        CS.LambdaLoss(cross_pair[1], getattr(CS, scheme)(), k=k),
        [QUERIES, DOCS],
        LIST_LABELS,
    )


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("ListNetLoss", {}),
        ("ListMLELoss", {}),
        ("PListMLELoss", {}),
        ("PListMLELoss", {"respect_input_order": False}),
        ("RankNetLoss", {"k": 3}),
        ("ListNetLoss", {"mini_batch_size": 3}),
    ],
)
def test_listwise(cross_pair, CS, name, kwargs):
    check_cross(
        cross_pair,
        getattr(CL, name)(cross_pair[0], **kwargs),
        getattr(CS, name)(cross_pair[1], **kwargs),
        [QUERIES, DOCS],
        LIST_LABELS,
    )


def test_cross_errors(cross_pair):
    with pytest.raises(CL.LossInputError, match="BinaryCrossEntropyLoss expects 2"):
        CL.BinaryCrossEntropyLoss(cross_pair[0])([ANCHORS], BIN)
    with pytest.raises(CL.LossInputError, match="list of tensors"):
        CL.ListNetLoss(cross_pair[0])([QUERIES, DOCS], torch.zeros(4))


@pytest.mark.parametrize("name", ["MultipleNegativesRankingLoss", "ListNetLoss"])
def test_cross_prompt_through_the_stream(cross_pair, CS, name):
    """A training config's cross-encoder prompt: rows go through the training stream's read and
    decode (data/pipeline.py, the prompt given to the first column only, as train/run.py does),
    then to our loss; sentence-transformers' same loss gets the raw columns and ``prompt=``."""
    from functools import partial

    import numpy as np
    import pyarrow as pa

    from raytrieve.data.pipeline import DatasetStream, StreamSpec, decode_texts, stream_rows

    prompt = "question: "
    if name == "ListNetLoss":
        raw, labels, lists = {"query": QUERIES, "docs": DOCS}, LIST_LABELS, (False, True)
    else:
        raw, labels, lists = {"a": ANCHORS, "p": POSITIVES, "n": NEGATIVES}, None, (False, False, False)
    d = DatasetStream(list(raw), None, [prompt] + [None] * (len(raw) - 1), None, None, lists)
    spec = StreamSpec("unused: rows of texts load no tokenizer", "cross", [d])
    rows = stream_rows(pa.table(raw), np.arange(len(QUERIES if lists[1] else ANCHORS)), 0, spec)
    inputs = decode_texts(rows, d)
    assert inputs[0][0] == prompt + next(iter(raw.values()))[0] and inputs[1:] == list(raw.values())[1:]
    check_cross(
        cross_pair,
        getattr(CL, name)(cross_pair[0]),
        partial(getattr(CS, name)(cross_pair[1]), prompt=prompt),
        inputs,
        labels,
        seed=11,
        ref_inputs=list(raw.values()),
    )
