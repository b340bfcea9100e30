"""Losses built from config specs, with errors that name the key and the choices."""

from __future__ import annotations

import pytest

from raytrieve import DenseEncoder, SparseEncoder
from raytrieve.errors import ConfigError
from raytrieve.losses import MatryoshkaLoss, MultipleNegativesRankingLoss
from raytrieve.losses.registry import LossSpec, build_loss, loss_names, needs_labels, text_columns
from raytrieve.losses.sparse import SpladeLoss
from raytrieve.modules import Pooling, Transformer


@pytest.fixture(scope="module")
def dense(tiny_dirs):
    t = Transformer.from_pretrained(tiny_dirs["base"])
    return DenseEncoder([t, Pooling(32)], device="cpu")


def test_catalogue_covers_the_three_kinds():
    assert {"MultipleNegativesRankingLoss", "CachedGISTEmbedLoss", "MatryoshkaLoss", "CoSENTLoss"} <= set(loss_names("dense"))
    assert {"SpladeLoss", "SparseMultipleNegativesRankingLoss"} <= set(loss_names("sparse"))
    assert {"LambdaLoss", "BinaryCrossEntropyLoss", "ListNetLoss"} <= set(loss_names("cross"))


def test_build_dense_with_matryoshka(dense):
    loss = build_loss(LossSpec("MultipleNegativesRankingLoss", {"scale": 10.0, "similarity_fct": "dot"},
                               matryoshka_dims=[32, 16]), dense, "dense")
    assert isinstance(loss, MatryoshkaLoss) and isinstance(loss.loss, MultipleNegativesRankingLoss)
    assert loss.loss.scale == 10.0 and loss.matryoshka_dims == (32, 16)
    assert not needs_labels(LossSpec("MultipleNegativesRankingLoss"))
    assert needs_labels(LossSpec("CoSENTLoss")) and text_columns(LossSpec("TripletLoss"), "dense") == (3, 3)


def test_build_splade(tiny_dirs):
    model = SparseEncoder(tiny_dirs["mlm"], device="cpu")
    spec = LossSpec("SpladeLoss", {"document_regularizer_weight": 3e-5, "query_regularizer_weight": 5e-5},
                    inner=LossSpec("SparseMultipleNegativesRankingLoss"))
    assert isinstance(build_loss(spec, model, "sparse"), SpladeLoss)
    assert text_columns(spec, "sparse") == (2, None)


def test_errors_name_the_problem(dense):
    with pytest.raises(ConfigError, match=r"unknown dense loss 'MNRL'; choose from \["):
        build_loss(LossSpec("MNRL"), dense, "dense")
    with pytest.raises(ConfigError, match=r"loss.args: unknown argument\(s\) \['temperatur'\]"):
        build_loss(LossSpec("MultipleNegativesRankingLoss", {"temperatur": 0.05}), dense, "dense")
    with pytest.raises(ConfigError, match="SpladeLoss needs a base loss"):
        build_loss(LossSpec("SpladeLoss", {"document_regularizer_weight": 1e-3}), dense, "sparse")
