"""Batched inference, what every encoder's encode / predict runs (``Encoder._batched``): the
device, length-sorted batches, and the run over them that puts rows back in input order.
Token ids made earlier by a separate stage come in as ``Pretokenized``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import Tensor

from raytrieve.encoders import precision
from raytrieve.errors import InputError
from raytrieve.modules import Features

if TYPE_CHECKING:
    from raytrieve.encoders.base import Encoder

# Below this many batches a progress bar is noise.
PROGRESS_MIN_BATCHES = 20


@dataclass
class Pretokenized:
    """Token ids made earlier by ``input_module(task).tokenize_ids`` (prompt included), e.g. by a
    separate tokenizer stage: ``encode(Pretokenized(ids), ...)`` skips tokenization."""

    encoded: dict[str, list[list[int]]]

    def __len__(self) -> int:
        return len(self.encoded["input_ids"])


def slice_inputs(inputs: Sequence[Any], lo: int, hi: int) -> Any:
    """Inputs ``lo`` to ``hi`` of texts, pairs or ``Pretokenized`` ids."""
    if isinstance(inputs, Pretokenized):
        return Pretokenized({k: v[lo:hi] for k, v in inputs.encoded.items()})
    return list(inputs[lo:hi])


def length_batches(lengths: np.ndarray, batch_size: int, token_budget: int | None = None) -> list[np.ndarray]:
    """Row indices per batch, longest texts first.

    With ``token_budget`` a batch grows while its padded size (rows x its longest row) stays
    within the budget, up to ``batch_size`` rows: short texts go in big batches, long ones in
    small batches, so memory per batch is bounded and little compute goes to padding.
    """
    if batch_size <= 0:
        raise InputError(f"batch_size must be a positive integer, got {batch_size}")
    if token_budget is not None and token_budget <= 0:
        raise InputError(f"token_budget must be a positive integer, got {token_budget}")
    order = np.argsort(-np.asarray(lengths), kind="stable")
    if token_budget is None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches, start = [], 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)  # sorted: the first row is the longest
        size = min(batch_size, max(1, token_budget // longest))
        batches.append(order[start : start + size])
        start += size
    return batches


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def run_batches(
    encoder: Encoder,
    inputs: Sequence[Any],
    *,
    batch_size: int,
    task: str | None,
    prompt: str | None,
    device: str | torch.device | Sequence[str | torch.device] | None,
    show_progress_bar: bool | None,
    collect: Callable[[Features], Tensor],
    empty: Tensor,
    token_budget: int | None = None,
    pool: dict[str, Any] | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Run the stack over ``inputs`` (texts or ``Pretokenized``) in batches of similar token
    length; rows in input order (``empty`` when there are no inputs).

    All texts are tokenized up front (one fast-tokenizer call), then sorted by their true
    token count, so each batch pads to nearly its own length. With ``pool`` (encoders/pool.py),
    or a list of devices (a pool for this call alone), chunks of ``chunk_size`` inputs run so in
    the pool's worker processes instead.
    """
    if not len(inputs):
        return empty
    if isinstance(device, (list, tuple)):  # a pool for this call alone
        if pool is not None:
            raise InputError("give pool= or a list of devices, not both")
        started = encoder.start_multi_process_pool(device)
        try:
            return run_batches(
                encoder,
                inputs,
                batch_size=batch_size,
                task=task,
                prompt=prompt,
                device=None,
                show_progress_bar=show_progress_bar,
                collect=collect,
                empty=empty,
                token_budget=token_budget,
                pool=started,
                chunk_size=chunk_size,
            )
        finally:
            encoder.stop_multi_process_pool(started)
    if pool is not None:
        from functools import partial

        from raytrieve.encoders import pool as workers

        job = partial(
            run_batches,
            batch_size=batch_size,
            task=task,
            prompt=prompt,
            show_progress_bar=False,
            collect=collect,
            empty=torch.empty(0),  # a chunk is never empty (and a sparse one would warn on its way)
            token_budget=token_budget,
        )
        return workers.run(workers.check(pool), inputs, job, slice_inputs, chunk_size, show_progress_bar)
    module = encoder.input_module(task)
    encoded = inputs.encoded if isinstance(inputs, Pretokenized) else module.tokenize_ids(inputs, prompt=prompt)
    # Optional on an input module: SparseStaticEmbedding does not mark the prompt.
    prompt_length_of = getattr(module, "prompt_length", None)
    prompt_length = prompt_length_of(prompt) if prompt and prompt_length_of is not None else None
    lengths = np.fromiter((len(x) for x in encoded["input_ids"]), dtype=np.int64, count=len(inputs))
    batches: Iterable[np.ndarray] = length_batches(lengths, batch_size, token_budget)
    order = np.concatenate(batches)
    target = resolve_device(cast("str | torch.device", device)) if device is not None else encoder.device
    if device is not None and target != encoder.device:
        precision.check_dtype(encoder.dtype, target)  # e.g. an int8 model cannot move to a GPU
        encoder.to(target)
    n_batches = len(batches)
    show = show_progress_bar if show_progress_bar is not None else n_batches >= PROGRESS_MIN_BATCHES
    if show:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=n_batches, desc="Batches")
    outputs: list[Tensor] = []
    with encoder.inference(), precision.autocast(encoder.dtype, target):
        for idx in batches:
            batch = {k: [v[i] for i in idx] for k, v in encoded.items()}
            features = module.collate(batch)
            if prompt_length:
                features["prompt_length"] = prompt_length
            features = {k: v.to(target) if isinstance(v, Tensor) else v for k, v in features.items()}
            outputs.append(collect(encoder.forward(features, task=task)))
    stacked = torch.cat(outputs) if outputs else torch.empty(0)
    inverse = torch.from_numpy(np.argsort(order, kind="stable")).to(stacked.device)
    return stacked.index_select(0, inverse)
