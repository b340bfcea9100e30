"""The sentence-transformers directory format: modules.json and config_sentence_transformers.json.

We write class paths that sentence-transformers 5 and 6 both resolve, and read every
layout those versions (and 2.x-4.x) write.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from raytrieve import __version__
from raytrieve._io import read_json, write_json
from raytrieve.errors import ModelLoadError
from raytrieve.modules import Module, module_class_for

MODULES_FILE = "modules.json"
ST_CONFIG_FILE = "config_sentence_transformers.json"


def load_modules(path: Path, trust_remote_code: bool = False) -> list[Module] | None:
    """The module stack listed in modules.json, or None when the folder has no modules.json."""
    spec_path = path / MODULES_FILE
    if not spec_path.exists():
        return None
    entries = read_json(spec_path)
    if not isinstance(entries, list) or not entries:
        raise ModelLoadError(f"{spec_path}: expected a non-empty list of modules")
    modules = []
    for entry in sorted(entries, key=lambda e: e.get("idx", 0)):
        try:
            folder = path / entry.get("path", "")
            cls = module_class_for(entry["type"], folder)
        except KeyError as e:
            raise ModelLoadError(f"{spec_path}: an entry lacks {e.args[0]!r}") from None
        if not folder.is_dir():
            if not cls.has_weights and not cls.save_in_root:
                # sentence-transformers saves no folder for config-less modules (Normalize).
                modules.append(cls.from_config({}, trust_remote_code=trust_remote_code))
                continue
            raise ModelLoadError(f"{spec_path}: module folder {folder} does not exist; the model is incomplete")
        modules.append(cls.load(folder, trust_remote_code=trust_remote_code))
    return modules


def save_modules(path: Path, modules: Sequence[Module]) -> None:
    entries = []
    for idx, module in enumerate(modules):
        rel = "" if module.save_in_root else f"{idx}_{type(module).__name__}"
        module.save(path / rel if rel else path)
        entries.append({"idx": idx, "name": str(idx), "path": rel, "type": module.saved_type()})
    write_json(path / MODULES_FILE, entries)


def read_st_config(path: Path) -> dict[str, Any]:
    file = path / ST_CONFIG_FILE
    return read_json(file) if file.exists() else {}


def write_st_config(path: Path, model_type: str, **fields: Any) -> None:
    import torch
    import transformers

    config = {
        "__version__": {
            "raytrieve": __version__,
            "transformers": transformers.__version__,
            "pytorch": torch.__version__,
        },
        "model_type": model_type,
        **fields,
    }
    write_json(path / ST_CONFIG_FILE, config)
