"""Activation functions named by class path in saved configs (``torch.nn.modules.activation.Tanh``).

Only torch.nn Module classes are imported unless the caller passes trust_remote_code: a
config file must not be able to import and run arbitrary code.
"""

from __future__ import annotations

import importlib
import inspect

from torch import nn

from raytrieve.errors import ModelLoadError


def activation_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def activation_from_name(path: str, *, trust_remote_code: bool = False, where: str = "config") -> nn.Module:
    if not (path.startswith("torch.") or trust_remote_code):
        raise ModelLoadError(
            f"{where}: activation {path!r} is not a torch class; load with trust_remote_code=True "
            "if you trust this model, or change it to a torch.nn activation"
        )
    module_name, _, attr = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise ModelLoadError(f"{where}: activation {path!r} cannot be imported") from None
    if not (inspect.isclass(obj) and issubclass(obj, nn.Module)):
        raise ModelLoadError(f"{where}: activation {path!r} is not a torch.nn.Module class")
    return obj()
