"""What the three encoders share: the module stack, loading and saving in the
sentence-transformers format, prompts, devices, and length-sorted batched inference (its
batches and run: encoders/batching.py).

The kinds differ only in their default stack, their config fields and what they make of
the stack's output (dense embeddings, sparse vectors, scores).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np
import torch
from torch import Tensor, nn

from raytrieve._io import atomic_directory
from raytrieve.encoders import onnx_runtime, precision, st_format
from raytrieve.encoders.batching import Pretokenized, resolve_device, run_batches
from raytrieve.errors import DimensionMismatchError, InputError, ModelLoadError
from raytrieve.model_ref import is_model_dir, resolve_model
from raytrieve.modules import Features, InputModule, Module, Pooling, Transformer
from raytrieve.modules.dense import Dense

# The prompt names of each task, in sentence-transformers' order of preference.
TASK_PROMPT_NAMES = {"query": ("query",), "document": ("document", "passage", "corpus")}


def recorded_prompt(prompt: str | None) -> str | None:
    """A prompt as a manifest records it and checks compare it: an empty one is none, so outputs
    made before the default empty prompts existed match the same model's now."""
    return prompt or None


def texts_argument(sentences: Any, inputs: Any, method: str) -> Any:
    """The texts of ``encode`` / ``predict``, by the name sentence-transformers 5 gives them
    (``sentences``) or the one 6 does (``inputs``): ported code passes either by keyword."""
    if inputs is not None:
        if sentences is not None:
            raise InputError(f"{method}: got both sentences and inputs; they are one argument, give it once")
        return inputs
    if sentences is None:
        raise InputError(f"{method}: no texts; pass them first (or as sentences= / inputs=)")
    return sentences


class Encoder(nn.Module):
    """Base of DenseEncoder, SparseEncoder and CrossEncoder.

    ``model`` is a list of modules, or a model reference: a local folder, a shipped variant name
    or an MLflow model URI such as ``models:/NAME/VERSION`` (``raytrieve.model_ref.resolve_model``).
    """

    model_type: ClassVar[str] = ""
    default_similarity: ClassVar[str | None] = None
    # Prompts every model of the kind has, empty unless given or saved, as sentence-transformers
    # 6 gives its bi-encoders: prompt_name="query" works on any of them, and encode_document then
    # takes "document" (empty) before a saved "passage" or "corpus" prompt, as there.
    default_prompt_names: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        model: str | os.PathLike | Sequence[Module],
        *,
        device: str | torch.device | None = None,
        prompts: dict[str, str] | None = None,
        default_prompt_name: str | None = None,
        similarity_fn_name: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        # The format inference computes in (encoders/precision.py). Each kind's constructor
        # takes ``dtype`` and calls set_dtype last: "auto" runs the model, so it must be whole.
        self.dtype = "float32"
        self.dtype_reason = ""
        saved: dict[str, Any] = {}
        if isinstance(model, (str, os.PathLike)):
            path = resolve_model(model)  # a folder that holds no model is refused there
            modules = st_format.load_modules(path, trust_remote_code=trust_remote_code)
            if modules is None:
                modules = self.default_modules(path, trust_remote_code=trust_remote_code)
            saved = st_format.read_st_config(path)
            self.name_or_path = str(path)
            self._read_extra_config(path, saved, trust_remote_code)
        else:
            # Any iterable of modules (a list, nn.Sequential, nn.ModuleList, a generator).
            modules = list(model) if isinstance(model, Iterable) and not isinstance(model, (bytes, Mapping)) else None
            # raytrieve's modules (the stack's contract; a sentence-transformers model object holds its own)
            if modules is None or not all(isinstance(m, Module) for m in modules):
                raise InputError(
                    f"{type(self).__name__}: model must be a model folder, a shipped variant's name, an MLflow "
                    f"model URI (models:/NAME/VERSION) or a list of raytrieve modules; got {type(model).__name__} "
                    "(a sentence-transformers model: save it and pass its folder)"
                )
            if not modules:
                raise InputError(f"{type(self).__name__} needs at least one module")
            self.name_or_path = None
            self._read_extra_config(None, saved, trust_remote_code)
        self.stack = nn.Sequential(*modules)
        self._check_stack(saved.get("model_type"))
        # Given prompts win; saved ones fill the rest; a default left unset is empty.
        merged: dict[str, str | None] = {**dict.fromkeys(self.default_prompt_names), **(prompts or {})}
        for name, text in (saved.get("prompts") or {}).items():
            if merged.get(name) is None:
                merged[name] = text
        self.prompts: dict[str, str] = {name: "" if text is None else text for name, text in merged.items()}
        self.default_prompt_name = default_prompt_name or saved.get("default_prompt_name")
        if self.default_prompt_name is not None and self.default_prompt_name not in self.prompts:
            raise InputError(
                f"default_prompt_name {self.default_prompt_name!r} is not in prompts {sorted(self.prompts)}"
            )
        self.similarity_fn_name = similarity_fn_name or saved.get("similarity_fn_name") or self.default_similarity
        self.check_dimensions()
        self.to(resolve_device(device))
        # Loaded models start in eval mode (no dropout), as transformers' from_pretrained does.
        self.eval()

    # -- what subclasses define -------------------------------------------------------------
    @classmethod
    def default_modules(cls, path: Path, trust_remote_code: bool = False) -> list[Module]:
        """The stack for a plain transformers folder (no modules.json)."""
        raise NotImplementedError

    def _read_extra_config(self, path: Path | None, saved: dict[str, Any], trust_remote_code: bool) -> None:
        """Subclass hook for kind-specific saved fields."""

    def _check_stack(self, saved_type: str | None) -> None:
        """Refuse a stack this kind cannot run (``saved_type``: the kind the folder was saved as)."""

    def _extra_config(self) -> dict[str, Any]:
        return {}

    # -- structure ----------------------------------------------------------------------
    @property
    def modules_list(self) -> list[Module]:
        # nn.Sequential is typed with torch's Module; __init__ only puts ours in.
        return cast("list[Module]", list(self.stack))

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def first_module(self) -> Module:
        # nn.Sequential is typed with torch's Module; __init__ only puts ours in.
        return cast("Module", self.stack[0])

    def input_module(self, task: str | None = None) -> InputModule:
        """The module that tokenizes for ``task`` (the first module, or its Router route's)."""
        return self.first_module.input_module(task)

    @property
    def tokenizer(self) -> Any:
        return self.input_module(None).tokenizer

    @property
    def max_seq_length(self) -> int:
        return self.input_module(None).max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self.input_module(None).max_seq_length = int(value)

    def get_max_seq_length(self) -> int:
        """sentence-transformers' getter of ``max_seq_length``."""
        return self.max_seq_length

    def __getitem__(self, index: int) -> Module:
        """The stack's module at ``index`` (``model[0].auto_model``, as in sentence-transformers)."""
        return cast("Module", self.stack[index])

    def check_dimensions(self) -> None:
        """Fail at construction, not mid-encode, when adjacent modules disagree on a width."""
        dim: int | None = None
        for module in self.stack:
            if isinstance(module, Transformer):
                dim = module.get_embedding_dimension()
            elif isinstance(module, Pooling):
                if dim is not None and module.embedding_dimension != dim:
                    raise DimensionMismatchError(
                        f"Pooling expects {module.embedding_dimension}-d token embeddings but the transformer "
                        f"before it gives {dim}-d; set the Pooling embedding_dimension to {dim}"
                    )
                dim = module.get_embedding_dimension()
            elif isinstance(module, Dense):
                if dim is not None and module.in_features != dim:
                    raise DimensionMismatchError(
                        f"Dense in_features={module.in_features} but the module before it outputs {dim}-d; "
                        f"set in_features to {dim}"
                    )
                dim = module.out_features

    # -- precision ----------------------------------------------------------------------
    def set_dtype(self, dtype: str) -> str:
        """Compute inference in ``dtype`` (``auto | float32 | bfloat16 | float16 | int8``, see
        ``raytrieve.encoders.precision``); returns the format chosen, also kept in ``self.dtype``
        with the reason in ``self.dtype_reason``. int8 quantises the linear layers in place: such
        a model cannot go back to another format or be saved (load it again)."""
        precision.check_dtype(dtype, self.device)
        if self.backend == "onnx":
            onnx_runtime.check_backend(self.backend, dtype, self.device, "dtype")
            self.dtype, self.dtype_reason = "float32", "computes in float32 (backend onnx: ONNX Runtime)"
            return self.dtype
        if self.dtype == "int8" and dtype != "int8":
            raise InputError(f"this model was quantised to int8 in place; load it again to compute in {dtype}")
        result = None
        if dtype == "auto":
            dtype, result = precision.resolve_auto(self)
        elif dtype == "int8" and self.dtype != "int8":
            precision.quantize_int8(self.stack)
        self.dtype = dtype
        self.dtype_reason = precision.describe(dtype, result, self.device)
        return dtype

    def _transformers(self) -> list[Transformer]:
        return [m for m in self.stack.modules() if isinstance(m, Transformer)]

    @property
    def backend(self) -> str:
        """``onnx`` while every transformer of the stack runs in ONNX Runtime (``set_backend``), else ``torch``."""
        transformers = self._transformers()
        return "onnx" if transformers and all(m.onnx_model is not None for m in transformers) else "torch"

    def set_backend(self, backend: str) -> str:
        """Run every transformer of the stack at inference in ``backend``: ``torch``, or ``onnx``
        (ONNX Runtime on CPU, float32: encoders/onnx_runtime.py; exported once per machine and
        checked against torch at every call). A model set to bfloat16 / float16 (autocast over
        float32 weights) goes back to float32; int8 (quantised in place) is refused. All of the
        stack's transformers switch, or none. Returns the backend."""
        if backend == "onnx" and self.dtype in precision.HALF:
            dtype = "float32"  # autocast only: the weights are float32 already
        else:
            dtype = self.dtype if backend == "onnx" else "float32"
        onnx_runtime.check_backend(backend, dtype, self.device)
        transformers = self._transformers()
        if backend == "torch":
            for module in transformers:
                onnx_runtime.detach(module)
            self.dtype_reason = precision.describe(self.dtype, None, self.device)
            return backend
        try:
            for module in transformers:
                onnx_runtime.attach(module)
        except BaseException:
            for module in transformers:
                onnx_runtime.detach(module)
            raise
        self.dtype, self.dtype_reason = "float32", "computes in float32 (backend onnx: ONNX Runtime)"
        return backend

    def probe_outputs(self) -> Any:
        """This model's outputs on the fixed probe texts of the precision guard."""
        raise NotImplementedError

    def compare_probe(self, reference: Any, candidate: Any, dtype: str) -> precision.GuardResult:
        """The guard's verdict on ``candidate`` probe outputs against float32's ``reference``."""
        raise NotImplementedError

    def get_embedding_dimension(self) -> int | None:
        for module in reversed(self.modules_list):
            getter = getattr(module, "get_embedding_dimension", None)
            if getter is not None and (dim := getter()):
                return int(dim)
        return None

    # -- saving -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the model in the sentence-transformers format, atomically (temp dir + rename)."""
        path = Path(path)
        if self.dtype == "int8":
            raise ModelLoadError(
                f"{path}: this model computes in int8 (quantised in place); save the float model it was loaded from"
            )
        if path.exists() and any(path.iterdir()) and not is_model_dir(path):
            raise ModelLoadError(
                f"{path}: exists, is not empty and holds no model; refusing to replace it. "
                "Choose an empty or new directory"
            )
        with atomic_directory(path) as tmp:
            st_format.save_modules(tmp, self.modules_list)
            st_format.write_st_config(
                tmp,
                self.model_type,
                prompts=self.prompts,
                default_prompt_name=self.default_prompt_name,
                similarity_fn_name=self.similarity_fn_name,
                **self._extra_config(),
            )
            self._write_model_card(tmp)
        return path

    def _write_model_card(self, path: Path) -> None:
        stack = " → ".join(type(m).__name__ for m in self.modules_list)
        card = (
            f"# {self.model_type} model\n\nSaved by raytrieve. Stack: {stack}.\n\n"
            "Loads with `raytrieve` and with `sentence-transformers`.\n"
        )
        (path / "README.md").write_text(card, encoding="utf-8")

    # -- inference ----------------------------------------------------------------------
    def resolve_prompt(self, prompt: str | None, prompt_name: str | None) -> str | None:
        """The text put before each input ("" for the default empty ``query`` and ``document``
        prompts, as sentence-transformers gives), or None where no prompt applies. Where a prompt
        is recorded or compared (a job's manifest, mining's check), "" and None are the same
        (``recorded_prompt``): passing None back to ``encode`` would apply ``default_prompt_name``."""
        if prompt is None and prompt_name is not None:
            if prompt_name not in self.prompts:
                raise InputError(
                    f"unknown prompt_name {prompt_name!r}; this model's prompts are {sorted(self.prompts) or 'none'} "
                    "(pass prompt= for a custom string)"
                )
            prompt = self.prompts[prompt_name]
        elif prompt is None and self.default_prompt_name is not None:
            prompt = self.prompts[self.default_prompt_name]
        return prompt

    def prompt_name_for(self, task: str) -> str | None:
        """The prompt encode_query / encode_document use: the first of the task's names the model has."""
        return next((n for n in TASK_PROMPT_NAMES[task] if n in self.prompts), None)

    def tokenize(self, texts: Sequence[Any], task: str | None = None, prompt: str | None = None) -> Features:
        # The first module tokenizes; a Router picks its route by ``task`` (others ignore it).
        return cast("InputModule", self.first_module).tokenize(texts, prompt=prompt, task=task)

    def forward(self, features: Features, task: str | None = None) -> Features:
        # Every module gets the forward arguments (the module contract); a Router routes by ``task``.
        for module in self.stack:
            features = module(features, task=task)
        return features

    # The stack over inputs in length-sorted batches, rows in input order (encoders/batching.py);
    # a function bound as a method, so each kind calls self._batched(...).
    _batched = run_batches

    # -- several processes on one machine (encoders/pool.py) ---------------------------------
    def start_multi_process_pool(self, target_devices: Sequence[str | torch.device] | None = None) -> dict[str, Any]:
        """Worker processes, one per device ("cuda:0", "cpu", ...; default: every GPU, else two CPU
        workers) for ``encode`` / ``predict(..., pool=pool)``, as sentence-transformers. The model
        stays on the CPU after this call. Stop them with ``stop_multi_process_pool(pool)``."""
        from raytrieve.encoders import pool

        return pool.start(self, target_devices)

    @staticmethod
    def stop_multi_process_pool(pool: dict[str, Any]) -> None:
        from raytrieve.encoders import pool as workers

        workers.stop(workers.check(pool))

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """Eval mode and no autograd for the block; the previous train/eval mode comes back after."""
        was_training = self.training
        # Switching modes walks every submodule (a millisecond a call for a small model, most of
        # it attribute writes): skipped when none is training, the state it would leave anyway.
        switch = any(m.training for m in self.modules())
        if switch:
            self.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            if switch:
                self.train(was_training)

    @staticmethod
    def _as_list(inputs: Any, what: str) -> tuple[list[Any], bool]:
        """(list of inputs, whether a single input was given)."""
        if isinstance(inputs, Pretokenized):
            return inputs, False  # type: ignore[return-value]
        if isinstance(inputs, str):
            return [inputs], True
        if isinstance(inputs, np.ndarray):
            inputs = inputs.tolist()
        if isinstance(inputs, (Mapping, set, frozenset)):  # a dict would give its keys, a set no order
            raise InputError(f"{what} must be a string or a list of strings, got {type(inputs).__name__}; pass a list")
        try:
            items = list(inputs)
        except TypeError:
            raise InputError(f"{what} must be a string or a list of strings, got {type(inputs).__name__}") from None
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise InputError(f"{what}[{i}] must be a string, got {type(item).__name__}")
        return items, False


class EmbeddingEncoder(Encoder):
    """What dense and sparse encoders share on top of the base: query/document encoding and similarity."""

    def _check_stack(self, saved_type: str | None) -> None:
        # A reranker's stack gives scores, not embeddings: encode would fail on its first batch.
        head = self.stack[0]
        if saved_type == "CrossEncoder" or (isinstance(head, Transformer) and head.task == "sequence-classification"):
            raise InputError(
                f"{type(self).__name__}: {self.name_or_path or 'these modules'} is a cross-encoder (a reranker, "
                "which scores query-document pairs); load it with CrossEncoder, or choose an embedding model"
            )

    def get_sentence_embedding_dimension(self) -> int | None:
        """sentence-transformers' earlier name of ``get_embedding_dimension`` (it warns of the
        rename, and so does this)."""
        warnings.warn(
            "get_sentence_embedding_dimension was renamed get_embedding_dimension", FutureWarning, stacklevel=2
        )
        return self.get_embedding_dimension()

    def encode(self, sentences: Any, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def _encode_as(self, task: str, sentences: Any, kwargs: dict[str, Any]) -> Any:
        sentences = texts_argument(sentences, kwargs.pop("inputs", None), f"encode_{task}")
        if kwargs.get("prompt_name") is None and kwargs.get("prompt") is None:
            kwargs["prompt_name"] = self.prompt_name_for(task)
        kwargs.setdefault("task", task)
        return self.encode(sentences, **kwargs)

    def encode_query(self, sentences: Any = None, **kwargs: Any) -> Any:
        """encode() with the model's query prompt (if it has one) and the query route."""
        return self._encode_as("query", sentences, kwargs)

    def encode_document(self, sentences: Any = None, **kwargs: Any) -> Any:
        """encode() with the model's document prompt (document / passage / corpus) and route."""
        return self._encode_as("document", sentences, kwargs)

    def similarity(self, a: Any, b: Any) -> Tensor:
        """[len(a), len(b)] scores with the model's similarity function (higher = closer)."""
        from raytrieve.encoders import similarity as sim

        return sim.similarity(a, b, self._similarity_name())

    def similarity_pairwise(self, a: Any, b: Any) -> Tensor:
        from raytrieve.encoders import similarity as sim

        return sim.pairwise(a, b, self._similarity_name())

    def _similarity_name(self) -> str:
        if self.similarity_fn_name is None:  # only if a caller cleared it: the kinds have a default
            raise InputError(f"{type(self).__name__} has no similarity function; set similarity_fn_name")
        return self.similarity_fn_name


def set_max_seq_length(model: Any, length: int) -> None:
    """Truncation length of every input module (both routes of a Router model)."""
    for module in model.first_module.input_modules():
        if hasattr(module, "max_seq_length"):
            module.max_seq_length = length
