"""The optimizer step: accumulation equals the full batch, dict losses are summed and kept
apart, and training on a fixed batch lowers its loss."""

from __future__ import annotations

import pytest
import torch

import raytrieve.losses as L
from raytrieve import DenseEncoder, SparseEncoder
from raytrieve.losses.sparse import SparseMultipleNegativesRankingLoss, SpladeLoss
from raytrieve.train.config import OptimizerConfig
from raytrieve.train.optim import build_optimizer
from raytrieve.train.step import Stepper
from tests.test_losses_dense import ANCHORS, NEGATIVES, POSITIVES, _build

SCORES = torch.tensor([0.9, 0.1, 0.5, 0.5, 0.3, 1.0])


def test_accumulation_equals_full_batch(tmp_path):
    path = _build(tmp_path, "m", seed=0, dense=True)
    grads: list[list[torch.Tensor]] = []  # what each optimizer step saw
    for parts in (1, 2):
        model = DenseEncoder(path, device="cpu").train()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: keep the gradients, change nothing
        stepper = Stepper(model, opt, accumulation_steps=parts, max_grad_norm=None)
        loss = L.CosineSimilarityLoss(model)
        size = len(ANCHORS) // parts
        result = None
        for k in range(parts):
            s = slice(k * size, (k + 1) * size)
            features = [model.tokenize(ANCHORS[s]), model.tokenize(POSITIVES[s])]
            # capture the gradients just before the optimizer clears them
            opt.zero_grad = lambda set_to_none=True, _m=model: grads.append(
                [p.grad.clone() for p in _m.parameters() if p.grad is not None])
            result = stepper.micro_batch(loss, features, SCORES[s])
            assert (result is None) == (k < parts - 1)
        assert result.loss > 0
        # One step per run, after the last micro-batch, with the gradient of every parameter the
        # loss reaches (all but BERT's pooler, which mean pooling does not use).
        assert len(grads) == parts
        assert len(grads[-1]) == len([p for n, p in model.named_parameters() if "pooler" not in n]) > 0
    assert any(bool(g.abs().sum() > 0) for g in grads[0])
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_dict_losses_and_learning(tmp_path, tiny_dirs):
    model = SparseEncoder(tiny_dirs["mlm"], device="cpu").train()
    loss = SpladeLoss(model, SparseMultipleNegativesRankingLoss(model), document_regularizer_weight=1e-3,
                      query_regularizer_weight=1e-3)
    stepper = Stepper(model, build_optimizer(model, OptimizerConfig(learning_rate=1e-3)))
    features = [model.tokenize(c) for c in (ANCHORS, POSITIVES, NEGATIVES)]
    first = stepper.micro_batch(loss, features, None)
    assert set(first.components) == {"base_loss", "document_regularizer_loss", "query_regularizer_loss"}
    assert abs(sum(first.components.values()) - first.loss) < 1e-5
    for _ in range(5):
        last = stepper.micro_batch(loss, features, None)
    assert last.loss < first.loss  # it learns the batch
    assert last.grad_norm is not None and last.learning_rate == 1e-3


def test_the_logged_rate_is_the_configured_one_under_a_mapping(tmp_path):
    """learning_rate_mapping puts the embeddings in a group of their own rate; the metric was the
    first group's rate, which can be a mapped one. It is the run's rate, scheduled."""
    from raytrieve.train.config import ScheduleConfig
    from raytrieve.train.optim import build_schedule

    model = DenseEncoder(_build(tmp_path, "m", seed=0, dense=True), device="cpu").train()
    cfg = OptimizerConfig(learning_rate=1e-3, learning_rate_mapping={r"embeddings": 5e-5})
    opt = build_optimizer(model, cfg)
    first = opt.param_groups[0]["params"][0]
    assert any(first is p for n, p in model.named_parameters() if "embeddings" in n)  # a mapped group leads
    sched = build_schedule(opt, ScheduleConfig(name="linear", warmup_ratio=0.5), total_steps=4)
    stepper = Stepper(model, opt, sched)
    loss = L.CosineSimilarityLoss(model)
    features = [model.tokenize(ANCHORS), model.tokenize(POSITIVES)]
    rates = [stepper.micro_batch(loss, features, SCORES).learning_rate for _ in range(4)]
    assert rates == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])  # warm-up over 2 steps, then linear decay
