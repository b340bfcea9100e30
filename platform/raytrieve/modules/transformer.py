"""A Hugging Face transformer as the input module of a stack.

One class for the three heads our model kinds need, chosen by ``task``:
``feature-extraction`` (token embeddings, dense models), ``fill-mask`` (MLM logits over the
vocabulary as token embeddings, SPLADE) and ``sequence-classification`` (logits as scores,
cross-encoders).

Tokenization is split in two so that Ray Data can run the expensive half on CPU actors:
``tokenize_ids`` turns texts into unpadded id lists, ``collate`` pads a batch of them into
tensors. ``tokenize`` does both.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from raytrieve._io import read_json, write_json
from raytrieve.errors import ConfigError, ModelLoadError, RaytrieveError
from raytrieve.fast_tokenizer import text_token_ids
from raytrieve.modules.base import Features, Module
from raytrieve.modules.mlm_head import mlm_transform

log = logging.getLogger(__name__)

TextInput = str | tuple[str, str] | list[str]

# task -> (auto class, model output field, features key written)
TASKS: dict[str, tuple[type, str, str]] = {
    "feature-extraction": (AutoModel, "last_hidden_state", "token_embeddings"),
    "fill-mask": (AutoModelForMaskedLM, "logits", "token_embeddings"),
    "sequence-classification": (AutoModelForSequenceClassification, "logits", "scores"),
}
# The keys sentence-transformers 6 writes next to max_seq_length for a non-default task.
_V6_TASK_KEYS = ("transformer_task", "modality_config", "module_output_name")
_LEGACY_CONFIG_FILES = (
    "sentence_bert_config.json",
    "sentence_roberta_config.json",
    "sentence_distilbert_config.json",
    "sentence_camembert_config.json",
    "sentence_albert_config.json",
    "sentence_xlm-roberta_config.json",
    "sentence_xlnet_config.json",
)
_HUGE = 1_000_000  # tokenizers without a limit report model_max_length ~1e30


def position_limit(model: torch.nn.Module) -> int | None:
    """The longest input ``model`` (a transformers model, or its task head's) can run: the rows
    of its absolute position embeddings, less those up to the padding row where positions start
    after it (RoBERTa, XLM-R, MPNet: 514 rows, 512 positions). None for relative or rotary
    positions (no such table), which set no hard limit here."""
    base = getattr(model, "base_model", model)
    table = getattr(getattr(base, "embeddings", None), "position_embeddings", None)
    if not isinstance(table, torch.nn.Embedding):
        return None
    padding = table.padding_idx
    return table.num_embeddings - (padding + 1 if padding is not None else 0)


def saved_position_limit(folder: Path) -> int | None:
    """``position_limit`` of the transformer saved in ``folder`` (in a sentence-transformers
    folder, where its modules.json puts the Transformer module; with a Router, the smallest of
    its routes' transformers), from each config alone: the model is built on the meta device, no
    weights are read. None where that cannot tell: no transformers config there, or a model type
    that needs remote code."""
    limits = [limit for root in _transformer_folders(folder) if (limit := _config_position_limit(root)) is not None]
    return min(limits) if limits else None


def _transformer_folders(folder: Path) -> list[Path]:
    """Where the Transformer modules of the model saved in ``folder`` keep their config.json:
    the modules.json entries whose type is a Transformer (by the module registry, every alias of
    the type), and those inside a Router's routes (its router_config.json); ``folder`` itself
    when there is no modules.json (a plain transformers folder)."""
    from raytrieve.modules import module_class_for
    from raytrieve.modules.router import Router

    def module_class(type_name: object) -> type | None:
        try:
            return module_class_for(str(type_name or ""))
        except RaytrieveError:
            return None

    spec = folder / "modules.json"
    if not spec.is_file():
        return [folder]
    found: list[Path] = []
    for entry in read_json(spec):
        cls, path = module_class(entry.get("type")), folder / entry.get("path", "")
        if _is_transformer(cls):
            found.append(path)
        elif cls is not None and issubclass(cls, Router) and (path / Router.config_file).is_file():
            types = read_json(path / Router.config_file).get("types", {})
            found += [path / sub for sub, name in types.items() if _is_transformer(module_class(name))]
    return found


def _is_transformer(cls: type | None) -> bool:
    return cls is not None and issubclass(cls, Transformer)


def _config_position_limit(root: Path) -> int | None:
    if not (root / "config.json").is_file():
        return None
    try:
        with quiet_progress():
            config = AutoConfig.from_pretrained(root, local_files_only=True)
        with torch.device("meta"):
            model = AutoModel.from_config(config)
    except (OSError, ValueError, KeyError):
        return None
    return position_limit(model)


def find_module_config(directory: Path) -> dict[str, Any]:
    for name in _LEGACY_CONFIG_FILES:
        if (directory / name).exists():
            return read_json(directory / name)
    return {}


class Transformer(Module):
    st_type = "sentence_transformers.models.Transformer"
    st_aliases = ("sentence_transformers.base.modules.transformer.Transformer",)
    config_file = "sentence_bert_config.json"
    save_in_root = True
    default_task: ClassVar[str] = "feature-extraction"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        task: str | None = None,
        max_seq_length: int | None = None,
        do_lower_case: bool = False,
    ) -> None:
        super().__init__()
        task = task or self.default_task
        if task not in TASKS:
            raise ConfigError(f"Transformer: unknown task {task!r}; choose from {list(TASKS)}")
        self.task = task
        self.auto_model = model
        self.tokenizer = tokenizer
        self.do_lower_case = do_lower_case
        if max_seq_length is None:
            limits = [tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", None)]
            limits = [x for x in limits if isinstance(x, int) and 0 < x < _HUGE]
            max_seq_length = min(limits) if limits else 512
        limit = position_limit(model)
        if limit is not None and int(max_seq_length) > limit:
            # A saved (or passed) length the model cannot run: sentence-transformers keeps it and
            # fails on the first input that long; here it is cut to what runs. Setting the
            # property later refuses instead (an explicit choice, not a folder's).
            log.warning(
                "max_seq_length %s is more than the %s positions this model can run; using %s",
                max_seq_length,
                limit,
                limit,
            )
            max_seq_length = limit
        self.max_seq_length = int(max_seq_length)
        self._output_field, self.output_key = TASKS[task][1], TASKS[task][2]
        self._accepts_token_types = "token_type_ids" in inspect.signature(model.forward).parameters
        self._prompt_lengths: dict[str, int] = {}
        # Adaptive-layer training: keep every layer's hidden states in the features, or
        # answer from a kept layer instead of running the model (losses/modifiers.py).
        self.keep_hidden_states = False
        self.cached_layer: int | None = None
        # backend "onnx" (encoders/onnx_runtime.py): an ONNX Runtime session that stands in for
        # auto_model at inference; None computes in torch.
        self.onnx_model: Any = None

    @property
    def max_seq_length(self) -> int:
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        """Refused past what the model's position embeddings can run (``position_limit``): the
        first input that long would fail mid-encode (a tensor size mismatch), not be truncated."""
        limit = position_limit(self.auto_model)
        if limit is not None and int(value) > limit:
            raise ConfigError(
                f"max_seq_length {int(value)} is more than the {limit} positions this model can run (its position "
                f"embeddings: max_position_embeddings in its config.json): set max_seq_length to at most {limit}"
            )
        self._max_seq_length = int(value)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        task: str | None = None,
        max_seq_length: int | None = None,
        do_lower_case: bool = False,
        trust_remote_code: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        tokenizer_kwargs: dict[str, Any] | None = None,
        config_kwargs: dict[str, Any] | None = None,
    ) -> Transformer:
        path = Path(path)
        task = task or cls.default_task
        if task not in TASKS:
            raise ConfigError(f"Transformer: unknown task {task!r}; choose from {list(TASKS)}")
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"{path}: no config.json, so this is not a transformers model folder; "
                "point at a sentence-transformers or Hugging Face model directory"
            )
        hub = {"trust_remote_code": trust_remote_code, "local_files_only": True}
        try:
            with quiet_progress():
                config = AutoConfig.from_pretrained(path, **hub, **(config_kwargs or {}))
                model = TASKS[task][0].from_pretrained(path, config=config, **hub, **(model_kwargs or {}))
                tokenizer = AutoTokenizer.from_pretrained(path, **hub, **(tokenizer_kwargs or {}))
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"{path}: cannot load the transformer ({type(e).__name__}: {e})") from e
        return cls(model, tokenizer, task=task, max_seq_length=max_seq_length, do_lower_case=do_lower_case)

    @classmethod
    def load(cls, directory: Path, trust_remote_code: bool = False, **kwargs: Any) -> Transformer:
        directory = Path(directory)
        config = dict(find_module_config(directory))
        task = config.get("transformer_task") or cls.default_task
        model_kwargs = config.get("model_kwargs", config.get("model_args")) or {}
        tokenizer_kwargs = config.get("processor_kwargs", config.get("tokenizer_args")) or {}
        config_kwargs = config.get("config_kwargs", config.get("config_args")) or {}
        for d in (model_kwargs, tokenizer_kwargs, config_kwargs):
            d.pop("trust_remote_code", None)  # a saved config never grants code execution
        # sentence-transformers 6 no longer writes max_seq_length here; the tokenizer's
        # model_max_length then carries it, which __init__ falls back to.
        return cls.from_pretrained(
            directory,
            task=task,
            max_seq_length=config.get("max_seq_length"),
            do_lower_case=bool(config.get("do_lower_case", False)),
            trust_remote_code=trust_remote_code,
            model_kwargs=model_kwargs,
            tokenizer_kwargs=tokenizer_kwargs,
            config_kwargs=config_kwargs,
        )

    def saved_type(self) -> str:
        # A classification head is only expressible in the sentence-transformers 6 layout.
        return self.st_aliases[0] if self.task == "sequence-classification" else self.st_type

    def config_dict(self) -> dict[str, Any]:
        config: dict[str, Any] = {"max_seq_length": self.max_seq_length, "do_lower_case": self.do_lower_case}
        if self.task == "sequence-classification":
            config.update(
                transformer_task=self.task,
                modality_config={"text": {"method": "forward", "method_output_name": self._output_field}},
                module_output_name=self.output_key,
            )
        return config

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with quiet_progress():
            self.auto_model.save_pretrained(directory, safe_serialization=True)
        # model_max_length mirrors max_seq_length: sentence-transformers 6 reads it from here.
        self.tokenizer.model_max_length = self.max_seq_length
        self.tokenizer.save_pretrained(directory)
        write_json(directory / self.config_file, self.config_dict())

    # -- tokenization -------------------------------------------------------------------
    @property
    def accepts_token_types(self) -> bool:
        """Whether the model's forward takes token_type_ids (tokenize_ids then gives them)."""
        return self._accepts_token_types

    def tokenize_ids(self, texts: Sequence[TextInput], prompt: str | None = None) -> dict[str, list[list[int]]]:
        """Token ids per text, truncated to max_seq_length, not padded."""
        return tokenize_text_ids(
            self.tokenizer, texts, prompt, self.max_seq_length, self.do_lower_case, self._accepts_token_types
        )

    def collate(self, encoded: dict[str, list[list[int]]]) -> Features:
        """Pad a batch of id lists into tensors (padding side and id from the tokenizer)."""
        # transformers types pad_token_id (a __getattr__ special token) as any id or token.
        pad_id = cast("int | None", self.tokenizer.pad_token_id)
        return pad_ids(encoded, pad_id or 0, left=self.tokenizer.padding_side == "left")

    def prompt_length(self, prompt: str) -> int:
        """Tokens the prompt occupies at the start of a text (its trailing special token excluded)."""
        if prompt not in self._prompt_lengths:
            self._prompt_lengths[prompt] = prompt_token_count(
                self.tokenizer, self.tokenize_ids([prompt])["input_ids"][0]
            )
        return self._prompt_lengths[prompt]

    def tokenize(self, texts: Sequence[TextInput], prompt: str | None = None, **kwargs: Any) -> Features:
        features = self.collate(self.tokenize_ids(texts, prompt))
        if prompt:
            features["prompt_length"] = self.prompt_length(prompt)
        return features

    # -- compute ------------------------------------------------------------------------
    def forward(self, features: Features, **kwargs: Any) -> Features:
        if self.cached_layer is not None and "all_layer_embeddings" in features:
            return {**features, self.output_key: features["all_layer_embeddings"][self.cached_layer]}
        inputs = self.model_inputs(features)
        if self.keep_hidden_states:
            out = self.auto_model(**inputs, return_dict=True, output_hidden_states=True)
            features[self.output_key] = getattr(out, self._output_field)
            features["all_layer_embeddings"] = out.hidden_states
            return features
        features[self.output_key] = self.run(inputs)
        return features

    @property
    def output_name(self) -> str:
        """What ``compute`` returns (the features key it is written under)."""
        return self.output_key

    def model_inputs(self, features: Features) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": features["input_ids"], "attention_mask": features["attention_mask"]}
        if "token_type_ids" in features and self._accepts_token_types:
            inputs["token_type_ids"] = features["token_type_ids"]
        return inputs

    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``compute(inputs)``, in ONNX Runtime when a current export is attached at inference."""
        if self.onnx_model is not None and not self.training:
            if self.onnx_model.current(self.auto_model):
                return self.onnx_model(inputs).to(inputs["input_ids"].device)
            # Trained or edited since the export: its outputs would be the old weights'.
            log.warning("weights changed since the ONNX export; computing in torch (set_backend('onnx') re-exports)")
            self.onnx_model = None
        return self.compute(inputs)

    def compute(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The tensor this module writes under ``output_key``, computed in torch (what an ONNX
        export of this module computes: encoders/onnx_runtime.py)."""
        return getattr(self.auto_model(**inputs, return_dict=True), self._output_field)

    def get_embedding_dimension(self) -> int:
        if self.task == "fill-mask":
            return int(self.auto_model.config.vocab_size)
        if self.task == "sequence-classification":
            num_labels = self.auto_model.config.num_labels
            assert num_labels is not None, "a sequence-classification model's config has its labels"
            return int(num_labels)
        return int(self.auto_model.config.hidden_size)


class MLMTransformer(Transformer):
    """The masked-LM head of a transformer: per-token logits over the vocabulary (SPLADE).

    Followed by SpladePooling, it leaves the vocabulary projection to the pooling
    (``defer_decoder``): it then writes the decoder's input as ``mlm_hidden_states`` and the
    decoder as ``mlm_decoder`` instead of ``token_embeddings`` (modules/mlm_head.py says why).
    """

    st_type = "sentence_transformers.sparse_encoder.models.MLMTransformer"
    st_aliases = ("sentence_transformers.sparse_encoder.modules.mlm_transformer.MLMTransformer",)
    default_task = "fill-mask"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decoder_deferred = False

    def saved_type(self) -> str:
        return self.st_type

    def defer_decoder(self) -> None:
        """Write the decoder's input and the decoder instead of the logits, where this model's
        head is one modules/mlm_head.py splits (``decoder_deferred`` says whether it does). An
        attached ONNX export computes one or the other: its state stays as it was exported."""
        if self.onnx_model is not None:
            return
        decoder = self.auto_model.get_output_embeddings()
        linear = type(decoder) is torch.nn.Linear and decoder.bias is not None
        self.decoder_deferred = linear and mlm_transform(self.auto_model) is not None

    @property
    def output_name(self) -> str:
        """What ``compute`` returns: the logits, or the decoder's input when the decoder is deferred."""
        return "mlm_hidden_states" if self.decoder_deferred else self.output_key

    @property
    def _projects_later(self) -> bool:
        # Layer-wise training (keep_hidden_states, cached_layer) reads logits per layer: full path.
        return self.decoder_deferred and not self.keep_hidden_states and self.cached_layer is None

    def forward(self, features: Features, **kwargs: Any) -> Features:
        # A features dict passed through before keeps no stale decoder input for SpladePooling.
        features.pop("mlm_hidden_states", None)
        features.pop("mlm_decoder", None)
        if not self._projects_later:
            return super().forward(features, **kwargs)
        features["mlm_hidden_states"] = self.run(self.model_inputs(features))
        # Looked up per call: int8 quantisation replaces the decoder module in place.
        features["mlm_decoder"] = self.auto_model.get_output_embeddings()
        return features

    def compute(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        transform = mlm_transform(self.auto_model) if self._projects_later else None
        if transform is None:
            return super().compute(inputs)
        body = cast("PreTrainedModel", self.auto_model.base_model)
        return transform(body(**inputs, return_dict=True).last_hidden_state)


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """No transformers progress bars (one per load or save is noise in logs and Ray workers)."""
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def prompt_token_count(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> int:
    """Tokens a tokenized prompt occupies at the start of a text: its trailing special token
    (e.g. [SEP]) is not part of what the text's own tokens follow."""
    n = len(ids)
    return n - 1 if n and ids[-1] in set(tokenizer.all_special_ids) else n


def tokenize_text_ids(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[TextInput],
    prompt: str | None,
    max_seq_length: int,
    do_lower_case: bool,
    accepts_token_types: bool,
) -> dict[str, list[list[int]]]:
    """A Transformer module's tokenization (texts or text pairs, prompt in front of the first
    text, truncated, not padded); also used without the weights (encoders/tokenizer_only.py)."""

    def encode(first: list[str], second: list[str] | None) -> dict[str, list[list[int]]]:
        enc = tokenizer(
            first,
            second,
            truncation="longest_first",
            max_length=max_seq_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=accepts_token_types,
        )
        out = {"input_ids": enc["input_ids"]}
        if accepts_token_types and "token_type_ids" in enc:
            out["token_type_ids"] = enc["token_type_ids"]
        return out

    def measure(texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        enc = tokenizer(
            texts,
            add_special_tokens=False,
            truncation=False,
            padding=False,
            return_offsets_mapping=True,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,  # no "longer than the specified maximum sequence length" warning
        )
        return list(zip(enc["input_ids"], enc["offset_mapping"]))

    # Offsets need a fast tokenizer; a left-truncating one keeps the ends, which the cut would drop.
    cuts = tokenizer.is_fast and tokenizer.truncation_side == "right"
    return text_token_ids(
        texts,
        prompt,
        encode,
        do_lower_case=do_lower_case,
        measure=measure if cuts else None,
        max_length=max_seq_length,
    )


def pad_ids(encoded: dict[str, list[list[int]]], pad_id: int, left: bool = False) -> Features:
    """Pad id lists to the longest in the batch; attention_mask marks real tokens."""
    ids = encoded["input_ids"]
    n = len(ids)
    width = max((len(x) for x in ids), default=0)
    out: Features = {}
    mask = np.zeros((n, width), dtype=np.int64)
    for key, rows in encoded.items():
        fill = pad_id if key == "input_ids" else 0
        arr = np.full((n, width), fill, dtype=np.int64)
        for i, row in enumerate(rows):
            if left:
                arr[i, width - len(row) :] = row
            else:
                arr[i, : len(row)] = row
        out[key] = torch.from_numpy(arr)
    for i, row in enumerate(ids):
        if left:
            mask[i, width - len(row) :] = 1
        else:
            mask[i, : len(row)] = 1
    out["attention_mask"] = torch.from_numpy(mask)
    return out
