"""The losses that wrap a base loss, by name: a module with no imports, read by the configs
(``LossSpec.base`` in train/config.py) and checked by ``@register`` (losses/base.py), so
neither the library reaches the platform's config nor configs reach torch."""

from __future__ import annotations

from typing import NamedTuple


class Wrapping(NamedTuple):
    example: str  # a base loss to show in errors
    default: str | None  # the base used when a config names none; None: a config must name one


# A table of names rather than attributes of the loss classes because LossSpec.base must work
# without torch (Ray's controller and Ray Data's tasks unpickle specs and never import it).
# @register refuses a class whose constructor takes a base loss (``loss``) and is missing here,
# or the reverse, so the two cannot drift apart.
WRAPPING_LOSSES: dict[str, Wrapping] = {
    "SpladeLoss": Wrapping("SparseMultipleNegativesRankingLoss", None),
    "CSRLoss": Wrapping("SparseMultipleNegativesRankingLoss", "SparseMultipleNegativesRankingLoss"),
    "MatryoshkaLoss": Wrapping("MultipleNegativesRankingLoss", None),
    "Matryoshka2dLoss": Wrapping("MultipleNegativesRankingLoss", None),
    "AdaptiveLayerLoss": Wrapping("MultipleNegativesRankingLoss", None),
}
