"""Losses by name, for configs: ``build_loss(spec, model)`` turns
``{name: MultipleNegativesRankingLoss, args: {scale: 20}, matryoshka_dims: [384, 128]}``
into the loss object, and says what input columns and labels it needs, so bad configs fail
before any cluster work starts.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from raytrieve.encoders import similarity as sim
from raytrieve.errors import ConfigError

# Losses whose call needs a label column (the others take texts only).
NEEDS_LABELS = {
    "CoSENTLoss",
    "AnglELoss",
    "CosineSimilarityLoss",
    "ContrastiveLoss",
    "OnlineContrastiveLoss",
    "SoftmaxLoss",
    "MSELoss",
    "MarginMSELoss",
    "DistillKLDivLoss",
    "BatchAllTripletLoss",
    "BatchHardTripletLoss",
    "BatchSemiHardTripletLoss",
    "BatchHardSoftMarginTripletLoss",
    "SparseCoSENTLoss",
    "SparseAnglELoss",
    "SparseCosineSimilarityLoss",
    "SparseMSELoss",
    "SparseMarginMSELoss",
    "SparseDistillKLDivLoss",
    "BinaryCrossEntropyLoss",
    "CrossEntropyLoss",
    "LambdaLoss",
    "RankNetLoss",
    "ListNetLoss",
    "ListMLELoss",
    "PListMLELoss",
}
KINDS = ("dense", "sparse", "cross")


def _catalogue(kind: str) -> dict[str, type]:
    import raytrieve.losses as dense
    from raytrieve.losses import cross, sparse

    def classes(module, own: bool = True) -> dict[str, type]:
        return {
            n: c
            for n, c in vars(module).items()
            if inspect.isclass(c)
            and issubclass(c, nn.Module)
            and (n.endswith("Loss") or n.endswith("InBatchNegatives"))
            and (not own or c.__module__ == module.__name__)
        }

    if kind == "dense":
        return {n: c for n, c in classes(dense, own=False).items() if n != "Loss"}
    if kind == "sparse":
        found = classes(sparse)
        found.pop("FlopsLoss", None)  # a regularizer inside SpladeLoss, not a training loss
        return found
    return {n: c for n, c in classes(cross).items() if n != "CrossLoss" and not n.startswith("Listwise")}


@dataclass
class LossSpec:
    """One loss in a config. ``inner`` is the base loss of SpladeLoss (or of a modifier given by name)."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)
    inner: LossSpec | None = None
    matryoshka_dims: list[int] | None = None
    matryoshka_weights: list[float] | None = None


def loss_names(kind: str) -> list[str]:
    return sorted(_catalogue(kind))


def _resolve_args(cls: type, args: dict[str, Any], where: str) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p not in ("self", "model", "loss", "kwargs")]
    unknown = sorted(set(args) - set(valid))
    if unknown and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        raise ConfigError(f"{where}: unknown argument(s) {unknown} for {cls.__name__}; valid: {valid}")
    resolved = dict(args)
    if isinstance(resolved.get("similarity_fct"), str):
        name = sim.canonical_name(resolved["similarity_fct"])
        resolved["similarity_fct"] = {"cosine": sim.cosine, "dot": sim.dot}.get(name)
        if resolved["similarity_fct"] is None:
            raise ConfigError(f"{where}: similarity_fct must be 'cosine' or 'dot' for {cls.__name__}")
    return resolved


def build_loss(spec: LossSpec, model: nn.Module, kind: str, where: str = "loss") -> nn.Module:
    """The loss object for ``spec`` on ``model``; every error names the key and the choices."""
    if kind not in KINDS:
        raise ConfigError(f"{where}: model kind {kind!r} must be one of {KINDS}")
    catalogue = _catalogue(kind)
    if spec.name not in catalogue:
        raise ConfigError(f"{where}.name: unknown {kind} loss {spec.name!r}; choose from {sorted(catalogue)}")
    cls = catalogue[spec.name]
    args = _resolve_args(cls, spec.args, f"{where}.args")
    if spec.name == "SpladeLoss":
        if spec.inner is None:
            raise ConfigError(
                f"{where}.inner: SpladeLoss needs a base loss, e.g. {{name: SparseMultipleNegativesRankingLoss}}"
            )
        if "document_regularizer_weight" not in args:
            raise ConfigError(f"{where}.args.document_regularizer_weight is required for SpladeLoss (e.g. 3e-5)")
        loss = cls(model, build_loss(spec.inner, model, kind, f"{where}.inner"), **args)
    elif spec.inner is not None:
        raise ConfigError(f"{where}.inner is only used by SpladeLoss")
    else:
        try:
            loss = cls(model, **args)
        except TypeError as e:
            raise ConfigError(f"{where}: cannot build {spec.name} ({e})") from None
    if spec.matryoshka_dims:
        if kind != "dense":
            raise ConfigError(f"{where}.matryoshka_dims applies to dense models only")
        from raytrieve.losses.modifiers import MatryoshkaLoss

        loss = MatryoshkaLoss(model, loss, spec.matryoshka_dims, spec.matryoshka_weights)
    return loss


def needs_labels(spec: LossSpec) -> bool:
    base = spec.inner if spec.name == "SpladeLoss" and spec.inner is not None else spec
    return base.name in NEEDS_LABELS


def text_columns(spec: LossSpec, kind: str) -> tuple[int, int | None]:
    """(fewest, most) text columns the loss accepts."""
    base = spec.inner if spec.name == "SpladeLoss" and spec.inner is not None else spec
    cls = _catalogue(kind).get(base.name)
    if cls is None:
        raise ConfigError(f"unknown {kind} loss {base.name!r}; choose from {loss_names(kind)}")
    return getattr(cls, "columns", (1, None))
