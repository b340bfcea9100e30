"""Losses by name, for configs: ``build_loss(spec, model)`` turns
``{name: MultipleNegativesRankingLoss, args: {scale: 20}, matryoshka_dims: [384, 128]}``
into the loss object, and says what input columns and labels it needs, so bad configs fail
before any cluster work starts.

The names are the classes registered with ``@register(kind)`` (losses/base.py); what a dataset
must hold comes from the class attributes of ``LossContract`` (``columns``, ``needs_labels``,
``listwise``), read off the spec's base loss (``LossSpec.base``). A loss that wraps another
(SpladeLoss, CSRLoss, MatryoshkaLoss, Matryoshka2dLoss, AdaptiveLayerLoss) names it in
``inner``, itself a spec::

    name: MatryoshkaLoss
    args: {matryoshka_dims: [384, 256, 128, 64]}
    inner: {name: MultipleNegativesRankingLoss, args: {scale: 20}}

``args.loss`` (sentence-transformers' argument name) is read the same way.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from torch import nn

from raytrieve.encoders import similarity as sim
from raytrieve.errors import ConfigError, RaytrieveError
from raytrieve.losses.base import KINDS, LossContract, registered
from raytrieve.wrapping_losses import WRAPPING_LOSSES

if TYPE_CHECKING:
    from raytrieve.train.config import LossSpec


def loss_classes(kind: str) -> dict[str, type[LossContract]]:
    """Every loss a config of a ``kind`` model can name: name -> class."""
    import raytrieve.losses  # noqa: F401  (its modules register their classes as they load)

    if kind not in KINDS:
        raise ConfigError(f"model kind {kind!r} must be one of {KINDS}")
    return registered(kind)


def loss_names(kind: str) -> list[str]:
    return sorted(loss_classes(kind))


def _class(name: str, kind: str, where: str | None) -> type[LossContract]:
    classes = loss_classes(kind)
    if name not in classes:
        import difflib

        at = f"{where}: " if where else ""
        close = difflib.get_close_matches(name, list(classes), n=1, cutoff=0.8)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"{at}unknown {kind} loss {name!r}; {hint}choose from {sorted(classes)}")
    return classes[name]


def _resolve_args(cls: type[LossContract], args: dict[str, Any], where: str) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p not in ("self", "model", "loss", "kwargs")]
    unknown = sorted(set(args) - set(valid))
    if unknown and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        raise ConfigError(f"{where}: unknown argument(s) {unknown} for {cls.__name__}; valid: {valid}")
    for arg, example in cls.required_args.items():
        if arg not in args:
            raise ConfigError(f"{where}.{arg} is required for {cls.__name__} (e.g. {example})")
    for arg, value in args.items():  # a number or a flag given as text fails deep in the loss, unnamed
        default = params[arg].default if arg in params else None
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{where}.{arg}: expected true or false (default {default}), got {value!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where}.{arg}: expected a number (default {default}), got {value!r}")
    resolved = dict(args)
    if isinstance(resolved.get("similarity_fct"), str):
        given = resolved["similarity_fct"]
        try:
            name = sim.canonical_name(given)
        except RaytrieveError:
            name = None  # the similarity module's choices include ones no loss takes
        resolved["similarity_fct"] = {"cosine": sim.cosine, "dot": sim.dot}.get(name or "")
        if resolved["similarity_fct"] is None:
            raise ConfigError(f"{where}.similarity_fct: {given!r}; {cls.__name__} takes 'cosine' or 'dot'")
    return resolved


def build_loss(spec: LossSpec, model: nn.Module, kind: str, where: str = "loss") -> nn.Module:
    """The loss object for ``spec`` on ``model``; every error names the key and the choices."""
    if kind not in KINDS:
        raise ConfigError(f"{where}: model kind {kind!r} must be one of {KINDS}")
    cls = _class(spec.name, kind, f"{where}.name")
    wrapping = WRAPPING_LOSSES.get(spec.name)
    if wrapping is not None:
        inner, inner_where = spec.inner_at(where)
        if inner is None and wrapping.default is None:
            raise ConfigError(
                f"{where}.inner: {spec.name} needs a base loss, e.g. inner: {{name: {wrapping.example}, args: {{...}}}}"
            )
        args = _resolve_args(cls, {k: v for k, v in spec.args.items() if k != "loss"}, f"{where}.args")
        base = build_loss(inner, model, kind, inner_where) if inner is not None else None
        loss = _construct(cls, where, model, base, **args)
    elif spec.inner is not None:
        raise ConfigError(
            f"{where}.inner: {spec.name} wraps no other loss; only {sorted(WRAPPING_LOSSES)} take an inner loss. "
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


def base_class(spec: LossSpec, kind: str, where: str | None = None) -> type[LossContract]:
    """The class of the loss that meets the data (``spec.base``): its attributes say what a
    dataset must hold. ``where``: the spec's config key, for the error naming an unknown loss."""
    return _class(spec.base.name, kind, where)


def needs_labels(spec: LossSpec, kind: str | None = None) -> bool:
    """Whether the dataset needs a label column. Without ``kind``: whether the base loss of that
    name needs one in any kind (losses of one name agree across kinds; a test checks)."""
    name = spec.base.name
    return any(cls.needs_labels for k in ([kind] if kind else KINDS) if (cls := loss_classes(k).get(name)))


def text_columns(spec: LossSpec, kind: str) -> tuple[int, int | None]:
    """(fewest, most) text columns the loss accepts."""
    return base_class(spec, kind).columns
