"""The config reference (docs/config-reference.md), generated from the config models: every key
with its type, default and its field's ``description``. tests/test_docs.py fails when the
committed file and the models disagree; regenerate with

    raytrieve docs config-reference > docs/config-reference.md
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from typing import Any, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from raytrieve.config import LocalPath, one_or_list


def _inner_model(tp: Any) -> tuple[type[BaseModel] | None, str]:
    """(the model inside tp, how it nests: "" for X or X | None, "[]" for list[X])."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp, ""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _inner_model(inner[0])
        one = one_or_list(tp)
        if one is not None:  # one mapping or a list of them: the keys of one
            return one, ""
    if origin is list and args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0], "[]"
    return None, ""


def _type_text(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if tp is Any:
        return "Any"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_text(a) for a in sorted(args, key=lambda a: a is type(None)))
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is typing.Annotated:  # a constrained type: config.LocalPath is the one there is
        return "local path" if tp == LocalPath else _type_text(args[0])
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_text(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _default(f: FieldInfo, parent: BaseModel | None, name: str) -> tuple[str, Any]:
    """(the default as the table shows it, the default value). Under a parent that is itself a
    default value (a section's ``default_factory`` may set other values than its class's,
    e.g. the demo's sparse_training.learning_rate), the parent's attribute is the default."""
    if parent is not None:
        value = getattr(parent, name)
    elif f.is_required():
        return "**required**", None
    elif f.default_factory is not None:
        value = f.default_factory()  # type: ignore[call-arg]
    else:
        value = f.default
    return ("(see below)" if isinstance(value, BaseModel) else repr(value)), value


def rows(
    cls: type[BaseModel], prefix: str = "", seen: tuple[type, ...] = (), default: BaseModel | None = None
) -> Iterator[tuple[str, str, str, str]]:
    """(key, type, default, description) for every field, nested models flattened. ``default``:
    the value ``cls`` defaults to where it nests (None: its fields' own defaults)."""
    for name, f in cls.model_fields.items():
        key = f"{prefix}{name}"
        text, value = _default(f, default, name)
        local = f.annotation is str and typing.get_args(LocalPath)[1] in f.metadata  # pydantic keeps it there
        yield key, "local path" if local else _type_text(f.annotation), text, f.description or ""
        inner, nest = _inner_model(f.annotation)
        if inner is not None and inner not in seen:  # LossSpec.inner is a LossSpec: list it once
            nested = value if nest == "" and isinstance(value, inner) else None
            yield from rows(inner, f"{key}{nest}.", (*seen, cls, inner), nested)


def sections() -> list[tuple[str, str, type[BaseModel]]]:
    from raytrieve.demo.config import DemoConfig
    from raytrieve.inference.config import EncodeConfig, MineConfig
    from raytrieve.serve.config import ServeConfig
    from raytrieve.train.config import TrainConfig

    return [
        (
            "Training",
            "`raytrieve train --config X.yaml`, `jobs/train.py` (jobs/configs/dense_mnrl.yaml, ...)",
            TrainConfig,
        ),
        ("Corpus encoding", "`raytrieve encode`, `jobs/encode.py` (jobs/configs/encode_pydocs.yaml)", EncodeConfig),
        ("Hard-negative mining", "`raytrieve mine`, `jobs/mine.py` (jobs/configs/mine_pydocs.yaml)", MineConfig),
        ("Serving", "`raytrieve serve`, `serve deploy cluster/serve.yaml` (application args)", ServeConfig),
        ("Demo", "`make demo` = `raytrieve demo --config jobs/configs/demo.yaml`", DemoConfig),
    ]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a table cell


def markdown() -> str:
    lines = [
        "# Config reference",
        "",
        "Generated from the config models by `raytrieve docs config-reference`; a test keeps it in step.",
        "YAML keys nest as the dots show (`a.b: 1` is `a: {b: 1}`); `[]` marks a list of mappings. "
        "Any key can be overridden on the command line as `key=value` (e.g. `training.batch_size=64`; the "
        "value is read as in a YAML file, but text YAML would read as something else, such as `query: ` or "
        "`no`, stays text as written). "
        "Unknown keys are errors that list the valid ones. A *local path* is on a local or shared disk (a path "
        "every node reaches); a URI there is refused.",
        "",
    ]
    for title, how, cls in sections():
        lines += [f"## {title}", "", how, "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for key, tp, default, text in rows(cls):
            lines.append(f"| `{key}` | `{_cell(tp)}` | {_cell(default)} | {_cell(text)} |")
        lines.append("")
    return "\n".join(lines)
