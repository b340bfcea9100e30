"""Training on a CPU: dropout masks drawn 16 bits at a time, attention by matrix products.

Profiled on the demo's cross-encoder step (MiniLM-L12, 80 pairs of 128 tokens, bf16 autocast,
2 cores): torch's CPU dropout draws one random number per element through ``bernoulli_`` (~13 ns
each, serially), which was 35-40% of the step; and with no dropout the backward of torch's CPU
flash attention in bf16 took ~110 ms per layer against ~10 ms for the same products as plain
matrix multiplies. Through Ray Train the kernels below gave 1.25x the samples/s for MiniLM-L6
and 1.13x for that reranker (BENCHMARKS.md, "CPU training kernels"). So, on a CPU only:

- every ``nn.Dropout`` of the model becomes a ``MaskDropout``: the same ``p``, the mask drawn by
  numpy's PCG64 as 16-bit integers (a few ns each) from a seed drawn from torch's generator, so
  ``torch.manual_seed``, a checkpoint's saved RNG state and GradCache's replayed RNG state
  reproduce the masks exactly as they do torch's. An element is kept with probability
  ``1 - round(p * 65536) / 65536`` (0.100006 dropped for p = 0.1) and scaled by the inverse of
  that (in the input's dtype, as torch's dropout does: a bf16 scale rounds);
- a transformers model that dispatches attention through ``AttentionInterface`` (BERT and most
  encoders) runs plain training-mode attention as ``softmax(q k^T * scale + mask)`` with the same
  dropout on the probabilities, then ``@ v`` (transformers' eager attention); other attention
  (grouped key/value heads, position biases, soft caps) and eval mode go through transformers'
  SDPA function as before. Its config's attention implementation is not saved.

On a GPU nothing changes: CUDA draws dropout masks in parallel and fused attention kernels
support dropout.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

ATTENTION = "raytrieve_cpu_train"
# transformers' SDPA attention function, for what the matrix-product path does not take (set by _register).
_sdpa_attention_forward: Any = None
_LEVELS = 1 << 16


def mask_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """``x`` with each element zeroed with probability ~``p`` and the rest scaled (see module)."""
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    cut = round(p * _LEVELS)
    if cut <= 0:
        return x
    if cut >= _LEVELS:
        return x * 0.0
    seed = int(torch.randint(0, 2**62, (1,)).item())  # torch's generator stays the one state
    draws = np.random.default_rng(seed).integers(0, _LEVELS, x.numel(), dtype=np.uint16)
    keep = torch.from_numpy(draws.view(np.int16)).view(x.shape) >= cut - _LEVELS // 2
    return x * (keep.to(x.dtype) * (_LEVELS / (_LEVELS - cut)))


class MaskDropout(nn.Dropout):
    """``nn.Dropout`` with :func:`mask_dropout`'s mask; the identity in eval mode."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return input
        return mask_dropout(input, self.p)


def cpu_train_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention interface: training by matrix products, inference by SDPA.

    Only plain attention takes the matrix-product path: equal query and key/value heads and no
    argument it does not implement (T5's ``position_bias``, Gemma's ``softcap``, attention sinks,
    ...). Anything else, and a 4-D mask that is not additive, goes to transformers' SDPA function
    with torch's dropout: correct, at torch's speed."""
    plain = (
        module.training
        and key.shape[1] == query.shape[1]
        and all(v is None or v is False for v in kwargs.values())
        and (attention_mask is None or attention_mask.is_floating_point())
    )
    if not plain:
        p = dropout if module.training else 0.0
        return _sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=p, **kwargs)
    scale = query.size(-1) ** -0.5 if scaling is None else scaling
    weights = torch.matmul(query, key.transpose(2, 3)) * scale
    if attention_mask is not None:
        weights = weights + attention_mask  # additive (transformers' eager mask, registered below)
    weights = F.softmax(weights, dim=-1)
    if dropout > 0.0:
        weights = mask_dropout(weights, dropout)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _register() -> None:
    global _sdpa_attention_forward
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    # Imported here, once, not per call: cpu_train_attention runs in every layer of every step.
    _sdpa_attention_forward = sdpa_attention_forward

    AttentionInterface.register(ATTENTION, cpu_train_attention)
    AttentionMaskInterface.register(ATTENTION, eager_mask)


def use_cpu_kernels(model: nn.Module) -> dict[str, int]:
    """Switch ``model`` (in place) to the kernels above; returns what was switched.

    Call it on a CPU-trained model only. Dropout modules are replaced wherever they sit; a
    transformers model switches attention only if it was on SDPA or eager attention and can
    switch (others keep theirs)."""
    from transformers import PreTrainedModel

    dropouts = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                replacement = MaskDropout(child.p, child.inplace)
                replacement.train(child.training)
                setattr(parent, name, replacement)
                dropouts += 1
    attention = 0
    _register()
    for sub in model.modules():
        if not isinstance(sub, PreTrainedModel) or sub.config._attn_implementation not in ("sdpa", "eager"):
            continue
        if not sub._can_set_attn_implementation():
            continue
        sub.set_attn_implementation(ATTENTION)
        attention += int(sub.config._attn_implementation == ATTENTION)
    log.debug("CPU training kernels: %d dropout module(s), %d attention implementation(s)", dropouts, attention)
    return {"dropout": dropouts, "attention": attention}
