"""Loss modifiers against sentence-transformers: Matryoshka (embeddings path, GradCache path, and
any loss that calls the model itself), AdaptiveLayer and Matryoshka2d. Python's random is
seeded identically on both sides where dimensions or layers are sampled; values and the
gradient of every parameter must match."""

from __future__ import annotations

import random

import pytest
import torch
from tests.test_losses_dense import COLS3, SCORES, _build, _params, check

import raytrieve.losses as L
from raytrieve import DenseEncoder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("modifiers"), "m", seed=0, dense=True)


@pytest.fixture
def pair(st, model_dir):
    """(ours, ref) with identical weights (a Dense head: 16-d embeddings), in train mode."""
    return DenseEncoder(model_dir, device="cpu").train(), st.SentenceTransformer(str(model_dir), device="cpu").train()


@pytest.fixture(scope="module")
def S(st):
    from sentence_transformers.sentence_transformer import losses

    return losses


def test_matryoshka_over_mnrl_and_cosent(pair, S):
    losses = S
    dims = [16, 8, 4]
    check(
        pair,
        L.MatryoshkaLoss(pair[0], L.MultipleNegativesRankingLoss(pair[0]), dims, [1.0, 0.5, 0.25]),
        losses.MatryoshkaLoss(pair[1], losses.MultipleNegativesRankingLoss(pair[1]), dims, [1.0, 0.5, 0.25]),
        COLS3,
    )


@pytest.mark.parametrize("seed", [3, 8])
def test_matryoshka_sampled_dims_follow_python_random(pair, S, seed):
    losses = S
    ours = L.MatryoshkaLoss(pair[0], L.CoSENTLoss(pair[0]), [16, 8, 4, 2], n_dims_per_step=2)
    ref = losses.MatryoshkaLoss(pair[1], losses.CoSENTLoss(pair[1]), [16, 8, 4, 2], n_dims_per_step=2)
    check(pair, ours, ref, COLS3[:2], SCORES, seed=seed)


class CosineRegression(torch.nn.Module):
    """A user's own loss: it calls the model itself and has no compute_loss_from_embeddings."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, features, labels):
        a, b = (self.model(f)["sentence_embedding"] for f in features)
        return ((torch.cosine_similarity(a, b) - labels) ** 2).mean()


def _any_loss(name: str, model, lib):
    if name == "mega_batch":
        return lib.MegaBatchMarginLoss(model, use_mini_batched_version=False)
    return CosineRegression(model)


@pytest.mark.parametrize("n_dims_per_step", [-1, 2])
@pytest.mark.parametrize("inner", ["mega_batch", "user"])
def test_matryoshka_wraps_a_loss_that_calls_the_model(pair, S, inner, n_dims_per_step):
    """Losses without the embeddings split run once per dimension on truncated model outputs."""
    losses = S
    dims, weights = [16, 8, 4], [1.0, 0.5, 0.25]
    labels = None if inner == "mega_batch" else SCORES
    ours = L.MatryoshkaLoss(pair[0], _any_loss(inner, pair[0], L), dims, weights, n_dims_per_step=n_dims_per_step)
    ref = losses.MatryoshkaLoss(
        pair[1], _any_loss(inner, pair[1], losses), dims, weights, n_dims_per_step=n_dims_per_step
    )
    check(pair, ours, ref, COLS3[:2], labels, seed=5)
    assert "forward" not in vars(pair[0])  # the model's own forward is back


def test_matryoshka_wraps_cached_loss(pair, S):
    losses = S
    dims = [16, 8]
    check(
        pair,
        L.MatryoshkaLoss(pair[0], L.CachedMultipleNegativesRankingLoss(pair[0], mini_batch_size=4), dims),
        losses.MatryoshkaLoss(pair[1], losses.CachedMultipleNegativesRankingLoss(pair[1], mini_batch_size=4), dims),
        COLS3,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"n_layers_per_step": -1, "layer_weighting": "log", "kl_temperature": 0.5},
        {"n_layers_per_step": 2, "kl_temperature": 0.0, "layer_weighting": "linear"},
    ],
)
def test_adaptive_layer(pair, S, kwargs):
    losses = S
    ours_model, ref_model = pair
    ours = L.AdaptiveLayerLoss(ours_model, L.MultipleNegativesRankingLoss(ours_model), **kwargs)
    ref = losses.AdaptiveLayerLoss(ref_model, losses.MultipleNegativesRankingLoss(ref_model), **kwargs)
    random.seed(4)
    got = ours([ours_model.tokenize(c) for c in COLS3], None)
    random.seed(4)
    want = ref([ref_model.preprocess(c) for c in COLS3], None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    got.backward()
    want.backward()
    for a, b in zip(_params(ours_model).values(), _params(ref_model).values()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("inner", ["cosent", "mega_batch"])
def test_matryoshka_2d(pair, S, inner):
    losses = S
    kw = {"n_layers_per_step": 2, "n_dims_per_step": 2}
    if inner == "cosent":
        ours = L.Matryoshka2dLoss(pair[0], L.CoSENTLoss(pair[0]), [16, 8, 4], **kw)
        ref = losses.Matryoshka2dLoss(pair[1], losses.CoSENTLoss(pair[1]), [16, 8, 4], **kw)
        check(pair, ours, ref, COLS3[:2], SCORES, seed=9)
    else:  # Matryoshka's forward replay nested inside AdaptiveLayer's recording of the final embeddings
        ours = L.Matryoshka2dLoss(pair[0], _any_loss(inner, pair[0], L), [16, 8, 4], **kw)
        ref = losses.Matryoshka2dLoss(pair[1], _any_loss(inner, pair[1], losses), [16, 8, 4], **kw)
        check(pair, ours, ref, COLS3[:2], None, seed=9)
