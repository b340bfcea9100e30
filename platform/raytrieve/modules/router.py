"""Route inputs to different module stacks by task: asymmetric query / document models.

``Router({"query": [SparseStaticEmbedding(...)], "document": [MLMTransformer(...), SpladePooling()]})``
encodes queries with the cheap static module and documents with full SPLADE. The task
comes from ``encode_query`` / ``encode_document`` (or ``task=`` on ``encode``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from torch import nn

from raytrieve._io import read_json, write_json
from raytrieve.errors import InputError, ModelLoadError
from raytrieve.modules.base import Features, InputModule, Module


def resolve_route(
    task: str | None,
    routes: Sequence[str],
    default_route: str | None,
    allow_empty_key: bool,
    route_mappings: Mapping[str, str],
) -> str:
    """The route a Router takes for ``task`` (a mapped task, a route name, or None for the
    default). One rule for the loaded Router and for the weightless tokenizer
    (encoders/tokenizer_only.py), which reads the same fields from router_config.json."""
    if task is not None:
        if task in route_mappings:
            return route_mappings[task]
        if task in routes:
            return task
        raise InputError(f"Router: no route for task {task!r}; routes are {list(routes)}")
    if default_route is not None:
        return default_route
    if allow_empty_key:
        return routes[0]
    raise InputError(
        f"Router: a task is required (routes {list(routes)}); use encode_query / encode_document or pass task="
    )


class Router(Module):
    st_type = "sentence_transformers.models.Router"
    st_aliases = ("sentence_transformers.base.modules.router.Router",)
    config_file = "router_config.json"
    save_in_root = True

    def __init__(
        self,
        routes: Mapping[str, Sequence[Module]],
        default_route: str | None = None,
        allow_empty_key: bool = True,
        route_mappings: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if not routes:
            raise InputError("Router needs at least one route")
        if default_route is not None and default_route not in routes:
            raise InputError(f"Router default_route {default_route!r} is not one of the routes {list(routes)}")
        self.sub_modules = nn.ModuleDict({name: nn.Sequential(*mods) for name, mods in routes.items()})
        self.default_route = default_route
        self.allow_empty_key = allow_empty_key
        self.route_mappings = dict(route_mappings or {})

    @classmethod
    def for_query_document(
        cls, query_modules: Sequence[Module], document_modules: Sequence[Module], default_route: str | None = "document"
    ) -> Router:
        return cls({"query": query_modules, "document": document_modules}, default_route=default_route)

    def resolve(self, task: str | None) -> str:
        routes = list(self.sub_modules)
        return resolve_route(task, routes, self.default_route, self.allow_empty_key, self.route_mappings)

    def route_modules(self, route: str) -> list[Module]:
        """The modules of one route, in order."""
        # nn.ModuleDict / nn.Sequential are typed with torch's Module; __init__ only puts ours in.
        return cast("list[Module]", list(cast(nn.Sequential, self.sub_modules[route])))

    def route_input(self, route: str) -> InputModule:
        """The input module of a (resolved) route: its first module, by the stack contract."""
        return cast("InputModule", self.route_modules(route)[0])

    def input_module(self, task: str | None = None) -> InputModule:
        return self.route_input(self.resolve(task))

    def input_modules(self) -> list[InputModule]:
        return [self.route_input(route) for route in self.sub_modules]

    def routes(self) -> list[str]:
        return list(self.sub_modules)

    def tokenize(
        self, texts: Sequence[Any], prompt: str | None = None, task: str | None = None, **kwargs: Any
    ) -> Features:
        route = self.resolve(task)
        features = self.route_input(route).tokenize(texts, prompt=prompt)
        features["task"] = route  # so that forward(features) alone takes the same route
        return features

    def forward(self, features: Features, task: str | None = None, **kwargs: Any) -> Features:
        route = features.get("task") or self.resolve(task)
        for module in self.route_modules(route):
            features = module(features, task=task, **kwargs)
        return features

    def get_embedding_dimension(self) -> int | None:
        for route in self.sub_modules:
            for module in reversed(self.route_modules(route)):
                dim = getattr(module, "get_embedding_dimension", lambda: None)()
                if dim:
                    return dim
        return None

    def config_dict(self) -> dict[str, Any]:
        return {
            "default_route": self.default_route,
            "allow_empty_key": self.allow_empty_key,
            "route_mappings": self.route_mappings,
        }

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        types: dict[str, str] = {}
        structure: dict[str, list[str]] = {}
        for route in self.sub_modules:
            structure[route] = []
            for i, module in enumerate(self.route_modules(route)):
                folder = f"{route}_{i}_{type(module).__name__}"
                module.save(directory / folder)
                types[folder] = module.saved_type()
                structure[route].append(folder)
        write_json(
            directory / self.config_file,
            {"types": types, "structure": structure, "parameters": self.config_dict()},
        )

    @classmethod
    def load(cls, directory: Path, trust_remote_code: bool = False, **kwargs: Any) -> Router:
        from raytrieve.modules import module_class_for

        directory = Path(directory)
        config = read_json(directory / cls.config_file)
        try:
            types, structure = config["types"], config["structure"]
        except KeyError as e:
            raise ModelLoadError(f"{directory / cls.config_file}: missing {e.args[0]!r}") from None
        params = config.get("parameters", {})
        mappings = params.get("route_mappings") or {}
        if any(not isinstance(k, str) or not isinstance(v, str) for k, v in mappings.items()):
            raise ModelLoadError(f"{directory / cls.config_file}: only task -> route mappings are supported")
        routes = {
            route: [
                module_class_for(types[folder], directory / folder).load(
                    directory / folder, trust_remote_code=trust_remote_code
                )
                for folder in folders
            ]
            for route, folders in structure.items()
        }
        return cls(
            routes,
            default_route=params.get("default_route"),
            allow_empty_key=params.get("allow_empty_key", True),
            route_mappings=mappings,
        )
