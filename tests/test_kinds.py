"""The kind table (raytrieve/kinds.py): each row names things that exist and agree with the
code that uses them, so a new kind is one row plus its classes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from raytrieve.errors import ConfigError
from raytrieve.kinds import MODEL_KINDS, model_kind, served_kind


def test_kind_module_imports_without_torch():
    code = "import sys, raytrieve.kinds; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", sorted(MODEL_KINDS))
def test_every_kind_names_classes_that_exist(name):
    import raytrieve.encoders
    from raytrieve.encoders.base import Encoder
    from raytrieve.index import base as index_base
    from raytrieve.losses.registry import loss_classes

    kind = MODEL_KINDS[name]
    assert kind.name == name and model_kind(name) is kind and model_kind(kind) is kind
    cls = kind.encoder_class()
    # The class is the one the package exports under its own name.
    assert issubclass(cls, Encoder) and getattr(raytrieve.encoders, cls.__name__) is cls
    assert loss_classes(kind.loss_kind), f"{name}: no losses registered for its loss kind"
    assert served_kind(kind.serve_field) is kind
    if kind.vectors is None:
        assert kind.index is None and kind.index_class() is None
    else:
        index = kind.index_class()
        assert index is not None and index.kind == kind.vectors
        assert index_base.KINDS[kind.vectors] == kind.index


@pytest.mark.parametrize("name", sorted(MODEL_KINDS))
def test_load_encoder_builds_the_kinds_class(name, tiny_models):
    from raytrieve.encoders import load_encoder

    model = load_encoder(name, tiny_models[name], max_seq_length=16)
    assert type(model) is MODEL_KINDS[name].encoder_class()
    assert model.max_seq_length == 16


def test_unknown_kind_names_the_field_and_the_choices():
    with pytest.raises(ConfigError, match=r"model\.kind: unknown model kind 'colbert'; use one of"):
        model_kind("colbert")
    with pytest.raises(ConfigError, match="reranker"):
        served_kind("cross")


def test_a_reranker_must_score_one_label_per_pair(tiny_dirs):
    """A 3-label classifier (NLI) served as the reranker passed the start and then every rerank
    was a 500 (scores of shape [n, 3]); the label count read from its files is the model's own."""
    from raytrieve.encoders import CrossEncoder
    from raytrieve.errors import ConfigError
    from raytrieve.kinds import refuse_other_kind, saved_num_labels
    from raytrieve.serve.config import ServeConfig
    from raytrieve.serve.launch import check_before_start
    from raytrieve.config import from_dict

    for name in ("cls1", "cls3"):
        assert saved_num_labels(tiny_dirs[name]) == CrossEncoder(tiny_dirs[name], device="cpu").num_labels
    refuse_other_kind(tiny_dirs["cls1"], "reranker", "x", "fix")
    with pytest.raises(ConfigError, match=r"^serve.yaml.reranker.model: .*cls3 scores 3 labels per pair \(a classifier"):
        check_before_start(from_dict(ServeConfig, {"reranker": {"model": str(tiny_dirs["cls3"])}}), "serve.yaml")
