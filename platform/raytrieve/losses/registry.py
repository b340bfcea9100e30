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
        other = [k for k in KINDS if k != kind and name in loss_classes(k)]
        if other:  # a loss of another model kind: say so, not "unknown"
            raise ConfigError(
                f"{at}{name} is a {other[0]} loss, and model.kind is {kind}; {hint}choose a {kind} loss "
                f"{sorted(classes)}, or set model.kind: {other[0]} (with a {other[0]} model)"
            )
        raise ConfigError(f"{at}unknown {kind} loss {name!r}; {hint}choose from {sorted(classes)}")
    return classes[name]


def _resolve_args(
    cls: type[LossContract], args: dict[str, Any], where: str, model: nn.Module | None = None
) -> dict[str, Any]:
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
    for arg, value in args.items():
        default = params[arg].default if arg in params else inspect.Parameter.empty
        # Whether the loss takes None here (its annotation says so, or takes anything).
        nullable = arg in params and any(t in str(params[arg].annotation) for t in ("None", "Any"))
        resolved[arg] = _object_arg(cls, arg, value, default, f"{where}.{arg}", model, nullable)
    return resolved


# Arguments that are Python objects in sentence-transformers (a function, an enum member, a
# torch module, a model) are written by name in a config; each is resolved here, on the driver's
# check and again on every worker, so a name that means nothing fails before Ray starts.
_PLAIN = (str, int, float, bool, list, tuple, dict)
# Arguments a config gives by a name (text) only.
_BY_NAME = ("similarity_fct", "distance_metric", "activation_fn", "cos_score_transformation", "loss_fct", "guide")
# Arguments whose value is an object, whatever their default says.
_OBJECTS = (*_BY_NAME, "weighting_scheme", "lambda_weight", "pos_weight", "document_regularizer", "query_regularizer")


def _object_arg(
    cls: type, arg: str, value: Any, default: Any, where: str, model: nn.Module | None, nullable: bool = True
) -> Any:
    """``value`` as the object the loss's ``arg`` takes (``default``: the parameter's default;
    ``nullable``: whether it takes None)."""
    name = cls.__name__
    if value is not None and not isinstance(value, _PLAIN):
        return value  # an object already (a spec built in Python)
    plain_default = default is inspect.Parameter.empty or default is None or isinstance(default, _PLAIN)
    is_object = arg in _OBJECTS or not plain_default
    if value is None:
        if is_object and not nullable:  # null would reach the loss where it calls or reads an object
            raise ConfigError(f"{where}: null is not a value of {name}'s {arg}; leave it out for the default")
        return None
    if arg in _BY_NAME:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: give {name}'s {arg} by its name (text), not {value!r}")
        if arg == "similarity_fct":
            return _similarity(value, default, name, where)
        if arg == "distance_metric":
            return _member(value, default, name, where)
        if arg == "guide":
            return _guide(value, where, model)
        return _torch_module(value, where)  # activation_fn, cos_score_transformation, loss_fct
    if arg == "weighting_scheme":
        from raytrieve.losses import listwise

        schemes = {c.__name__: c for c in (listwise.NDCGLoss2PPScheme, listwise.NDCGLoss2Scheme,
                                           listwise.NDCGLoss1Scheme, listwise.LambdaRankScheme,
                                           listwise.NoWeightingScheme)}  # fmt: skip
        return _named_object(value, schemes, where)
    if arg == "lambda_weight":
        from raytrieve.losses.listwise import PListMLELambdaWeight

        return _named_object(value, {"PListMLELambdaWeight": PListMLELambdaWeight}, where)
    if arg == "pos_weight" and isinstance(value, (int, float)) and not isinstance(value, bool):
        import torch

        return torch.tensor(float(value))
    if is_object:
        # An object a config has no way to write: it would reach the loss as text and fail on the workers.
        raise ConfigError(
            f"{where}: {name} takes a Python object here, not {value!r}, and a config cannot give one; "
            "leave it out for the default, or build the loss in Python"
        )
    return value


def _similarity(given: str, default: Any, loss: str, where: str) -> Any:
    """'cosine' or 'dot' (sentence-transformers' names too: cos_sim, dot_score, util.cos_sim,
    pairwise_cos_sim) as the function of the form the loss takes: a score matrix, or one score per
    pair where its default is a pairwise function (CoSENT, MarginMSE, DistillKLDiv), which also
    takes 'angle' (pairwise_angle_sim: CoSENT with it is AnglE)."""
    from raytrieve.losses.pairwise import pairwise_angle_sim, pairwise_cos_sim, pairwise_dot_score

    bare = given.strip().rsplit(".", 1)[-1].lower().removeprefix("pairwise_")
    pairwise = getattr(default, "__name__", "").lstrip("_").startswith("pairwise")
    try:
        canonical = "angle" if bare in ("angle", "angle_sim") else sim.canonical_name(bare)
    except RaytrieveError:
        canonical = ""  # the similarity module's choices include ones no loss takes
    functions: dict[str, Any] = (
        {"cosine": pairwise_cos_sim, "dot": pairwise_dot_score, "angle": pairwise_angle_sim}
        if pairwise
        else {"cosine": sim.cosine, "dot": sim.dot}
    )
    if canonical not in functions:
        raise ConfigError(f"{where}: {given!r}; {loss} takes {' or '.join(map(repr, functions))}")
    return functions[canonical]


def _member(given: str, default: Any, loss: str, where: str) -> Any:
    """A distance by name: a member of the default's enum (TripletDistanceMetric.EUCLIDEAN, or
    euclidean), or a function beside the default in its class (BatchHardTripletLossDistanceFunction)."""
    import enum
    import sys

    prefix, _, bare = given.strip().rpartition(".")
    bare = bare.lower()
    # The default's enum, or the class whose function it is (BatchHardTripletLossDistanceFunction).
    owner: Any = type(default)
    if not isinstance(default, enum.Enum):
        owner_name = getattr(default, "__qualname__", "").rpartition(".")[0]
        owner = getattr(sys.modules.get(getattr(default, "__module__", ""), None), owner_name, None)
    owner_name = getattr(owner, "__name__", "")
    if prefix and prefix.rsplit(".", 1)[-1] != owner_name:  # TripletDistanceMetric.X given to a loss of another enum
        raise ConfigError(
            f"{where}: {given!r}; {loss} takes a {owner_name} (e.g. {owner_name}.<name>, or the name alone)"
        )
    if isinstance(default, enum.Enum):
        choices = {m.name.lower(): m for m in type(default)} | {str(m.value).lower(): m for m in type(default)}
        shown = [m.name for m in type(default)]
    else:
        names = [n for n in dir(owner) if not n.startswith("_") and callable(getattr(owner, n))] if owner else []
        choices = {n.lower(): getattr(owner, n) for n in names}
        shown = names
    if bare not in choices:
        raise ConfigError(f"{where}: {given!r} is no distance {loss} takes; choose from {shown}")
    return choices[bare]


def _torch_module(given: str, where: str) -> nn.Module:
    """A torch.nn module built without arguments, by its class name (Sigmoid, torch.nn.Identity,
    torch.nn.modules.activation.Tanh, MSELoss): only torch's own classes, never an import of
    the config's choosing."""
    bare = given.strip().rsplit(".", 1)[-1]
    if "." in given.strip() and not given.strip().startswith(("torch.", "nn.")):
        raise ConfigError(f"{where}: {given!r}; name a torch.nn class (e.g. Sigmoid, Identity, MSELoss)")
    classes = {n.lower(): c for n in dir(nn) if inspect.isclass(c := getattr(nn, n)) and issubclass(c, nn.Module)}
    found = classes.get(bare.lower())
    if found is None:
        raise ConfigError(f"{where}: {given!r} is no torch.nn class; name one (e.g. Sigmoid, Identity, MSELoss)")
    try:
        module = found()
    except TypeError as e:
        raise ConfigError(f"{where}: torch.nn.{found.__name__} needs arguments a config cannot give ({e})") from None
    if any(True for _ in module.parameters()) or type(module) is nn.Module:
        # An activation or a loss function: a module with weights (PReLU, Transformer) would train
        # as part of the loss, unasked.
        raise ConfigError(f"{where}: {given!r} is no activation or loss function (e.g. Sigmoid, Identity, MSELoss)")
    return module


def _named_object(given: Any, classes: dict[str, type], where: str) -> Any:
    """``Name`` or ``{name: Name, args: {...}}`` as ``classes[Name](**args)``."""
    name, kwargs = given, {}
    if isinstance(given, dict):
        unknown = sorted(set(given) - {"name", "args"})
        if unknown or not isinstance(given.get("args", {}), dict):
            raise ConfigError(f"{where}: write {{name: ..., args: {{...}}}}; got {given!r}")
        name, kwargs = given.get("name"), given.get("args") or {}
    bare = str(name).strip().rsplit(".", 1)[-1].lower() if isinstance(name, str) else ""
    found = {n.lower(): c for n, c in classes.items()}.get(bare)
    if found is None:
        raise ConfigError(f"{where}: {given!r}; choose from {sorted(classes)}")
    try:
        return found(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: cannot build {found.__name__} ({e})") from None


def _guide(ref: str, where: str, model: nn.Module | None) -> nn.Module:
    """GIST's guide: a dense model by reference, as model.name_or_path takes one, loaded on the
    trained model's device."""
    from raytrieve.encoders import load_encoder
    from raytrieve.kinds import refuse_other_kind
    from raytrieve.model_ref import resolve_field

    path = resolve_field(ref, where)
    refuse_other_kind(path, "dense", f"{where}: {ref}", "name a dense model as the guide")
    device = next((p.device for p in model.parameters()), None) if model is not None else None
    guide = load_encoder("dense", str(path), device=str(device) if device is not None else "cpu")
    # Frozen: it only scores, and the optimizer takes the loss's trainable parameters too.
    guide.requires_grad_(False)
    return guide.eval()


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
        args = _resolve_args(cls, {k: v for k, v in spec.args.items() if k != "loss"}, f"{where}.args", model)
        base = build_loss(inner, model, kind, inner_where) if inner is not None else None
        loss = _construct(cls, where, model, base, **args)
    elif spec.inner is not None:
        raise ConfigError(
            f"{where}.inner: {spec.name} wraps no other loss; only {sorted(WRAPPING_LOSSES)} take an inner loss. "
            "Remove inner, or name the wrapping loss here"
        )
    else:
        loss = _construct(cls, where, model, **_resolve_args(cls, spec.args, f"{where}.args", model))
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
    dataset must hold. Every loss on the way there (SpladeLoss, MatryoshkaLoss, ...) must be one
    of ``kind`` too; ``where``: the spec's config key, so an error names the very key."""
    at: str | None = where
    while True:
        cls = _class(spec.name, kind, f"{at}.name" if at else None)
        wrapping = WRAPPING_LOSSES.get(spec.name)
        if wrapping is None:
            return cls
        inner, inner_at = spec.inner_at(at or "loss")
        if inner is None:
            return cls if wrapping.default is None else _class(wrapping.default, kind, at)
        spec, at = inner, (inner_at if at else None)


def needs_labels(spec: LossSpec, kind: str | None = None) -> bool:
    """Whether the dataset needs a label column. Without ``kind``: whether the base loss of that
    name needs one in any kind (losses of one name agree across kinds; a test checks)."""
    name = spec.base.name
    return any(cls.needs_labels for k in ([kind] if kind else KINDS) if (cls := loss_classes(k).get(name)))


def text_columns(spec: LossSpec, kind: str) -> tuple[int, int | None]:
    """(fewest, most) text columns the loss accepts."""
    return base_class(spec, kind).columns
