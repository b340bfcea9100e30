"""One optimizer step of training, independent of Ray: the loss of each micro-batch
(dict losses summed, components kept for logging), gradient accumulation, clipping, the
optimizer and schedule step. ``train_loop_per_worker`` drives this on every rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class StepResult:
    loss: float
    components: dict[str, float] = field(default_factory=dict)
    learning_rate: float = 0.0
    grad_norm: float | None = None


class Stepper:
    """Accumulates ``accumulation_steps`` micro-batches per optimizer step.

    Each micro-batch's loss is divided by the accumulation count, so the gradient of a step
    is the mean over its micro-batches (for per-example-mean losses: the gradient of the
    concatenated batch).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None = None,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = 1.0,
        sync: Any | None = None,
    ) -> None:
        """``sync`` (train/distributed.GradientSync) says when gradients are all-reduced across ranks."""
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.sync = sync
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self._micro = 0
        # Tensors until the step's end: a float() here would wait for the GPU mid-step (see _step).
        self._sum: Tensor | float = 0.0
        self._components: dict[str, Tensor] = {}

    def micro_batch(
        self,
        loss_fn: Callable[[Sequence[Any], Any], Tensor | dict[str, Tensor]],
        features: Sequence[Any],
        labels: Tensor | list[Tensor] | None,
    ) -> StepResult | None:
        """Forward + backward of one micro-batch; returns the step's result when it completed a step."""
        last = self._micro + 1 == self.accumulation_steps
        with self.sync.context(last) if self.sync is not None else contextlib.nullcontext():
            out = loss_fn(features, labels)
            if isinstance(out, dict):
                for k, v in out.items():
                    self._components[k] = self._components.get(k, 0.0) + v.detach().float() / self.accumulation_steps
                loss = torch.stack([v for v in out.values()]).sum()
            else:
                loss = out
            (loss / self.accumulation_steps).backward()
        self._sum = self._sum + loss.detach().float() / self.accumulation_steps
        self._micro += 1
        if not last:
            return None
        if self.sync is not None:
            self.sync.finish()
        return self._step()

    def _step(self) -> StepResult:
        # The loss and gradient norm are read (float()) after the optimizer step is queued, so
        # the GPU is waited for once per step, at its end: on a GPU a read waits for every kernel
        # before it, and two reads mid-step left it idle while the CPU launched the rest
        # (benchmarks/train_gpu.py).
        grad_norm = None
        if self.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        lr = self._base_rate()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        result = StepResult(
            float(self._sum),
            {k: float(v) for k, v in self._components.items()},
            lr,
            None if grad_norm is None else float(grad_norm),
        )
        self._micro, self._sum, self._components = 0, 0.0, {}
        return result

    def _base_rate(self) -> float:
        """The rate of the configured ``learning_rate`` at this step (its schedule factor applied):
        under ``learning_rate_mapping`` the first parameter group may be a mapped one, whose rate
        is not the run's. Every group shares the schedule's factor (LambdaLR keeps initial_lr)."""
        group = self.optimizer.param_groups[0]
        base = self.optimizer.defaults["lr"]
        return float(base * group["lr"] / group["initial_lr"]) if group.get("initial_lr") else float(base)
