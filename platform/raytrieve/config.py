"""Typed configs: pydantic models read from YAML (or a dict), ``key=value`` overrides, clear errors.

Every config is a ``ConfigModel``: unknown keys are errors, values are checked strictly
against their annotations (``true`` is not an integer), cross-field rules are model
validators, and each field's ``description`` is its entry in docs/config-reference.md.
``from_dict(TrainConfig, yaml_dict, where="jobs/configs/x.yaml")`` validates and turns
pydantic's errors into one ``ConfigError`` that names each key (prefixed by ``where``),
lists the valid keys of a mapping that has an unknown one, and gives, for a value that
fits no alternative of a union, why each alternative refused it (a key that takes one mapping
or a list of them, ``X | list[X]``, reports only the errors of the shape it was given).
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, TypeVar, Union, cast

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from raytrieve.errors import ConfigError

M = TypeVar("M", bound="ConfigModel")


class ConfigModel(BaseModel):
    """The base of every config. Strict, so YAML's ``yes`` or ``1`` is not read as a boolean
    and ``true`` is not an integer; ``validate_assignment`` stays off because LossSpec writes
    its normalised chain in place (train/config.py)."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False)

    @field_validator("*", mode="before")
    @classmethod
    def _yaml_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML 1.1 reads ``2e-5`` (no dot) as a string: a float field accepts what float() does,
        and a path field accepts a string."""
        if not isinstance(value, str) or info.field_name is None:
            return value
        members = _members(cls.model_fields[info.field_name].annotation)
        if float in members and str not in members:
            try:
                return float(value)
            except ValueError:
                return value
        if Path in members:
            return Path(value)
        return value

    def check(self: M, where: str = "config") -> M:
        """Validate again (after changes made in Python), errors prefixed by ``where``."""
        from_dict(type(self), self.model_dump(), where)
        return self


# The format a model computes in at inference (raytrieve.encoders.precision, which reads this).
Dtype = Literal["auto", "float32", "bfloat16", "float16", "int8"]
Backend = Literal["torch", "onnx"]  # what runs a model's transformers at inference (encoders/onnx_runtime.py)


def dtype_field() -> Any:
    """The ``dtype`` key of every config that loads a model for inference (one description)."""
    return Field(
        default="auto",
        description=(
            "the format the model computes in: auto (bfloat16 on a CPU with AMX/AVX-512 BF16 or a bf16 GPU, "
            "float16 on other GPUs, else float32; only if the model passes its quality guard), float32 "
            "(exact), bfloat16, float16, or int8 (dynamic quantisation, CPU)"
        ),
    )


def trust_remote_code_field() -> Any:
    """The ``trust_remote_code`` key of every config that loads a model (one description)."""
    return Field(
        default=False,
        description=(
            "let the model folder run code of its own: transformers' custom model classes and activation "
            "classes outside torch.nn; never read from a saved config"
        ),
    )


def invalid(key: str, text: str) -> NoReturn:
    """Refuse a value from a model validator: the message is ``<where>.<key><text>`` (or
    ``<where><text>`` without a key), so it reads the same at any nesting depth."""
    raise PydanticCustomError("raytrieve", "{text}", {"text": text, "key": key})


def refuse_uri(value: str, what: str = "") -> str:
    """``value`` unless it is a URI: for a path that is written (or memory-mapped) on a local or
    shared disk, where a URI would become a local folder named ``s3:``. ``what`` (a config key or
    flag) prefixes the message for a ConfigError; without it the message fits ``invalid``'s."""
    if "://" not in value:
        return value
    text = (
        f" {value}: a URI, but this is written or read on a local or shared disk (a path that every node "
        "reaches); give such a path, and copy to or from the object store outside raytrieve"
    )
    if what:
        raise ConfigError(f"{what}{text}")
    raise PydanticCustomError("raytrieve", "{text}", {"text": text, "key": ""})


# A config path on a local or shared disk (an output folder, a memory-mapped index): a URI is refused.
LocalPath = Annotated[str, AfterValidator(refuse_uri)]


def _members(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return tuple(a for a in typing.get_args(tp) if a is not type(None))
    return (tp,)


def _model_in(tp: Any) -> type[BaseModel] | None:
    """The model a value of type tp is (X, X | None), or None."""
    members = _members(tp)
    if len(members) == 1 and isinstance(members[0], type) and issubclass(members[0], BaseModel):
        return members[0]
    return None


def one_or_list(tp: Any) -> type[BaseModel] | None:
    """X when tp is ``X | list[X]`` (or with None): a key that takes one mapping or a list of them."""
    members = _members(tp)
    if len(members) != 2:
        return None
    model = next((m for m in members if isinstance(m, type) and issubclass(m, BaseModel)), None)
    listed = next((m for m in members if typing.get_origin(m) is list), None)
    return model if model is not None and listed is not None and typing.get_args(listed) == (model,) else None


def _walk(cls: type[BaseModel], loc: tuple[str | int, ...]) -> tuple[str, type[BaseModel] | None]:
    """(the key path ``a.b[0].c`` of loc, with ``(as T)`` after a union alternative T, the model at
    its end or None). Union tags are the parts of pydantic's loc that name an alternative."""
    text, tp = _walk_type(cls, loc)
    return text, _model_in(tp)


def _walk_type(cls: type[BaseModel], loc: tuple[str | int, ...]) -> tuple[str, Any]:
    """``_walk``'s key path, and the annotation at its end. The alternatives of ``X | list[X]``
    leave no trace in the path: its shape already says which one was read."""
    text, tp = "", cast(Any, cls)
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
            args = typing.get_args(_members(tp)[0])
            tp = args[0] if args else Any
            continue
        model = _model_in(tp)
        members = _members(tp)
        one = one_or_list(tp)
        if one is not None:
            tp = one if part == one.__name__ else list[one]
            continue
        if model is None and len(members) > 1:  # part names the alternative pydantic tried
            text += f" (as {part})"
            tp = next((m for m in members if getattr(m, "__name__", None) == part), Any)
            continue
        if model is not None and part in model.model_fields:
            text += f".{part}"
            tp = model.model_fields[part].annotation
            continue
        text += f".{part}"  # a mapping key
        args = typing.get_args(members[0]) if members else ()
        tp = args[1] if len(args) == 2 else Any
    return text, tp


_SHAPE_ERRORS = {"model_type", "model_attributes_type", "dict_type", "list_type"}


def _shape_of_value(cls: type[BaseModel], errors: list[Any]) -> list[Any]:
    """For a key of type ``X | list[X]``, pydantic reports why each alternative refused the value:
    keep only the errors of the shape the value has (a mapping: X's; a list: the list's), and one
    error for a value of neither shape."""
    refused: dict[tuple[Any, ...], dict[str, Any]] = {}  # the key's loc -> alternative -> its error
    for e in errors:
        loc = tuple(e["loc"])
        if e["type"] in _SHAPE_ERRORS and loc and one_or_list(_walk_type(cls, loc[:-1])[1]) is not None:
            refused.setdefault(loc[:-1], {})[str(loc[-1])] = e
    if not refused:
        return errors
    out: list[Any] = []
    for key, alternatives in refused.items():
        if len(alternatives) == 2:  # neither shape
            out.append({"type": "one_or_list", "loc": key, "input": next(iter(alternatives.values()))["input"]})
    for e in errors:
        loc = tuple(e["loc"])
        if not any(loc[: len(key) + 1] in {(*key, alt) for alt in alts} for key, alts in refused.items()):
            out.append(e)
    return out


_EXPECTED = {
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "tuple_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "path_type": "expected a path",
    "one_or_list": "expected a mapping or a list of mappings",
}


def validation_messages(cls: type[BaseModel], error: ValidationError, where: str) -> list[str]:
    """Each problem pydantic found in data for ``cls``, as ``<where>.<key path>: what is wrong``."""
    out: list[str] = []
    unknown: dict[str, tuple[list[str], type[BaseModel] | None]] = {}
    for e in _shape_of_value(cls, list(error.errors(include_url=False))):
        loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            parent, model = _walk(cls, loc[:-1])
            unknown.setdefault(parent, ([], model))[0].append(str(loc[-1]))
            continue
        path, _ = _walk(cls, loc)
        at = f"{where}{path}"
        if e["type"] == "missing":
            parent, _ = _walk(cls, loc[:-1])
            out.append(f"{where}{parent}: missing required key {loc[-1]!r}")
        elif e["type"] == "raytrieve":
            key = e.get("ctx", {}).get("key", "")
            out.append(f"{at}.{key}{e['msg']}" if key else f"{at}{e['msg']}")
        elif e["type"] == "literal_error":
            out.append(f"{at}: {e['input']!r} is not one of {e.get('ctx', {}).get('expected', '')}")
        elif e["type"] in _EXPECTED:
            out.append(f"{at}: {_EXPECTED[e['type']]}, got {e['input']!r}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            out.append(f"{at}: {msg[:1].lower()}{msg[1:]}, got {e['input']!r}")
    for parent, (keys, model) in unknown.items():
        valid = f"; valid keys are {sorted(model.model_fields)}" if model is not None else ""
        # Where a name from another tool (sentence-transformers' training arguments) lives here.
        moved = getattr(model, "KEYS_ELSEWHERE", {}) if model is not None else {}
        place = moved if callable(moved) else moved.get  # a table, or a function of the key
        hints = [f"{k} is {where_} here" for k in sorted(keys) if (where_ := place(k))]
        hint = f" ({'; '.join(hints)})" if hints else ""
        out.insert(0, f"{where}{parent}: unknown key(s) {sorted(keys)}{hint}{valid}")
    return out if where else [m.removeprefix(".") for m in out]


def from_dict(cls: type[M], data: Any, where: str = "config", overrides: Sequence[str] = ()) -> M:
    """Validate ``data`` as ``cls``; the ConfigError names every wrong key (under ``where``) and the fix,
    and the ``overrides`` (``key.path=value``, already merged into ``data``) that set a wrong key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        messages = [_blame_override(m, where, overrides) for m in validation_messages(cls, e, where)]
        raise ConfigError(messages[0] if len(messages) == 1 else "; ".join(messages)) from None


def _blame_override(message: str, where: str, overrides: Sequence[str]) -> str:
    """``message`` with " (set by the override k=v)" when an override set the key it is about:
    the key itself, or an unknown key under the path it names."""
    for item in overrides:
        names = item.split("=", 1)[0].split(".")
        parts = [f"[{p}]" if p.isdigit() else f".{p}" for p in names]
        path = where + "".join(parts)
        unknown = any(
            message.startswith(lead := f"{where}{''.join(parts[:i])}: unknown key(s) ")
            # the unknown keys' list only: the valid keys named after it are the override's own
            and repr(name) in message[len(lead) :].split("]", 1)[0]
            for i, name in enumerate(names)
        )
        # A key under a plain value (corpus.path.x=5) made that value a mapping: the error is the
        # value's, naming the mapping the override wrote ({'x': 5}).
        nested = any(
            message.startswith(f"{where}{''.join(parts[:i])}: ") and f"{{{names[i]!r}:" in message
            for i in range(1, len(names))
        )
        if message.startswith((f"{path}:", f"{path}.", f"{path}[")) or unknown or nested:
            return f"{message} (set by the override {item})"
    return message


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", "model.name=x"]`` -> nested dict, values as ``_override_value``
    reads them (YAML scalars and flow collections, other text as written)."""

    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        value = _override_value(item, raw)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return out


# Numbers as YAML 1.2's core schema writes them (PyYAML's YAML 1.1 also reads 0755 as 493,
# 1_000 as 1000 and 1:30 as 90).
_NUMBER = re.compile(
    r"[-+]?(?:\d+|\d*\.\d+|\d+\.\d*)(?:[eE][-+]?\d+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)", re.ASCII
)


def _override_value(item: str, raw: str) -> Any:
    """An override's value as YAML reads a value of a config file (a number, true/false,
    null/~, a quoted string, a flow collection such as ``[1, 2]`` or ``{a: 1}``), except that
    text YAML would read as something else stays text as written, spaces included:
    ``prompts.query=query: `` sets the e5 prompt "query: " (YAML read ``{"query": None}``),
    ``name=Query #1`` keeps its "#1" (a YAML comment), ``name=no`` is "no" (YAML 1.1's false),
    ``x=1_000``, ``x=1:30`` and ``x=0755`` stay text (YAML 1.1's 1000, 90 and 493; YAML 1.2's
    755), as ``x=08`` does."""
    import yaml

    text = raw.strip()
    if not text:
        return raw
    collection = text.startswith(("[", "{"))
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        if not collection:
            return raw  # "a: b: c", "'s-Hertogenbosch", '"a" b': text
        problem = str(getattr(e, "problem", None) or e).splitlines()[0]
        raise ConfigError(f"override {item!r}: the value is not a YAML list or mapping ({problem})") from None
    if collection or (text[0] in "'\"" and isinstance(value, str)):
        return value
    if isinstance(value, bool):
        return value if text.lower() in ("true", "false") else raw
    if value is None:
        return None if text in ("null", "Null", "NULL", "~") else raw
    if isinstance(value, (int, float)):
        digits = text.lstrip("+-")
        if not _NUMBER.fullmatch(text) or (digits.isdigit() and len(digits) > 1 and digits[0] == "0"):
            return raw  # 0755, 08: a run name or a code as often as a number (a number field refuses it, named)
        return int(text) if digits.isdigit() else value
    return raw  # text (1e-4 too: a number field reads it), and YAML 1.1's dates


def merge(base: dict[str, Any], extra: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``extra`` over ``base``. A numeric key addresses a list item, so the override
    ``datasets.0.path=x`` changes the first dataset's path and keeps the rest of the list."""
    out = dict(base)
    for k, v in extra.items():
        current, key = out.get(k), f"{where}{k}"
        if isinstance(v, dict) and isinstance(current, dict):
            out[k] = merge(current, v, f"{key}.")
        elif isinstance(v, dict) and isinstance(current, list) and v and all(str(i).isdigit() for i in v):
            items = list(current)
            for i, sub in v.items():
                if int(i) >= len(items):
                    raise ConfigError(f"override {key}.{i}: {key} has {len(items)} item(s), indices start at 0")
                item = items[int(i)]
                items[int(i)] = (
                    merge(item, sub, f"{key}.{i}.") if isinstance(sub, dict) and isinstance(item, dict) else sub
                )
            out[k] = items
        else:
            out[k] = v
    return out


def load_yaml(cls: type[M], path: str | Path, overrides: list[str] | None = None) -> M:
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give a YAML config file (e.g. jobs/configs/dense_mnrl.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not a text file in UTF-8 ({e.reason} at byte {e.start}); give a YAML config file"
        ) from None
    except PermissionError:
        raise ConfigError(f"{path}: not readable (permission denied); give a YAML config file you can read") from None
    return from_dict(cls, merge(data, parse_overrides(overrides or [])), where=str(path), overrides=overrides or ())


def flat_settings(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested identity or config dump as ``{"training.batch_size": 32, "datasets.0.loss.name": ...}``
    (an empty mapping is a value of its own: ``{"model.router_mapping": {}}``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):  # datasets.0.loss.name
            v = {str(i): x for i, x in enumerate(v)}
        out.update(flat_settings(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


_ABSENT = object()


def differing_settings(kept: dict[str, Any], now: dict[str, Any]) -> set[str]:
    """The flat keys whose values differ between two identities (a key one lacks differs, even
    from a null)."""
    old, new = flat_settings(kept), flat_settings(now)
    return {k for k in old.keys() | new.keys() if old.get(k, _ABSENT) != new.get(k, _ABSENT)}


def added_settings_at_default(
    kept: Any, now: dict[str, Any], cfg: BaseModel, held: dict[str, Any] | None = None
) -> set[str]:
    """The flat keys of ``now`` (an identity dumped from ``cfg``) under settings ``kept`` lacks,
    whose values are their settings' defaults: settings a later raytrieve added, left as they
    were. A setting is the outermost field ``kept`` lacks, and its default that field's own (a
    new section's leaves are held against the section's default, an optional one's against null).
    ``held``: the whole config ``kept`` was made from, where one was kept beside it. A setting it
    holds was there, if not in the identity: it is no change at the value it held (whatever the
    default), and a change at any other, the whole setting compared (a mapping or section too).
    Empty when ``kept`` is no identity (a folder of a version that kept none)."""
    from pydantic_core import to_jsonable_python

    if not isinstance(kept, dict):
        return set()
    old, new = flat_settings(kept), flat_settings(now)
    was = held if isinstance(held, dict) else None  # read from JSON (job.json): JSON values
    out: set[str] = set()
    for key in set(new) - set(old):
        parts = key.split(".")
        depth = next((i for i in range(1, len(parts) + 1) if _value_at(kept, parts[:i]) is _ABSENT), None)
        if depth is None:  # a value kept at every step of the key, yet no leaf of it: no setting added
            continue
        # Added: missing from a section the stamp has (not under a value it held, e.g. a null).
        section = _value_at(kept, parts[: depth - 1])
        field = _field_at(cfg, parts[:depth]) if isinstance(section, (dict, list)) else None
        if field is None or field.is_required():  # a required setting has no default to be at
            continue
        had = _value_at(was, parts[:depth])
        if had is not _ABSENT:
            if had == _value_at(now, parts[:depth]):
                out.add(key)
            continue
        default = to_jsonable_python(field.get_default(call_default_factory=True))
        if flat_settings({"": default}).get(".".join(["", *parts[depth:]]), _ABSENT) == new[key]:
            out.add(key)
    return out


def only_added_at_default(kept: Any, now: dict[str, Any], cfg: BaseModel, held: dict[str, Any] | None = None) -> bool:
    """Whether all that tells ``now`` from ``kept`` is settings a later raytrieve added, at their
    defaults (``added_settings_at_default``): the same run or job, kept by an earlier version.
    The rule for adding a setting that is part of an identity is that its default behaves as
    the versions before it did."""
    added = added_settings_at_default(kept, now, cfg, held)
    return bool(added) and differing_settings(kept, now) == added


def _value_at(tree: Any, parts: list[str]) -> Any:
    """What ``tree`` (nested mappings, lists and pydantic models) holds at ``parts``, or ``_ABSENT``."""
    for part in parts:
        if isinstance(tree, dict) and part in tree:
            tree = tree[part]
        elif isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
        elif isinstance(tree, BaseModel) and part in type(tree).model_fields:
            tree = getattr(tree, part)
        else:
            return _ABSENT
    return tree


def _field_at(cfg: BaseModel, parts: list[str]) -> Any:
    """The pydantic field at ``parts`` of ``cfg`` (None for what is no field: a key inside a
    mapping setting, an identity's own "plan" or "data")."""
    owner = _value_at(cfg, parts[:-1])
    return type(owner).model_fields.get(parts[-1]) if isinstance(owner, BaseModel) else None


def differences(
    kept: Any,
    now: dict[str, Any],
    limit: int = 4,
    ignore: set[str] | frozenset[str] = frozenset(),
    held: dict[str, Any] | None = None,
) -> str:
    """``dense.max_seq_length: 24 -> 16; ...`` between a kept identity (an encoding job's job.json,
    a training run's stamp) and this run's, keys named as in the config (a ``models.`` prefix
    dropped), but for those in ``ignore``; "" when none was kept (a folder of an older version).
    ``held``: the whole config kept beside it, which gives a value the identity lacks."""
    if not isinstance(kept, dict):
        return ""

    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 60 else f"{text[:28]}...{text[-28:]}"

    was = flat_settings(held) if isinstance(held, dict) else {}
    old, new = {**was, **flat_settings(kept)}, flat_settings(now)
    keys = sorted(differing_settings(kept, now) - set(ignore))
    shown = [f"{k.removeprefix('models.')}: {short(old.get(k))} -> {short(new.get(k))}" for k in keys[:limit]]
    return "; ".join(shown) + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")
