"""Dense losses against sentence-transformers: same tiny model weights, same inputs ->
same loss value and the same gradient on every parameter (abs 1e-5, or rel 1e-4)."""

from __future__ import annotations

import random

import pytest
import torch

import raytrieve.losses as L
from raytrieve import DenseEncoder
from raytrieve.encoders.similarity import dot
from raytrieve.modules import Dense, Pooling, Transformer
from tests.conftest import NO_DROPOUT, tiny_bert_config

ANCHORS = [
    "how do I sort a list",
    "capital of germany",
    "what is photosynthesis",
    "boil an egg",
    "python dictionary get",
    "speed of light",
]
POSITIVES = [
    "sorted(xs) returns a new sorted list",
    "Berlin is the capital of Germany",
    "plants turn light into chemical energy",
    "put the egg in boiling water for nine minutes",
    "dict.get returns a default when the key is missing",
    "light travels at 299,792 km per second",
]
NEGATIVES = [
    "the list of German states",
    "sorting algorithms in C",
    "chlorophyll is green",
    "eggs are laid by hens",
    "a dictionary of the English language",
    "the speed of sound in air",
]
NEGATIVES2 = [n[::-1] for n in NEGATIVES]


def _build(tmp_path, name: str, seed: int, dense: bool = False):
    from transformers import AutoTokenizer, BertModel

    from raytrieve.model_ref import resolve_model

    torch.manual_seed(seed)
    cfg = tiny_bert_config(**NO_DROPOUT)
    hf = tmp_path / f"{name}_hf"
    BertModel(cfg).save_pretrained(hf)
    AutoTokenizer.from_pretrained(resolve_model("all-minilm-l6-v2")).save_pretrained(hf)
    t = Transformer.from_pretrained(hf, max_seq_length=24)
    modules = [t, Pooling(32, "mean")] + ([Dense(32, 16)] if dense else [])
    DenseEncoder(modules, device="cpu").save(tmp_path / name)
    return tmp_path / name


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """The model folders, built once per module; each test loads fresh models from them."""
    root = tmp_path_factory.mktemp("dense_losses")
    return {"model": _build(root, "m", seed=0, dense=True), "guide": _build(root, "guide", seed=7)}


@pytest.fixture
def pair(st, model_dirs):
    """(ours, ref) DenseEncoder / SentenceTransformer with identical weights, in train mode."""
    ours = DenseEncoder(model_dirs["model"], device="cpu").train()
    ref = st.SentenceTransformer(str(model_dirs["model"]), device="cpu").train()
    return ours, ref


@pytest.fixture
def guides(st, model_dirs):
    path = model_dirs["guide"]
    return DenseEncoder(path, device="cpu"), st.SentenceTransformer(str(path), device="cpu")


def _params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def check(pair, ours_loss, ref_loss, columns, labels=None, rtol=1e-4, seed=None):
    """Same value and parameter gradients; ``seed`` seeds Python's random before each side's
    call (the modifiers sample dimensions and layers with it)."""
    ours_model, ref_model = pair
    if seed is not None:
        random.seed(seed)
    got = ours_loss([ours_model.tokenize(c) for c in columns], labels)
    if seed is not None:
        random.seed(seed)
    want = ref_loss([ref_model.preprocess(c) for c in columns], labels)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=rtol)
    got.backward()
    want.backward()
    ours_p = list(_params(ours_model).values())
    ref_p = list(_params(ref_model).values())
    assert len(ours_p) == len(ref_p)
    for a, b in zip(ours_p, ref_p):
        assert a.shape == b.shape
        if b.grad is None:
            assert a.grad is None or torch.count_nonzero(a.grad) == 0
            continue
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=rtol)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ours_p)
    return got


def check_loss_params(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    """The loss's own parameters (a classifier head, a decoder) got the same gradients."""
    ours_p, ref_p = dict(ours.named_parameters()), dict(ref.named_parameters())
    assert ours_p.keys() == ref_p.keys() and ref_p
    for name, b in ref_p.items():
        a = ours_p[name]
        if b.grad is None:
            assert a.grad is None or torch.count_nonzero(a.grad) == 0, name
            continue
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ours_p.values())


@pytest.fixture(scope="module")
def S(st):
    from sentence_transformers import util
    from sentence_transformers.sentence_transformer import losses

    return losses, util


COLS3 = [ANCHORS, POSITIVES, NEGATIVES]


@pytest.mark.parametrize("cols", [2, 3, 4])
def test_mnrl_with_hard_negatives(pair, S, cols):
    losses, _ = S
    columns = [ANCHORS, POSITIVES, NEGATIVES, NEGATIVES2][:cols]
    check(pair, L.MultipleNegativesRankingLoss(pair[0]), losses.MultipleNegativesRankingLoss(pair[1]), columns)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"directions": ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")},
        {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"},
        {"hardness_mode": "hard_negatives", "hardness_strength": 3.0},
        {"hardness_mode": "in_batch_negatives", "hardness_strength": 3.0},
        {"hardness_mode": "all_negatives", "hardness_strength": 3.0, "scale": 7.0},
    ],
)
def test_mnrl_options(pair, S, kwargs):
    losses, _ = S
    check(
        pair,
        L.MultipleNegativesRankingLoss(pair[0], **kwargs),
        losses.MultipleNegativesRankingLoss(pair[1], **kwargs),
        COLS3,
    )


def test_mnrl_dot_similarity_and_symmetric(pair, S):
    losses, util = S
    check(
        pair,
        L.MultipleNegativesRankingLoss(pair[0], similarity_fct=dot, scale=1.0),
        losses.MultipleNegativesRankingLoss(pair[1], similarity_fct=util.dot_score, scale=1.0),
        COLS3[:2],
    )


def test_mn_symmetric(pair, S):
    losses, _ = S
    check(
        pair,
        L.MultipleNegativesSymmetricRankingLoss(pair[0]),
        losses.MultipleNegativesSymmetricRankingLoss(pair[1]),
        COLS3,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"margin_strategy": "relative", "margin": 0.1},
        {"contrast_anchors": False, "contrast_positives": False, "margin": 0.05},
    ],
)
@pytest.mark.parametrize("cols", [2, 3])
def test_gist(pair, guides, S, kwargs, cols):
    losses, _ = S
    check(
        pair,
        L.GISTEmbedLoss(pair[0], guides[0], **kwargs),
        losses.GISTEmbedLoss(pair[1], guides[1], **kwargs),
        COLS3[:cols],
    )


SCORES = torch.tensor([0.9, 0.1, 0.5, 0.5, 0.3, 1.0])
BINARY = torch.tensor([1, 0, 1, 0, 0, 1])


def test_cosent_angle_cosine(pair, S):
    losses, _ = S
    check(pair, L.CoSENTLoss(pair[0]), losses.CoSENTLoss(pair[1]), COLS3[:2], SCORES)


def test_angle(pair, S):
    losses, _ = S
    check(pair, L.AnglELoss(pair[0]), losses.AnglELoss(pair[1]), COLS3[:2], SCORES)


def test_angle_three_columns(pair, S):
    losses, _ = S
    check(pair, L.AnglELoss(pair[0]), losses.AnglELoss(pair[1]), COLS3, None)


def test_cosine_similarity(pair, S):
    losses, _ = S
    check(pair, L.CosineSimilarityLoss(pair[0]), losses.CosineSimilarityLoss(pair[1]), COLS3[:2], SCORES)


@pytest.mark.parametrize("metric", ["EUCLIDEAN", "MANHATTAN", "COSINE_DISTANCE"])
def test_contrastive_and_online(pair, S, metric):
    losses, _ = S
    ours_m, ref_m = getattr(L.SiameseDistanceMetric, metric), getattr(losses.SiameseDistanceMetric, metric)
    check(
        pair,
        L.ContrastiveLoss(pair[0], ours_m, margin=2.0),
        losses.ContrastiveLoss(pair[1], ref_m, margin=2.0),
        COLS3[:2],
        BINARY,
    )


@pytest.mark.parametrize("metric", ["EUCLIDEAN", "COSINE_DISTANCE"])
def test_online_contrastive(pair, S, metric):
    losses, _ = S
    ours_m, ref_m = getattr(L.SiameseDistanceMetric, metric), getattr(losses.SiameseDistanceMetric, metric)
    check(
        pair,
        L.OnlineContrastiveLoss(pair[0], ours_m, margin=2.0),
        losses.OnlineContrastiveLoss(pair[1], ref_m, margin=2.0),
        COLS3[:2],
        BINARY,
    )


@pytest.mark.parametrize("metric", ["COSINE", "EUCLIDEAN", "MANHATTAN"])
def test_triplet(pair, S, metric):
    losses, _ = S
    check(
        pair,
        L.TripletLoss(pair[0], getattr(L.TripletDistanceMetric, metric), triplet_margin=0.5),
        losses.TripletLoss(pair[1], getattr(losses.TripletDistanceMetric, metric), triplet_margin=0.5),
        COLS3,
    )


CLASSES = torch.tensor([0, 1, 0, 2, 1, 2, 0, 1, 2, 0, 1, 2])


@pytest.mark.parametrize(
    "name",
    ["BatchAllTripletLoss", "BatchHardTripletLoss", "BatchSemiHardTripletLoss", "BatchHardSoftMarginTripletLoss"],
)
@pytest.mark.parametrize("distance", ["euclidean_distance", "cosine_distance"])
def test_batch_triplets(pair, S, name, distance):
    losses, _ = S
    texts = ANCHORS + POSITIVES
    kw = {} if name == "BatchHardSoftMarginTripletLoss" else {"margin": 0.3}
    ours = getattr(L, name)(pair[0], distance_metric=getattr(L.BatchHardTripletLossDistanceFunction, distance), **kw)
    ref = getattr(losses, name)(
        pair[1], distance_metric=getattr(losses.BatchHardTripletLossDistanceFunction, distance), **kw
    )
    check(pair, ours, ref, [texts], CLASSES)


def test_softmax(pair, S):
    losses, _ = S
    torch.manual_seed(5)
    ours = L.SoftmaxLoss(pair[0], embedding_dimension=16, num_labels=3, concatenation_sent_multiplication=True)
    torch.manual_seed(5)
    ref = losses.SoftmaxLoss(pair[1], embedding_dimension=16, num_labels=3, concatenation_sent_multiplication=True)
    check(pair, ours, ref, COLS3[:2], torch.tensor([0, 1, 2, 2, 1, 0]))
    check_loss_params(ours.classifier, ref.classifier)


def test_mse_distillation(pair, S):
    losses, _ = S
    torch.manual_seed(1)
    teacher = torch.randn(6, 16)
    check(pair, L.MSELoss(pair[0]), losses.MSELoss(pair[1]), COLS3[:2], teacher)
    per_column = torch.randn(6, 2, 16)
    check(pair, L.MSELoss(pair[0]), losses.MSELoss(pair[1]), COLS3[:2], per_column)


@pytest.mark.parametrize(
    "labels",
    [
        torch.tensor([0.5, 1.0, -0.2, 3.0, 0.0, 0.1]),
        torch.tensor(
            [[2.0, 1.0, 0.5], [1.0, 1.5, 0.0], [3.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [5.0, 1.0, 1.0]]
        ),
    ],
)
def test_margin_mse(pair, S, labels):
    losses, _ = S
    cols = COLS3 if labels.dim() == 1 else [*COLS3, NEGATIVES2]
    check(pair, L.MarginMSELoss(pair[0]), losses.MarginMSELoss(pair[1]), cols, labels)


@pytest.mark.parametrize("mini", [1, 4, 32])
def test_cached_mnrl_matches_sentence_transformers(pair, S, mini):
    losses, _ = S
    check(
        pair,
        L.CachedMultipleNegativesRankingLoss(pair[0], mini_batch_size=mini),
        losses.CachedMultipleNegativesRankingLoss(pair[1], mini_batch_size=mini),
        COLS3,
    )


def test_cached_variants(pair, guides, S):
    losses, _ = S
    check(
        pair,
        L.CachedMultipleNegativesSymmetricRankingLoss(pair[0], mini_batch_size=4),
        losses.CachedMultipleNegativesSymmetricRankingLoss(pair[1], mini_batch_size=4),
        COLS3,
    )


def test_cached_gist(pair, guides, S):
    losses, _ = S
    check(
        pair,
        L.CachedGISTEmbedLoss(pair[0], guides[0], mini_batch_size=4, margin=0.05),
        losses.CachedGISTEmbedLoss(pair[1], guides[1], mini_batch_size=4, margin=0.05),
        COLS3,
    )


def test_cached_gradients_equal_uncached(tmp_path):
    """GradCache changes memory, not math: same loss and gradients as plain MNRL on the same batch."""
    path = _build(tmp_path, "c", seed=2, dense=True)
    grads = []
    for make in (
        lambda m: L.MultipleNegativesRankingLoss(m),
        lambda m: L.CachedMultipleNegativesRankingLoss(m, mini_batch_size=2),
    ):
        model = DenseEncoder(path, device="cpu").train()
        value = make(model)([model.tokenize(c) for c in COLS3], None)
        value.backward()
        grads.append((value.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-6, rtol=1e-5)
    assert len(grads[0][1]) == len(grads[1][1])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_column_errors_name_the_loss(pair):
    model = pair[0]
    with pytest.raises(L.LossInputError, match=r"MultipleNegativesRankingLoss expects at least 2 input column"):
        L.MultipleNegativesRankingLoss(model)([model.tokenize(ANCHORS)])
    with pytest.raises(L.LossInputError, match=r"CoSENTLoss needs a label column"):
        L.CoSENTLoss(model)([model.tokenize(ANCHORS), model.tokenize(POSITIVES)], None)
    with pytest.raises(L.LossInputError, match=r"TripletLoss expects 3 input column"):
        L.TripletLoss(model)([model.tokenize(ANCHORS), model.tokenize(POSITIVES)])


@pytest.mark.parametrize("mini", [True, False])
def test_mega_batch_margin(pair, S, mini):
    losses, _ = S
    check(
        pair,
        L.MegaBatchMarginLoss(pair[0], use_mini_batched_version=mini, mini_batch_size=4),
        losses.MegaBatchMarginLoss(pair[1], use_mini_batched_version=mini, mini_batch_size=4),
        COLS3[:2],
    )


def test_contrastive_tension(pair, S):
    losses, _ = S
    same = [ANCHORS[0], ANCHORS[1], ANCHORS[2], POSITIVES[0], ANCHORS[4], ANCHORS[5]]
    check(pair, L.ContrastiveTensionLoss(pair[0]), losses.ContrastiveTensionLoss(pair[1]), [ANCHORS, same])
    check(
        pair,
        L.ContrastiveTensionLossInBatchNegatives(pair[0]),
        losses.ContrastiveTensionLossInBatchNegatives(pair[1]),
        [ANCHORS],
    )


def test_denoising_auto_encoder(st, tmp_path, S):
    losses, _ = S
    path = _build(tmp_path, "dae", seed=0)  # the decoder cross-attends to the 32-d pooled embedding
    ours_model = DenseEncoder(path, device="cpu").train()
    ref_model = st.SentenceTransformer(str(path), device="cpu").train()
    pair = (ours_model, ref_model)
    torch.manual_seed(21)
    ours = L.DenoisingAutoEncoderLoss(ours_model)
    torch.manual_seed(21)
    ref = losses.DenoisingAutoEncoderLoss(ref_model)
    damaged = [" ".join(s.split()[::2]) for s in POSITIVES]
    # Tied: the encoder's word embeddings are now the decoder's.
    encoder_words = ours_model.stack[0].auto_model.embeddings.word_embeddings.weight
    assert encoder_words is ours.decoder.bert.embeddings.word_embeddings.weight
    check(pair, ours, ref, [damaged, POSITIVES])
    check_loss_params(ours.decoder, ref.decoder)  # cross-attention and LM head included
