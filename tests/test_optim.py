"""Parameter groups from learning_rate_mapping, and the warm-up / decay schedules."""

from __future__ import annotations

import pytest
import torch

from raytrieve import DenseEncoder
from raytrieve.modules import Dense, Pooling, Transformer
from raytrieve.train.config import OptimizerConfig, ScheduleConfig
from raytrieve.train.optim import build_optimizer, build_schedule, parameter_groups


@pytest.fixture(scope="module")
def model(tiny_dirs):
    t = Transformer.from_pretrained(tiny_dirs["base"])
    return DenseEncoder([t, Pooling(32), Dense(32, 8)], device="cpu")


def test_learning_rate_mapping_and_no_decay(model):
    groups = parameter_groups(model, OptimizerConfig(learning_rate=1e-5, weight_decay=0.1,
                                                     learning_rate_mapping={r"^stack\.2\.": 1e-3}))
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["stack.2.linear.weight"])]["lr"] == 1e-3
    assert by_param[id(named["stack.2.linear.bias"])]["weight_decay"] == 0.0
    word = "stack.0.auto_model.embeddings.word_embeddings.weight"
    assert by_param[id(named[word])]["lr"] == 1e-5 and by_param[id(named[word])]["weight_decay"] == 0.1
    norm = next(n for n in named if n.endswith("LayerNorm.weight"))
    assert by_param[id(named[norm])]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(named)


@pytest.mark.parametrize("name,mid,end", [("linear", 0.5, 0.0), ("cosine", 0.5, 0.0), ("constant", 1.0, 1.0)])
def test_schedules(model, name, mid, end):
    opt = build_optimizer(model, OptimizerConfig(learning_rate=1.0))
    sched = build_schedule(opt, ScheduleConfig(name=name, warmup_ratio=0.1), total_steps=100)
    lrs = []
    for _ in range(101):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(mid, abs=1e-6) and lrs[100] == pytest.approx(end, abs=1e-6)


@pytest.mark.parametrize("name,hf_name", [("linear", "linear"), ("cosine", "cosine"), ("constant", "constant_with_warmup")])
def test_schedules_equal_transformers_trainer_at_every_step(model, name, hf_name):
    """The oracle: sentence-transformers' trainer (transformers' Trainer) takes its warm-up steps
    from TrainingArguments.get_warmup_steps (rounded up) and its schedule from get_scheduler."""
    from transformers import TrainingArguments, get_scheduler

    for total, ratio in ((5, 0.1), (48, 0.1), (100, 0.1), (7, 0.25), (10, 0.0), (3, 0.5)):
        ours = build_schedule(build_optimizer(model, OptimizerConfig(learning_rate=1.0)),
                              ScheduleConfig(name=name, warmup_ratio=ratio), total_steps=total)
        warmup = TrainingArguments(output_dir="unused", warmup_steps=ratio).get_warmup_steps(total)
        theirs = get_scheduler(hf_name, torch.optim.SGD(model.parameters(), lr=1.0),
                               num_warmup_steps=warmup, num_training_steps=total)
        for step in range(total + 1):
            assert ours.lr_lambdas[0](step) == pytest.approx(theirs.lr_lambdas[0](step), abs=1e-12), (total, ratio, step)
