"""The module contract every building block follows.

A module takes a features dict and returns it with its own outputs added (the
sentence-transformers contract), and it saves and loads itself: its config as JSON, its
weights as safetensors, in a folder of its own. ``st_type`` is the class path written into
modules.json; ``st_aliases`` are the other class paths sentence-transformers has used for
the same module over its versions, all of which we read.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, cast

import torch
from torch import nn

from raytrieve._io import load_weights, read_json, save_weights, write_json

Features = dict[str, Any]


class InputModule(Protocol):
    """What the first module of a stack (or of a Router route) offers on top of ``forward``:
    tokenization. Transformer and SparseStaticEmbedding implement it; the Router hands out its
    routes' input modules. (``prompt_length`` is optional: SparseStaticEmbedding has none.)"""

    tokenizer: Any
    max_seq_length: int

    def tokenize_ids(self, texts: Sequence[Any], prompt: str | None = None) -> dict[str, list[list[int]]]: ...

    def collate(self, encoded: dict[str, list[list[int]]]) -> Features: ...

    def tokenize(self, texts: Sequence[Any], prompt: str | None = None, **kwargs: Any) -> Features: ...

    def get_embedding_dimension(self) -> int: ...


class Module(nn.Module):
    st_type: ClassVar[str] = ""
    st_aliases: ClassVar[tuple[str, ...]] = ()
    config_file: ClassVar[str] = "config.json"
    # Transformer-like modules live in the model's root folder (path "" in modules.json).
    save_in_root: ClassVar[bool] = False
    has_weights: ClassVar[bool] = False

    def forward(self, features: Features, **kwargs: Any) -> Features:  # pragma: no cover - abstract
        """``kwargs`` are the encoder's forward arguments (``task`` among them), passed to every
        module as sentence-transformers does; a module takes the ones it uses and ignores the rest."""
        raise NotImplementedError

    # -- as the first module of a stack (the Router overrides these to pick a route) -----
    def input_module(self, task: str | None = None) -> InputModule:
        """The module that tokenizes texts for ``task``: the first module of a stack is its own."""
        return cast("InputModule", self)

    def input_modules(self) -> list[InputModule]:
        """Every input module this first module may tokenize with (one; a Router: one per route)."""
        return [self.input_module(None)]

    def routes(self) -> list[str]:
        """The routes a task can select (empty: the module is the same for every task)."""
        return []

    def saved_type(self) -> str:
        """The class path written into modules.json for this module."""
        return self.st_type

    def config_dict(self) -> dict[str, Any]:
        """The JSON config that ``from_config`` turns back into an equal module."""
        return {}

    @classmethod
    def from_config(cls, config: dict[str, Any], trust_remote_code: bool = False) -> Module:
        return cls(**config)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / self.config_file, self.config_dict())
        if self.has_weights:
            save_weights(self, directory)

    @classmethod
    def load(cls, directory: Path, trust_remote_code: bool = False, **kwargs: Any) -> Module:
        directory = Path(directory)
        config = read_json(directory / cls.config_file) if (directory / cls.config_file).exists() else {}
        module = cls.from_config(config, trust_remote_code=trust_remote_code)
        if cls.has_weights:
            load_weights(module, directory)
        return module

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")
