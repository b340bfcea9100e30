"""The tokenizer of a model's input module, without the model's weights.

Tokenizer stages (Ray Data actors in training and in the encoding job) need the exact ids
that ``encoder.input_module(task).tokenize_ids`` gives, but loading the encoder would load
every weight into each actor (slow start, memory). This reads only what tokenization
depends on: modules.json (and router_config.json for Router models) to find the input
module of the task's route, that module's sentence_bert_config.json (max_seq_length,
do_lower_case, tokenizer kwargs), its tokenizer files, and the model's config.json to know
whether the model takes token_type_ids.

    tok = load_input_tokenizer(model_dir, task="query", max_seq_length=128)
    encoded = tok.tokenize_ids(texts, prompt=tok.resolve_prompt(None, tok.prompt_name_for("query")))
    features = tok.collate(encoded)  # the padded tensors module.collate gives

Library code: no Ray here.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raytrieve._io import read_json
from raytrieve.errors import InputError, ModelLoadError
from raytrieve.model_ref import resolve_model

if TYPE_CHECKING:
    from raytrieve.fast_tokenizer import PortableTokenizer

_HUGE = 1_000_000  # tokenizers without a limit report model_max_length ~1e30
_STATIC = "static"  # SparseStaticEmbedding: no special tokens, no token types, no prompt marking


class InputTokenizer:
    """Tokenization of one input module: ``tokenize_ids`` / ``collate`` / ``prompt_length``
    exactly as the module's own methods. ``route`` is the Router route (None without a Router),
    which a features dict for a Router model carries as ``task``."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        module: str,
        max_seq_length: int,
        do_lower_case: bool = False,
        accepts_token_types: bool = False,
        route: str | None = None,
        prompts: dict[str, str] | None = None,
        default_prompt_name: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.module = module  # "transformer" or "static"
        self.max_seq_length = int(max_seq_length)
        self.do_lower_case = do_lower_case
        self.accepts_token_types = accepts_token_types
        self.route = route
        self.prompts = dict(prompts or {})
        self.default_prompt_name = default_prompt_name
        self._prompt_lengths: dict[str, int] = {}

    @classmethod
    def of_module(cls, module: Any) -> InputTokenizer:
        """The tokenization of an input module already loaded with its model (a Transformer or
        SparseStaticEmbedding), without loading its tokenizer again. Prompts and route are left
        out: the module does not know them (the encoder does)."""
        from raytrieve.modules.static_embedding import SparseStaticEmbedding

        if isinstance(module, SparseStaticEmbedding):
            return cls(module.tokenizer, module=_STATIC, max_seq_length=module.max_seq_length)
        return cls(
            module.tokenizer,
            module="transformer",
            max_seq_length=module.max_seq_length,
            do_lower_case=module.do_lower_case,
            accepts_token_types=module.accepts_token_types,
        )

    # -- the model's prompts (config_sentence_transformers.json), as Encoder resolves them --
    def resolve_prompt(self, prompt: str | None, prompt_name: str | None) -> str | None:
        if prompt is not None:
            return prompt
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                raise InputError(
                    f"unknown prompt_name {prompt_name!r}; this model's prompts are "
                    f"{sorted(self.prompts) or 'none'} (pass prompt= for a custom string)"
                )
            return self.prompts[prompt_name]
        if self.default_prompt_name is not None and self.default_prompt_name in self.prompts:
            return self.prompts[self.default_prompt_name]
        return None

    def prompt_name_for(self, task: str) -> str | None:
        names = {"query": ("query",), "document": ("document", "passage", "corpus")}[task]
        return next((n for n in names if n in self.prompts), None)

    # -- tokenization ------------------------------------------------------------------
    def tokenize_ids(self, texts: Sequence[Any], prompt: str | None = None) -> dict[str, list[list[int]]]:
        """Token ids per text (or text pair), truncated to max_seq_length, not padded."""
        if self.module == _STATIC:
            texts = [prompt + t for t in texts] if prompt else list(texts)
            if not texts:
                return {"input_ids": []}
            enc = self.tokenizer(
                texts,
                truncation=True,
                max_length=self.max_seq_length,
                add_special_tokens=False,
                return_attention_mask=False,
                return_token_type_ids=False,
            )
            return {"input_ids": enc["input_ids"]}
        from raytrieve.modules.transformer import tokenize_text_ids

        return tokenize_text_ids(
            self.tokenizer, texts, prompt, self.max_seq_length, self.do_lower_case, self.accepts_token_types
        )

    def collate(self, encoded: dict[str, list[list[int]]]) -> dict[str, Any]:
        """Padded tensors (input_ids, attention_mask, token_type_ids when present)."""
        from raytrieve.modules.transformer import pad_ids

        left = self.module != _STATIC and self.tokenizer.padding_side == "left"
        return pad_ids(encoded, self.tokenizer.pad_token_id or 0, left=left)

    def prompt_length(self, prompt: str) -> int | None:
        """Tokens the prompt occupies at the start of a text (trailing special token excluded);
        None for modules that do not mark the prompt (the static sparse query module)."""
        if self.module == _STATIC:
            return None
        if prompt not in self._prompt_lengths:
            from raytrieve.modules.transformer import prompt_token_count

            self._prompt_lengths[prompt] = prompt_token_count(
                self.tokenizer, self.tokenize_ids([prompt])["input_ids"][0]
            )
        return self._prompt_lengths[prompt]

    def portable(self) -> PortableTokenizer | None:
        """This tokenization without transformers (raytrieve/fast_tokenizer.py), for Ray Data's
        tokenizing stages; None for a slow (Python) tokenizer, which has no ``tokenizers``
        backend to capture."""
        from raytrieve.fast_tokenizer import PortableTokenizer

        if not getattr(self.tokenizer, "is_fast", False):
            return None
        return PortableTokenizer(
            backend_json=self.tokenizer.backend_tokenizer.to_str(),
            max_seq_length=self.max_seq_length,
            static=self.module == _STATIC,
            do_lower_case=self.do_lower_case,
            accepts_token_types=self.accepts_token_types,
            truncation_side=getattr(self.tokenizer, "truncation_side", "right"),
            split_special_tokens=bool(getattr(self.tokenizer, "split_special_tokens", False)),
        )

    def features(self, texts: Sequence[Any], prompt: str | None = None) -> dict[str, Any]:
        """What ``encoder.tokenize(texts, task, prompt)`` gives: padded, prompt_length, task."""
        out = self.collate(self.tokenize_ids(texts, prompt))
        length = self.prompt_length(prompt) if prompt else None
        if length is not None:
            out["prompt_length"] = length
        if self.route is not None:
            out["task"] = self.route
        return out


def load_input_tokenizer(
    model_path: str | Path,
    task: str | None = None,
    max_seq_length: int | None = None,
    *,
    kind: str | None = None,
    trust_remote_code: bool = False,
) -> InputTokenizer:
    """The input tokenizer of the model at ``model_path`` (a folder, a models/ variant or an MLflow
    URI) for ``task`` (the Router route or task mapping; ignored without a Router).
    ``max_seq_length`` overrides the saved truncation length (as ``set_max_seq_length`` does for
    every route). ``kind`` picks the head of a plain transformers folder without modules.json."""
    path = resolve_model(model_path)
    st_config = (
        read_json(path / "config_sentence_transformers.json")
        if (path / "config_sentence_transformers.json").exists()
        else {}
    )
    common: dict[str, Any] = dict(
        prompts=st_config.get("prompts") or {}, default_prompt_name=st_config.get("default_prompt_name")
    )
    modules_file = path / "modules.json"
    if not modules_file.exists():  # a transformers folder (resolve_model refuses one without config.json)
        from raytrieve.kinds import model_kind

        head = model_kind(kind or "dense", "kind").hf_task
        return _transformer(path, head, max_seq_length, trust_remote_code, None, **common)
    entries = read_json(modules_file)
    if not isinstance(entries, list) or not entries:
        raise ModelLoadError(f"{modules_file}: expected a non-empty list of modules")
    first = sorted(entries, key=lambda e: e.get("idx", 0))[0]
    folder = path / first.get("path", "")
    type_name = first.get("type", "")
    route = None
    if type_name.endswith(".Router") or type_name.endswith(".router.Router"):
        folder, type_name, route = _router_input(folder, task)
    if type_name.rsplit(".", 1)[-1] == "SparseStaticEmbedding":
        tokenizer = _auto_tokenizer(folder, {}, False)
        limit = max_seq_length or min(int(tokenizer.model_max_length), _HUGE)
        return InputTokenizer(tokenizer, module=_STATIC, max_seq_length=limit, route=route, **common)
    if type_name.rsplit(".", 1)[-1] not in ("Transformer", "MLMTransformer"):
        raise ModelLoadError(f"{modules_file}: the input module {type_name!r} has no tokenizer raytrieve can load")
    default = "fill-mask" if type_name.rsplit(".", 1)[-1] == "MLMTransformer" else "feature-extraction"
    return _transformer(folder, default, max_seq_length, trust_remote_code, route, **common)


def _router_input(directory: Path, task: str | None) -> tuple[Path, str, str]:
    """(folder, module type, route) of the input module the Router uses for ``task``
    (by the Router's own rule, modules/router.resolve_route)."""
    from raytrieve.modules.router import resolve_route

    file = directory / "router_config.json"
    if not file.exists():
        raise ModelLoadError(f"{file} does not exist; the Router model is incomplete")
    config = read_json(file)
    try:
        types, structure = config["types"], config["structure"]
    except KeyError as e:
        raise ModelLoadError(f"{file}: missing {e.args[0]!r}") from None
    params = config.get("parameters", {})
    route = resolve_route(
        task,
        list(structure),
        params.get("default_route"),
        params.get("allow_empty_key", True),
        params.get("route_mappings") or {},
    )
    folder = structure[route][0]
    return directory / folder, types[folder], route


def _auto_tokenizer(folder: Path, kwargs: dict[str, Any], trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust_remote_code, **kwargs
        )
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: {e})") from e


def _transformer(
    folder: Path,
    default_task: str | None,
    max_seq_length: int | None,
    trust_remote_code: bool,
    route: str | None,
    **common: Any,
) -> InputTokenizer:
    from raytrieve.modules.transformer import find_module_config

    config = dict(find_module_config(folder))
    task = config.get("transformer_task") or default_task
    tokenizer_kwargs = dict(config.get("processor_kwargs", config.get("tokenizer_args")) or {})
    config_kwargs = dict(config.get("config_kwargs", config.get("config_args")) or {})
    for d in (tokenizer_kwargs, config_kwargs):
        d.pop("trust_remote_code", None)  # a saved config never grants code execution
    tokenizer = _auto_tokenizer(folder, tokenizer_kwargs, trust_remote_code)
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust_remote_code, **config_kwargs
        )
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{folder}: cannot load config.json ({type(e).__name__}: {e})") from e
    limit = max_seq_length or config.get("max_seq_length")
    if limit is None:  # Transformer.__init__'s rule when the saved config has no length
        limits = [tokenizer.model_max_length, getattr(model_config, "max_position_embeddings", None)]
        limits = [x for x in limits if isinstance(x, int) and 0 < x < _HUGE]
        limit = min(limits) if limits else 512
    return InputTokenizer(
        tokenizer,
        module="transformer",
        max_seq_length=limit,
        do_lower_case=bool(config.get("do_lower_case", False)),
        accepts_token_types=_accepts_token_types(model_config, task, tokenizer),
        route=route,
        **common,
    )


def _accepts_token_types(model_config: Any, task: str | None, tokenizer: Any) -> bool:
    """Whether the model's forward takes token_type_ids, from its class (never instantiated)."""
    from raytrieve.modules.transformer import TASKS

    try:
        if task is None:  # no transformers task known: no auto class to ask either
            raise KeyError(task)
        cls = TASKS[task][0]._model_mapping[type(model_config)]
    except (KeyError, AttributeError):  # a remote-code model: ask its tokenizer
        return "token_type_ids" in getattr(tokenizer, "model_input_names", ())
    return "token_type_ids" in inspect.signature(cls.forward).parameters
