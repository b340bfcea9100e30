"""Losses by name, for configs: ``build_loss(spec, model)`` turns
``{name: MultipleNegativesRankingLoss, args: {scale: 20}, matryoshka_dims: [384, 128]}``
into the loss object, and says what input columns and labels it needs, so bad configs fail
before any cluster work starts.

A loss that wraps another (SpladeLoss, CSRLoss, MatryoshkaLoss, Matryoshka2dLoss,
AdaptiveLayerLoss) names it in ``inner``, itself a spec::

    name: MatryoshkaLoss
    args: {matryoshka_dims: [384, 256, 128, 64]}
    inner: {name: MultipleNegativesRankingLoss, args: {scale: 20}}

``args.loss`` (sentence-transformers' argument name) is read the same way.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from raytrieve.encoders import similarity as sim
from raytrieve.errors import ConfigError
from raytrieve.train.config import LossSpec  # a config type, defined there so configs load without torch

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

# Losses around a base loss: name -> (an example base for error messages, the default base or None).
WRAPPERS: dict[str, tuple[str, str | None]] = {
    "SpladeLoss": ("SparseMultipleNegativesRankingLoss", None),
    "CSRLoss": ("SparseMultipleNegativesRankingLoss", "SparseMultipleNegativesRankingLoss"),
    "MatryoshkaLoss": ("MultipleNegativesRankingLoss", None),
    "Matryoshka2dLoss": ("MultipleNegativesRankingLoss", None),
    "AdaptiveLayerLoss": ("MultipleNegativesRankingLoss", None),
}
# Arguments without a default, with an example value for the error.
REQUIRED_ARGS: dict[str, tuple[str, str]] = {
    "SpladeLoss": ("document_regularizer_weight", "3e-5"),
    "MatryoshkaLoss": ("matryoshka_dims", "[768, 512, 256, 128, 64]"),
    "Matryoshka2dLoss": ("matryoshka_dims", "[768, 512, 256, 128, 64]"),
}


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
        # Components of SpladeLoss and CSRLoss, not training losses of their own.
        found.pop("FlopsLoss", None)
        found.pop("CSRReconstructionLoss", None)
        return found
    return {n: c for n, c in classes(cross).items() if n != "CrossLoss" and not n.startswith("Listwise")}


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


def inner_spec(spec: LossSpec, where: str = "loss") -> tuple[LossSpec | None, str]:
    """The base loss a wrapping loss names (``inner``, or ``args.loss``) and where it was written."""
    given = spec.args.get("loss") if spec.name in WRAPPERS else None
    if given is None:
        return spec.inner, f"{where}.inner"
    if spec.inner is not None:
        raise ConfigError(f"{where}: give the base loss of {spec.name} once, in {where}.inner or {where}.args.loss")
    if isinstance(given, LossSpec):
        return given, f"{where}.args.loss"
    if not isinstance(given, dict):
        raise ConfigError(
            f"{where}.args.loss: expected a loss spec such as {{name: {WRAPPERS[spec.name][0]}, args: {{...}}}}, "
            f"got {given!r}"
        )
    from raytrieve.config import from_dict

    return from_dict(LossSpec, given, f"{where}.args.loss"), f"{where}.args.loss"


def base_spec(spec: LossSpec, where: str = "loss") -> LossSpec:
    """The loss that meets the data: the innermost base of wrapping losses (their default base if
    they name none). Its columns and labels are the ones a dataset must have.

    Normalises the chain in place (a base given as ``args.loss`` moves to ``inner``; a wrapper's
    default base is written out), so the spec returned is the very one ``build_loss`` builds:
    what a caller sets on it (the trainer's ``gather_across_devices``) takes effect."""
    while spec.name in WRAPPERS:
        inner, inner_where = inner_spec(spec, where)
        if inner is None:
            default = WRAPPERS[spec.name][1]
            if default is None:
                return spec
            inner = LossSpec(default)
        spec.args.pop("loss", None)
        spec.inner = inner
        spec, where = inner, inner_where
    return spec


def build_loss(spec: LossSpec, model: nn.Module, kind: str, where: str = "loss") -> nn.Module:
    """The loss object for ``spec`` on ``model``; every error names the key and the choices."""
    if kind not in KINDS:
        raise ConfigError(f"{where}: model kind {kind!r} must be one of {KINDS}")
    catalogue = _catalogue(kind)
    if spec.name not in catalogue:
        raise ConfigError(f"{where}.name: unknown {kind} loss {spec.name!r}; choose from {sorted(catalogue)}")
    cls = catalogue[spec.name]
    if spec.name in WRAPPERS:
        inner, inner_where = inner_spec(spec, where)
        example, default = WRAPPERS[spec.name]
        if inner is None and default is None:
            raise ConfigError(
                f"{where}.inner: {spec.name} needs a base loss, e.g. inner: {{name: {example}, args: {{...}}}}"
            )
        args = _resolve_args(cls, {k: v for k, v in spec.args.items() if k != "loss"}, f"{where}.args")
        required = REQUIRED_ARGS.get(spec.name)
        if required and required[0] not in args:
            raise ConfigError(f"{where}.args.{required[0]} is required for {spec.name} (e.g. {required[1]})")
        base = build_loss(inner, model, kind, inner_where) if inner is not None else None
        loss = _construct(cls, where, model, base, **args)
    elif spec.inner is not None:
        raise ConfigError(
            f"{where}.inner: {spec.name} wraps no other loss; only {sorted(WRAPPERS)} take an inner loss. "
            "Remove inner, or name the wrapping loss here"
        )
    else:
        loss = _construct(cls, where, model, **_resolve_args(cls, spec.args, f"{where}.args"))
    if spec.matryoshka_dims:
        if kind != "dense":
            raise ConfigError(f"{where}.matryoshka_dims applies to dense models only")
        if spec.name in ("MatryoshkaLoss", "Matryoshka2dLoss"):
            raise ConfigError(
                f"{where}.matryoshka_dims would wrap {spec.name} in a second MatryoshkaLoss; "
                f"give the dimensions once, as {where}.args.matryoshka_dims"
            )
        if spec.name == "AdaptiveLayerLoss":
            # Matryoshka replays one model run per dimension; AdaptiveLayerLoss samples layers per run.
            raise ConfigError(
                f"{where}.matryoshka_dims cannot wrap AdaptiveLayerLoss; use name: Matryoshka2dLoss "
                "(layers and dimensions together)"
            )
        from raytrieve.losses.modifiers import MatryoshkaLoss

        loss = _construct(
            MatryoshkaLoss, f"{where}.matryoshka_dims", model, loss, spec.matryoshka_dims, spec.matryoshka_weights
        )
    return loss


def _construct(cls: type, where: str, *args: Any, **kwargs: Any) -> nn.Module:
    try:
        return cls(*args, **kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except TypeError as e:
        raise ConfigError(f"{where}: cannot build {cls.__name__} ({e})") from None


def needs_labels(spec: LossSpec) -> bool:
    return base_spec(spec).name in NEEDS_LABELS


def text_columns(spec: LossSpec, kind: str) -> tuple[int, int | None]:
    """(fewest, most) text columns the loss accepts."""
    base = base_spec(spec)
    cls = _catalogue(kind).get(base.name)
    if cls is None:
        raise ConfigError(f"unknown {kind} loss {base.name!r}; choose from {loss_names(kind)}")
    return getattr(cls, "columns", (1, None))
