"""What every loss shares: calling the model on each input column, checking the columns,
and the split between embedding and loss math that the modifiers (Matryoshka), the
gradient cache (GradCache) and cross-rank gathering rely on.

A loss is called like sentence-transformers': ``loss(features, labels)`` where
``features`` is one tokenized dict per input column (anchor, positive, negatives...).
Losses that work on embeddings implement ``compute_loss_from_embeddings(embeddings, labels)``
so the same math runs on freshly computed, cached, truncated or gathered embeddings.

A loss states what it asks of a dataset as ``LossContract`` class attributes (columns, labels,
listwise) and becomes nameable in configs with ``@register(kind)``; the registry
(losses/registry.py) and the dataset checks read only those.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raytrieve.errors import ConfigError, InputError
from raytrieve.kinds import MODEL_KINDS
from raytrieve.wrapping_losses import WRAPPING_LOSSES

if TYPE_CHECKING:
    from raytrieve.encoders.cross import CrossEncoder

Features = dict[str, Any]


class LossInputError(InputError):
    """The columns or labels given do not fit the loss."""


def merge_columns(columns: Sequence[Features]) -> Features | None:
    """One batch holding several columns' rows (right-padded to a common width), or None
    when they cannot share a forward pass (different keys or non-tensor values)."""
    keys = set(columns[0])
    if any(set(c) != keys for c in columns) or "input_ids" not in keys:
        return None
    width = max(c["input_ids"].shape[1] for c in columns)
    merged: Features = {}
    for key in keys:
        values = [c[key] for c in columns]
        if not all(isinstance(v, Tensor) for v in values):
            if any(v != values[0] for v in values):
                return None
            merged[key] = values[0]
            continue
        if values[0].dim() >= 2:
            values = [F.pad(v, (0, width - v.shape[1])) for v in values]
        merged[key] = torch.cat(values, dim=0)
    return merged


_MERGING = [True]


@contextlib.contextmanager
def column_merging_disabled() -> Iterator[None]:
    """One forward pass per column, on the caller's own feature dicts (adaptive-layer
    training stores each column's hidden states in them between passes)."""
    _MERGING.append(False)
    try:
        yield
    finally:
        _MERGING.pop()


def embed_columns(model: nn.Module, columns: Sequence[Features]) -> list[Tensor]:
    """Sentence embeddings of each column.

    The anchor column runs alone; the remaining columns (positives and negatives, all
    documents) share one forward pass, which is faster than one pass each and, for a
    Router model, keeps them on the same route.
    """
    first = model(columns[0])["sentence_embedding"]
    rest = list(columns[1:])
    if not rest:
        return [first]
    merged = merge_columns(rest) if len(rest) > 1 and _MERGING[-1] else None
    if merged is None:
        return [first, *(model(c)["sentence_embedding"] for c in rest)]
    emb = model(merged)["sentence_embedding"]
    return [first, *emb.reshape(len(rest), -1, *emb.shape[1:]).unbind(0)]


def column_count_fits(n: int, columns: tuple[int, int | None]) -> bool:
    low, high = columns
    return low <= n and (high is None or n <= high)


def describe_column_count(columns: tuple[int, int | None]) -> str:
    low, high = columns
    return f"{low}" if low == high else f"{low} to {high}" if high is not None else f"at least {low}"


KINDS = tuple(MODEL_KINDS)  # kinds.py is the one list of model kinds


class LossContract:
    """What a loss asks of its config and its dataset, read by the registry and the dataset
    checks before any worker starts. A loss states only what differs from these defaults."""

    # (fewest, most) input columns; None = no upper bound.
    columns: ClassVar[tuple[int, int | None]] = (1, None)
    column_names: ClassVar[str] = "texts"
    # The dataset must name a label column (scores, class ids, teacher margins...).
    needs_labels: ClassVar[bool] = False
    # It reads labels where the dataset gives them and makes its own where not. A loss that
    # neither needs nor reads them is refused a label_column: its rows would all train as
    # positives, those labelled 0 too (data/validate.py).
    reads_labels: ClassVar[bool] = False
    # Cross-encoders: the second column holds a list of documents per query and the label
    # column a list of scores per query.
    listwise: ClassVar[bool] = False
    # Its negatives are the batch's other rows (beyond any given negative columns past the
    # fewest ``columns``): with one row per batch and no such column the loss is a constant,
    # and training refuses that before it starts (train/run.py).
    in_batch_negatives: ClassVar[bool] = False
    # Arguments a config must give -> an example value for the error that asks for them.
    required_args: ClassVar[Mapping[str, str]] = {}

    def check_columns(self, n: int) -> None:
        if not column_count_fits(n, self.columns):
            raise LossInputError(
                f"{type(self).__name__} expects {describe_column_count(self.columns)} input column(s) "
                f"({self.column_names}), got {n}"
            )


# kind -> loss name -> class: what configs can name. Filled by @register as the loss modules load.
_REGISTERED: dict[str, dict[str, type[LossContract]]] = {kind: {} for kind in KINDS}

C = TypeVar("C", bound=type[LossContract])


def register(kind: str) -> Callable[[C], C]:
    """Make a loss class nameable in configs of ``kind`` models, under its class name::

        @register("dense")
        class MyLoss(Loss):
            columns = (2, None)
            needs_labels = True

    A loss that wraps a base loss (its constructor takes ``loss``) must also be listed in
    ``raytrieve.wrapping_losses.WRAPPING_LOSSES``, so that configs can find its base without torch."""
    if kind not in KINDS:
        raise ValueError(f"register({kind!r}): kind must be one of {KINDS}")

    def add(cls: C) -> C:
        name, known = cls.__name__, _REGISTERED[kind]
        if not issubclass(cls, LossContract):
            raise TypeError(f"{name}: a registered loss subclasses LossContract (or Loss), which states its contract")
        if name in known and known[name] is not cls:
            raise TypeError(f"{kind} loss {name} is registered twice ({known[name].__module__} and {cls.__module__})")
        wraps = "loss" in inspect.signature(cls.__init__).parameters
        if wraps and name not in WRAPPING_LOSSES:
            raise TypeError(
                f"{name} takes a base loss (its `loss` argument): list it in WRAPPING_LOSSES in "
                "raytrieve/wrapping_losses.py, with a default base or None"
            )
        if not wraps and name in WRAPPING_LOSSES:
            raise TypeError(f"WRAPPING_LOSSES lists {name}, whose constructor takes no base loss (`loss`); remove it")
        known[name] = cls
        return cls

    return add


def unregister(kind: str, name: str) -> None:
    """Forget a registered loss (tests that register one of their own clean up with this)."""
    _REGISTERED[kind].pop(name, None)


def registered(kind: str) -> dict[str, type[LossContract]]:
    """The classes registered for ``kind`` so far (the registry imports every loss module first)."""
    return dict(_REGISTERED[kind])


class Loss(LossContract, nn.Module):
    """Base of the embedding losses: ``forward`` embeds the columns and hands them to
    ``compute_loss_from_embeddings``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @staticmethod
    def check_labels(labels: Tensor | None, rows: int, loss: str, what: str = "one label per row") -> Tensor:
        if labels is None:
            raise LossInputError(f"{loss} needs a label column ({what})")
        if labels.numel() != rows and labels.shape[0] != rows:
            raise LossInputError(f"{loss}: got {labels.shape[0]} labels for {rows} rows ({what})")
        return labels

    def embed(self, features: Sequence[Features]) -> list[Tensor]:
        return embed_columns(self.model, features)

    def prepare(self, features: Sequence[Features]) -> tuple[list[Tensor], dict[str, Any]]:
        """The embeddings of each column, plus any extra inputs of compute_loss_from_embeddings
        (e.g. a guide model's embeddings). Modifiers call this once and the math many times."""
        return self.embed(features), {}

    def forward(self, features: Sequence[Features], labels: Tensor | None = None) -> Tensor:
        features = list(features)
        self.check_columns(len(features))
        embeddings, extra = self.prepare(features)
        return self.compute_loss_from_embeddings(embeddings, labels, **extra)

    def compute_loss_from_embeddings(
        self, embeddings: list[Tensor], labels: Tensor | None, *args: Any, **extra: Any
    ) -> Tensor:  # a subclass names the extras its prepare() gives, if any
        raise NotImplementedError


class CrossLoss(LossContract, nn.Module):
    """Base of the cross-encoder losses (losses/cross.py, losses/listwise.py): the model scores
    (query, document) pairs of text, so ``forward`` takes the text columns, not features."""

    columns = (2, 2)
    column_names = "queries, documents"

    def __init__(self, model: CrossEncoder, activation_fn: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.activation_fn = activation_fn if activation_fn is not None else nn.Identity()

    def logits(self, pairs: Sequence[tuple[str, str]]) -> Tensor:
        """Raw scores [len(pairs), num_labels] (no activation)."""
        features = self.model.tokenize(list(pairs))
        features = {k: v.to(self.model.device) if isinstance(v, Tensor) else v for k, v in features.items()}
        return self.model(features)["scores"]

    def require_single_label(self) -> None:
        if self.model.num_labels != 1:
            raise ConfigError(
                f"{type(self).__name__} needs a model with num_labels=1, this one has {self.model.num_labels}"
            )
