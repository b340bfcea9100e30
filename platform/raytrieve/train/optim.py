"""Optimizer and learning-rate schedule from the training config.

Parameter groups: ``learning_rate_mapping`` gives regexes over parameter names (first match
wins) their own learning rate, e.g. a fresh Dense head or SparseStaticEmbedding learning
faster than the pretrained transformer; biases and LayerNorm weights get no weight decay.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from raytrieve.train.config import OptimizerConfig, ScheduleConfig

_NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


def parameter_groups(model: nn.Module, cfg: OptimizerConfig, extra: nn.Module | None = None) -> list[dict]:
    """Groups over the model's parameters and, named ``loss.*``, those of ``extra`` (a loss's own head)."""
    patterns = [(re.compile(p), lr) for p, lr in cfg.learning_rate_mapping.items()]
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    named = list(model.named_parameters())
    if extra is not None:
        seen = {id(p) for _, p in named}
        named += [(f"loss.{n}", p) for n, p in extra.named_parameters() if id(p) not in seen]
    for name, param in named:
        if not param.requires_grad:
            continue
        lr = next((lr for pattern, lr in patterns if pattern.search(name)), cfg.learning_rate)
        decay = 0.0 if any(name.endswith(s) for s in _NO_DECAY) or param.dim() < 2 else cfg.weight_decay
        groups.setdefault((lr, decay), []).append(param)
    return [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, extra: nn.Module | None = None) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg, extra)
    # On a GPU the fused kernel updates all parameters in a few launches instead of several per
    # tensor (benchmarks/train_gpu.py); CPU keeps torch's default.
    fused = True if groups and all(p.is_cuda for g in groups for p in g["params"]) else None
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=fused)


def build_schedule(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_ratio`` of the steps, then linear decay to 0, cosine decay, or constant.
    The warm-up rounds up, as transformers' Trainer (sentence-transformers' trainer) does: 5 steps
    at 0.1 warm up over 1, not 0."""
    warmup = math.ceil(total_steps * cfg.warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if cfg.name == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
