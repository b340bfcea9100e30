"""In-batch negatives across data-parallel ranks.

``all_gather_with_grad`` concatenates a tensor from every rank, in rank order, keeping the
autograd graph: in backward, the gradient of the gathered tensor is summed over ranks
(every rank's loss used every rank's embeddings) and each rank keeps the slice of its own
rows. Combined with DDP's gradient averaging this gives exactly the gradient of the mean
loss over the global batch, when each rank averages its loss over its own anchors.

Outside ``torch.distributed`` (or with one process) both functions are the identity, so
the losses run unchanged in a notebook.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        rank, size = world()
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # pyright: ignore[reportIncompatibleMethodOverride]  # torch declares (ctx, *grad_outputs); one output here
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """Rows of every rank, rank 0 first; gradients flow back to the local rows.

    Every rank must pass the same number of rows (the data pipeline guarantees equal batches).
    """
    _, size = world()
    if size == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def local_offset(rows: int) -> int:
    """Index of this rank's first row in a gathered tensor."""
    rank, _ = world()
    return rank * rows
