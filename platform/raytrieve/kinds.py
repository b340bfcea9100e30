"""The model kinds (dense, sparse, cross): what each one is, in one table.

Configs name a kind by string (``model.kind: dense``); code looks the string up here once,
with ``model_kind(name)``, and then asks the object instead of comparing strings. What a
kind decides lives on its row: the encoder class, the losses it takes (the loss registry is
keyed by ``name``), whether training rows travel as token ids or as texts, the vectors it
makes (the encode job's output field and the index type that holds them), the transformers
task of a plain transformers folder, and the name the serving config gives it.

Torch-free at import (the heavy classes are import paths, loaded on first use): the training
config, the Ray Data stages and Ray Train's controller read this module without torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from raytrieve.errors import ConfigError


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class ModelKind:
    name: str
    # "module:Class" of the encoder; load_encoder builds this class.
    encoder: str
    # The transformers task whose auto class reads a plain transformers folder (no modules.json).
    hf_task: str
    # Training rows carry token ids per text column; False: texts, which the losses pair and
    # tokenize themselves (cross-encoder losses build their in-batch pairs inside the loss).
    tokenized_rows: bool
    # The vectors the model makes: the encode job's output field and index/ sub-folder, and
    # the index class ("module:Class") that searches them. None: the kind scores pairs instead.
    vectors: str | None
    index: str | None
    # The field of the serving config (serve/config.py) that deploys a model of this kind.
    serve_field: str
    # config_sentence_transformers.json's model_type for this kind (sentence-transformers 5+).
    st_model_type: str

    def encoder_class(self) -> type[Any]:
        return _load(self.encoder)

    def index_class(self) -> type[Any] | None:
        return _load(self.index) if self.index else None

    @property
    def loss_kind(self) -> str:
        """The key of this kind's losses in the loss registry (losses/base.py ``registered``)."""
        return self.name


DENSE = ModelKind(
    name="dense",
    encoder="raytrieve.encoders.dense:DenseEncoder",
    hf_task="feature-extraction",
    tokenized_rows=True,
    vectors="dense",
    index="raytrieve.index.dense:DenseIndex",
    serve_field="dense",
    st_model_type="SentenceTransformer",
)
SPARSE = ModelKind(
    name="sparse",
    encoder="raytrieve.encoders.sparse:SparseEncoder",
    hf_task="fill-mask",
    tokenized_rows=True,
    vectors="sparse",
    index="raytrieve.index.sparse:SparseIndex",
    serve_field="sparse",
    st_model_type="SparseEncoder",
)
CROSS = ModelKind(
    name="cross",
    encoder="raytrieve.encoders.cross:CrossEncoder",
    hf_task="sequence-classification",
    tokenized_rows=False,
    vectors=None,
    index=None,
    serve_field="reranker",
    st_model_type="CrossEncoder",
)

MODEL_KINDS: dict[str, ModelKind] = {k.name: k for k in (DENSE, SPARSE, CROSS)}


def model_kind(kind: str | ModelKind, where: str = "model.kind") -> ModelKind:
    """The kind named ``kind`` (a ModelKind passes through); ``where`` names the config field in the error."""
    if isinstance(kind, ModelKind):
        return kind
    try:
        return MODEL_KINDS[kind]
    except (KeyError, TypeError):
        raise ConfigError(f"{where}: unknown model kind {kind!r}; use one of {sorted(MODEL_KINDS)}") from None


def served_kind(field: str) -> ModelKind:
    """The kind a serving config field (dense / sparse / reranker) deploys."""
    for k in MODEL_KINDS.values():
        if k.serve_field == field:
            return k
    fields = [k.serve_field for k in MODEL_KINDS.values()]
    raise ConfigError(f"serve: unknown model field {field!r}; use one of {fields}")


def refuse_other_kind(folder: Any, field: str, label: str, fix: str) -> None:
    """Refuse the model saved in ``folder`` when it is of another kind than serving ``field``
    (dense / sparse / reranker) stands for: it would load as ``field``'s kind, or fail deep in
    a job with a traceback. Files that cannot tell pass. The ConfigError reads ``{label} is a
    <kind> model (...); {fix}``; ``fix`` may name the kind found as ``{name}`` (dense / sparse /
    cross) or ``{field}`` (its serving field). A reranker must also score one label per pair."""
    found = saved_kind(folder)
    if found is not None and found.serve_field != field:
        raise ConfigError(
            f"{label} is a {found.name} model ({found.st_model_type}, by the files in {folder}); "
            + fix.format(name=found.name, field=found.serve_field)
        )
    labels = saved_num_labels(folder) if field == "reranker" else None
    if labels is not None and labels != 1:  # every rerank (and its margins) reads one score per pair
        raise ConfigError(
            f"{label} scores {labels} labels per pair (a classifier, such as NLI), not one relevance score; "
            "rerank with a single-label cross-encoder"
        )


def saved_num_labels(folder: Any) -> int | None:
    """The labels a sequence-classification head saved in ``folder`` scores (its config.json's
    ``num_labels``, else its ``id2label``); None when the files do not say."""
    import json
    from pathlib import Path

    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    if isinstance(config.get("num_labels"), int):
        return config["num_labels"]
    id2label = config.get("id2label")
    return len(id2label) if isinstance(id2label, dict) and id2label else None


# Module types whose presence in modules.json makes a folder sparse (sentence-transformers 5+ names).
_SPARSE_MODULES = ("SpladePooling", "SparseStaticEmbedding", "SparseAutoEncoder", "MLMTransformer")


def saved_kind(folder: Any) -> ModelKind | None:
    """The kind of the model saved in ``folder``, read from its JSON files only (no torch): the
    model_type sentence-transformers 5+ and raytrieve write, else modules.json's module types,
    else a plain transformers folder's sequence-classification head. None: no way to tell."""
    import json
    from pathlib import Path

    def read(name: str) -> Any:
        try:
            return json.loads((Path(folder) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    st_config = read("config_sentence_transformers.json")
    model_type = st_config.get("model_type") if isinstance(st_config, dict) else None
    for k in MODEL_KINDS.values():
        if model_type == k.st_model_type:
            return k
    modules = read("modules.json")
    if isinstance(modules, list) and modules:
        types = " ".join(str(m.get("type", "")) for m in modules if isinstance(m, dict))
        if any(name in types for name in _SPARSE_MODULES):
            return SPARSE
        if "Pooling" in types:
            return DENSE
        return None
    config = read("config.json")
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if isinstance(architectures, list) and any(str(a).endswith("ForSequenceClassification") for a in architectures):
        return CROSS
    return None
