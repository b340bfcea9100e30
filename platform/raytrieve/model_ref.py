"""Model references: what every entry that takes a model accepts, and the one function that
turns a reference into a local folder.

The entries: the encoder constructors (``DenseEncoder(ref)``, ...), ``encoders.load_encoder``,
the training driver, the encoding job, mining, Serve's deployments and the demo. A reference
is, tried in this order:

- an MLflow model URI (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``models:/NAME/latest``,
  ``runs:/RUN_ID/PATH``): downloaded once into the cache from the store that
  ``MLFLOW_TRACKING_URI`` names (``raytrieve.tracking.model_uri``);
- a local folder (saved by raytrieve or sentence-transformers, or a plain transformers folder);
- the name of a shipped variant (``raytrieve.assets``, the models/ catalogue): its folder inside
  the installed package, or, for weights in another format, a sentence-transformers folder
  converted once into the cache (``raytrieve.encoders.convert``).

Importing this module is light (no torch, MLflow or Ray): each kind of reference imports what
it needs when it is resolved, so the library reaches MLflow only when handed an MLflow URI.
"""

from __future__ import annotations

import os
from pathlib import Path

from raytrieve import assets
from raytrieve.errors import ModelLoadError

MODEL_URI_SCHEMES = ("models:/", "runs:/")
ACCEPTED = (
    "a local model folder, an MLflow model URI (models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/PATH) "
    "or a shipped variant"
)


def is_model_uri(ref: str | os.PathLike) -> bool:
    """An MLflow model URI rather than a path or a variant name."""
    return isinstance(ref, str) and ref.startswith(MODEL_URI_SCHEMES)


def resolve_model(ref: str | os.PathLike) -> Path:
    """A local folder holding the model that ``ref`` names (see the module docstring for what
    ``ref`` may be). Nothing is downloaded from a model hub."""
    text = os.fspath(ref)
    if is_model_uri(text):
        # Only this path reaches MLflow: the library imports it nowhere else.
        from raytrieve.tracking.model_uri import download_model

        return download_model(text)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path}: is a file, not a model directory; pass the folder that holds modules.json")
        return path
    shipped = assets.variant_names()
    if text in shipped:
        return shipped_model(text)
    raise ModelLoadError(
        f"model {text!r}: no such directory, not an MLflow model URI and not a shipped variant "
        f"({', '.join(shipped) or 'no models/ catalogue found'}); pass {ACCEPTED} "
        "(nothing is downloaded from a model hub)"
    )


def shipped_model(name: str) -> Path:
    """The sentence-transformers folder of the shipped variant ``name``: inside its package, or
    converted into the cache on first use (an unknown name lists the variants)."""
    variant = assets.get_variant(name)
    if variant.source.format == assets.ST_FORMAT:
        return assets.package_dir(variant.source)
    # Converting builds an encoder of the variant's kind, so this one path needs the encoder
    # classes; the constructors call resolve_model, hence the import here, not at the top.
    from raytrieve.encoders.convert import converted_model

    return converted_model(variant)


def max_positions(folder: Path) -> int | None:
    """The position embeddings of the transformer in ``folder`` (its config.json's
    ``max_position_embeddings``): the longest input it can run, so the largest max_seq_length a
    config may set. None where the folder does not say (no config.json, or no such key)."""
    import json

    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        positions = json.loads(config.read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return positions if isinstance(positions, int) and positions > 0 else None


def check_max_seq_length(folder: Path, length: int | None, field: str) -> None:
    """Refuse ``length`` (the config key ``field``) past the model's positions before any work
    starts; the model itself refuses it too when it loads (modules/transformer.py)."""
    positions = max_positions(folder)
    if length is not None and positions is not None and length > positions:
        from raytrieve.errors import ConfigError

        raise ConfigError(
            f"{field}: {length} is more than the {positions} positions of the model in {folder} "
            f"(max_position_embeddings in its config.json); set it to at most {positions}"
        )
