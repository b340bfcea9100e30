"""Shipped weights that are not a sentence-transformers folder yet, converted once into one.

The catalogue (``raytrieve.assets``) says where a variant's weights lie and in which format;
this module turns the foreign formats into a sentence-transformers folder in the cache
(``$RAYTRIEVE_CACHE/models/<variant>-<source files>-<conversion>``: ``assets.converted_folder``),
written atomically, so
later loads read it directly. ``raytrieve.model_ref.resolve_model`` calls it, on first use of
such a variant only.

It lives beside the encoders rather than in ``st_format`` because a conversion loads the
foreign weights into an encoder of the variant's kind and saves that: it sits above the
encoder classes, while ``st_format`` sits below them (``encoders.base`` imports it).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raytrieve import assets
from raytrieve._io import atomic_directory, mark_used
from raytrieve.encoders.cross import CrossEncoder
from raytrieve.encoders.sparse import SparseEncoder
from raytrieve.errors import AssetError
from raytrieve.modules import Transformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def converted_model(variant: assets.Variant) -> Path:
    """The sentence-transformers folder of ``variant`` (a format other than sentence-transformers),
    converted into the cache on first use; a changed package, catalogue architecture or
    converter revision converts again (``assets.converted_folder``)."""
    convert = CONVERTERS.get(variant.source.format)
    if convert is None:
        raise AssetError(
            f"variant {variant.name!r}: source.format {variant.source.format!r} needs no conversion or has no "
            f"converter; converted formats: {sorted(CONVERTERS)}"
        )
    src = assets.package_dir(variant.source)
    target = assets.converted_folder(variant)
    if (target / "modules.json").exists():
        return mark_used(target)
    # Another process may convert the same weights at the same time (encode actors starting on
    # one node, the test suite's two processes): the first copy renamed into place wins, and a
    # later one is dropped rather than swapped in under the first one's readers. A folder there
    # without modules.json is a damaged copy, replaced.
    try:
        with atomic_directory(target, overwrite=target.exists()) as tmp:
            convert(src, tmp, variant.source.architecture)
    except FileExistsError:
        if not (target / "modules.json").exists():
            raise
    return target


def convert_masked_lm(src: Path, out: Path, arch: dict[str, Any]) -> None:
    """A plain transformers masked-LM folder becomes a SPLADE encoder (MLM transformer, max pooling)."""
    SparseEncoder(src, device="cpu").save(out)


def dequantized_onnx_weights(onnx_path: Path) -> dict[str, Any]:
    """Float32 tensors named as in BertForSequenceClassification, from an int8 ONNX graph.

    Quantized initializers come as NAME_quantized / NAME_scale / NAME_zero_point. Named ones
    (embeddings) keep their parameter name; MatMul weights are anonymous (``onnx::MatMul_N``),
    so each is named after the bias its MatMulInteger output flows into, and transposed from
    ONNX's [in, out] to torch's [out, in].
    """
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def bias_after(output: str) -> str | None:
        frontier, seen = [output], set()
        while frontier:
            cur = frontier.pop()
            for node in consumers.get(cur, []):
                if id(node) in seen:
                    continue
                seen.add(id(node))
                if node.op_type == "Add":
                    named = [i for i in node.input if i in inits and i.endswith(".bias")]
                    if named:
                        return named[0]
                if node.op_type in ("Cast", "Mul", "Add"):
                    frontier.extend(node.output)
        return None

    weights: dict[str, Any] = {}
    for name, value in inits.items():
        if name.endswith("_quantized"):
            base = name[: -len("_quantized")]
            scale, zero = inits[base + "_scale"], inits[base + "_zero_point"]
            real = (value.astype(np.float32) - zero.astype(np.float32)) * scale.astype(np.float32)
            matmul = next((n for n in consumers.get(name, []) if n.op_type == "MatMulInteger"), None)
            if matmul is not None:
                real = real.T.copy()  # ONNX MatMul/Gemm weight is [in, out]; torch Linear is [out, in]
            if base.startswith("onnx::"):
                bias = bias_after(matmul.output[0]) if matmul is not None else None
                if bias is None:
                    raise AssetError(f"{onnx_path}: cannot name the weight {base}; unexpected graph layout")
                weights[bias[: -len(".bias")] + ".weight"] = real
            else:
                weights[base] = real
        elif not (name.endswith("_scale") or name.endswith("_zero_point")) and value.dtype == np.float32:
            if name.startswith("bert.") or name.startswith("classifier."):
                weights[name] = value
    # An unquantized float MatMul (e.g. the classifier) appears the same way, under onnx::.
    for node in graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in inits:
            bias = bias_after(node.output[0])
            if bias is not None:
                weights[bias[: -len(".bias")] + ".weight"] = inits[node.input[1]].T.copy()
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in weights.items()}


def convert_onnx_classifier(src: Path, out: Path, arch: dict[str, Any]) -> None:
    """An int8 ONNX BERT classifier (weights only; ``arch`` is its BertConfig) becomes a trainable
    float32 cross-encoder."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    arch = dict(arch)
    max_seq_length = arch.pop("max_seq_length", 512)
    config = BertConfig(**arch)
    model = BertForSequenceClassification(config)
    weights = dequantized_onnx_weights(src / "model.onnx")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # position_ids is a buffer, not a weight.
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing or unexpected:
        raise AssetError(f"{src}/model.onnx: weights do not fit BERT (missing {missing}, unexpected {unexpected})")
    staging = out / "_tokenizer"
    staging.mkdir()
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, staging / name)
    tokenizer = AutoTokenizer.from_pretrained(staging, local_files_only=True)
    shutil.rmtree(staging)
    module = Transformer(model.eval(), tokenizer, task="sequence-classification", max_seq_length=max_seq_length)
    CrossEncoder([module], device="cpu").save(out)


# source.format (models/<variant>/model.yaml) -> how to write it as a sentence-transformers
# folder: (weights folder, output folder, source.architecture).
CONVERTERS: dict[str, Callable[[Path, Path, dict[str, Any]], None]] = {
    "hf-masked-lm": convert_masked_lm,
    "onnx-int8-bert-classifier": convert_onnx_classifier,
}
