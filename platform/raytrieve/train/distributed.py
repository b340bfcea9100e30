"""Data parallelism over the encoder library: DDP or FSDP around one module that holds the
encoder and every dataset's loss.

DDP wraps ``TrainModule`` (encoder + losses), so one DDP forward computes a micro-batch's
whole loss, however many times the loss calls the encoder (anchor, then documents...), and
the loss's own parameters (e.g. SoftmaxLoss's classifier) are synchronised with the
encoder's. ``find_unused_parameters`` is on because some parameters legitimately get no
gradient in a step: BERT's pooler, the other route of a Router model, another dataset's
loss head.

GradCache losses backpropagate in a hook after the forward has returned, which DDP's
reducer cannot follow; their micro-batches run under ``no_sync`` and the gradients are
averaged with one all-reduce per optimizer step (never one per mini-batch). Gradient
accumulation also syncs only on the last micro-batch of a step.

FSDP shards each transformer block and then the root (embeddings, heads, loss heads).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class TrainModule(nn.Module):
    """The encoder and one loss per dataset; ``forward(dataset, features, labels)`` is that dataset's loss."""

    def __init__(self, encoder: nn.Module, losses: Sequence[nn.Module]) -> None:
        super().__init__()
        self.encoder = encoder
        self.losses = nn.ModuleList(losses)

    def forward(self, dataset: int, features: Sequence[Any], labels: Any) -> Any:
        return self.losses[dataset](features, labels)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_fsdp(module: nn.Module) -> bool:
    """Sharded by ``wrap(..., "fsdp")`` (fully_shard gives the module unshard/reshard)."""
    return distributed() and hasattr(module, "reshard")


def layer_classes(model: nn.Module) -> set[type]:
    """The repeated transformer block classes (BertLayer, ...): FSDP's wrapping unit."""
    classes: set[type] = set()
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            kinds = {type(m) for m in module}
            if len(kinds) == 1 and sum(p.numel() for p in module[0].parameters()) > 0:
                classes |= kinds
    return classes


def wrap(module: TrainModule, strategy: str, device: torch.device) -> nn.Module:
    """DDP wrapper, the FSDP-sharded module (sharded in place), or the module itself (1 process)."""
    if not distributed():
        return module
    return data_parallel(module, strategy, device)


def data_parallel(module: TrainModule, strategy: str, device: torch.device) -> nn.Module:
    """``module`` wrapped for DDP or sharded for FSDP, whatever the world size (benchmarks/train_gpu.py
    wraps a world of one to measure the wrappers' cost; training goes through ``wrap``)."""
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # Each transformer block is its own unit, gathered just before its forward and
        # resharded after; the root holds the rest (embeddings, pooling, heads, loss heads).
        blocks = layer_classes(module.encoder)
        for sub in list(module.encoder.modules()):
            if type(sub) in blocks:
                fully_shard(sub)
        fully_shard(module)
        return module
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


def uses_gradient_cache(loss: nn.Module) -> bool:
    return any(getattr(m, "uses_gradient_cache", False) for m in loss.modules())


class GradientSync:
    """When gradients are synchronised across ranks during one optimizer step."""

    def __init__(self, wrapped: nn.Module, manual: bool) -> None:
        self.wrapped = wrapped
        self.manual = manual and isinstance(wrapped, DistributedDataParallel)

    def context(self, last_micro_batch: bool) -> AbstractContextManager:
        if isinstance(self.wrapped, DistributedDataParallel) and (self.manual or not last_micro_batch):
            return self.wrapped.no_sync()
        set_sync = getattr(self.wrapped, "set_requires_gradient_sync", None)
        if set_sync is not None:  # FSDP
            set_sync(last_micro_batch)
        return contextlib.nullcontext()

    def finish(self) -> None:
        """After the step's last backward: the one all-reduce of the manual mode."""
        if self.manual:  # only ever set for DDP (__init__)
            average_gradients(cast(DistributedDataParallel, self.wrapped).module.parameters())


def average_gradients(params) -> None:
    """Mean of every gradient over ranks, in one flat all-reduce (missing gradients count as 0)."""
    params = [p for p in params if p.requires_grad]
    if not params or not distributed():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # gloo has no AVG
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def mean_across_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value averaged over ranks (every rank must call this with the same keys)."""
    if not values or not distributed():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))
