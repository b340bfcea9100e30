"""Model references: what every entry that takes a model accepts, and the one function that
turns a reference into a local folder.

The entries: the encoder constructors (``DenseEncoder(ref)``, ...), ``encoders.load_encoder``,
the training driver, the encoding job, mining, Serve's deployments and the demo. A reference
is, tried in this order:

- an MLflow model URI (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``models:/NAME/latest``,
  ``runs:/RUN_ID/PATH``): downloaded once into the cache from the store that
  ``MLFLOW_TRACKING_URI`` names (``raytrieve.tracking.model_uri``);
- a local folder (saved by raytrieve or sentence-transformers, or a plain transformers folder);
- a folder's URI on any filesystem pyarrow opens (``s3://bucket/models/dense``, ``gs://``,
  ``abfs://``, ``file://``): downloaded once per content into the cache (``store_model``), with
  the credentials pyarrow finds on the machine that resolves it (or keys in the URI);
- the name of a shipped variant (``raytrieve.assets``, the models/ catalogue): its folder inside
  the installed package, or, for weights in another format, a sentence-transformers folder
  converted once into the cache (``raytrieve.encoders.convert``).

Importing this module is light (no torch, MLflow or Ray): each kind of reference imports what
it needs when it is resolved, so the library reaches MLflow only when handed an MLflow URI.

A folder raytrieve made in its cache (an MLflow or store download, a converted variant) exists on the
machine that resolved it only. ``ship`` packs such a folder into Ray's object store, and
``ShippedModel.local_path`` gives Ray workers on other machines their own copy, unpacked once
per machine into their cache. A folder the user names is theirs to make readable on every
node, as the corpus is.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytrieve import assets
from raytrieve.errors import ConfigError, ModelLoadError, RaytrieveError

MODEL_URI_SCHEMES = ("models:/", "runs:/")
ACCEPTED = (
    "a local model folder, a folder's URI on an object store (s3://BUCKET/PATH, gs://, abfs://, file://), an MLflow "
    "model URI (models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/PATH) or a shipped variant"
)


def is_model_uri(ref: str | os.PathLike) -> bool:
    """An MLflow model URI rather than a path or a variant name."""
    return isinstance(ref, str) and ref.startswith(MODEL_URI_SCHEMES)


def is_store_uri(ref: str | os.PathLike) -> bool:
    """A folder's URI on a filesystem pyarrow opens (``s3://``, ``file://``, ...), not MLflow's."""
    return isinstance(ref, str) and "://" in ref and not is_model_uri(ref)


def resolve_model(ref: str | os.PathLike) -> Path:
    """A local folder holding the model that ``ref`` names (see the module docstring for what
    ``ref`` may be). Nothing is downloaded from a model hub."""
    text = os.fspath(ref)
    if is_model_uri(text):
        # Only this path reaches MLflow: the library imports it nowhere else.
        from raytrieve.tracking.model_uri import download_model

        return download_model(text)
    if is_store_uri(text):
        return store_model(text)
    found = _locate(text)
    return found if isinstance(found, Path) else shipped_model(found)


def resolve_field(ref: str | os.PathLike, field: str) -> Path:
    """``resolve_model``, its error a ConfigError naming the config ``field`` that gave ``ref``."""
    try:
        return resolve_model(ref)
    except RaytrieveError as e:
        raise ConfigError(f"{field}: {e}") from None


def check_reference(ref: str | os.PathLike, field: str) -> None:
    """Raise what ``resolve_model`` would for a name that is neither a folder nor a shipped
    variant, as a ConfigError naming ``field``, without loading, converting or downloading
    anything: the jobs check their models so before importing torch. An MLflow URI is left to
    ``resolve_model`` (checking it needs the MLflow store)."""
    text = os.fspath(ref)
    if is_model_uri(text):
        return
    if is_store_uri(text):  # that it parses; listing it is resolve_model's (the store may be slow)
        from raytrieve.data.files import resolve

        try:
            resolve(text)  # its message: the URI without keys, pyarrow's reason, the fix
        except RaytrieveError as e:
            raise ConfigError(f"{field}: model {e}") from None
        return
    try:
        _locate(text)
    except ModelLoadError as e:
        raise ConfigError(f"{field}: {e}") from None


def shipped_variant(ref: str | os.PathLike) -> assets.Variant | None:
    """The shipped variant ``ref`` names (as ``resolve_model`` reads it: a folder or URI of that
    name is not one), or None."""
    text = os.fspath(ref)
    if "://" in text or Path(text).expanduser().exists() or text not in assets.variant_names():
        return None
    return assets.get_variant(text)


def converted_variant(ref: str | os.PathLike) -> assets.Variant | None:
    """The shipped variant ``ref`` names when it is one converted on first use, or None."""
    variant = shipped_variant(ref)
    return variant if variant is not None and variant.source.format != assets.ST_FORMAT else None


def files_key(ref: str | os.PathLike, folder: Path) -> str:
    """The key of the model files ``ref`` names, whose copy here is ``folder``: their content
    (``assets.content_fingerprint``, any path, any machine), or for a variant converted on first
    use its source's (``assets.converted_variant_key``: the converted files record library
    versions). What an encoding job's identity and manifest hold as a model's "weights"."""
    variant = converted_variant(ref)
    return assets.converted_variant_key(variant) if variant is not None else assets.content_fingerprint(folder)


def is_model_dir(path: Path) -> bool:
    """A folder of a sentence-transformers (modules.json) or transformers (config.json) model."""
    return (path / "modules.json").exists() or (path / "config.json").exists()


def _locate(text: str) -> Path | str:
    """The local model folder ``text`` names, or the name of the shipped variant it is."""
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path}: is a file, not a model directory; pass the folder that holds modules.json")
        if not is_model_dir(path):
            raise ModelLoadError(
                f"{path}: not a model directory (no modules.json and no config.json); point at a folder saved by "
                "raytrieve, sentence-transformers or transformers"
            )
        return path
    shipped = assets.variant_names()
    if text in shipped:
        return text
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


MODEL_MARKERS = ("modules.json", "config.json")
MODEL_EXPECT = "the folder a model was saved to (by raytrieve, sentence-transformers or transformers)"


def store_model(uri: str, pin: str | None = None) -> Path:
    """A local copy of the model folder at ``uri`` (a filesystem pyarrow opens), downloaded into
    the cache once per content (``files.fetch_folder``). ``pin``: the content wanted
    (``store_model_pin``, taken when a Serve app was built); other content is refused."""
    from raytrieve.data.files import fetch_folder

    try:
        return fetch_folder(uri, assets.cache_dir() / "store", "model", MODEL_MARKERS, MODEL_EXPECT, pin)
    except RaytrieveError as e:
        raise ModelLoadError(str(e)) from None


def model_pin(ref: str) -> str | None:
    """What a Serve app pins the model ``ref`` to when it is built, so that every replica loads
    the model its start checked, whenever it starts: a folder URI's content key
    (``store_model_pin``), a registry URI's version now and that version's run and source (an
    alias or ``latest`` moves, a version number is reused in a store wiped and registered again:
    ``model_uri.pinned_version``); None for a folder or a shipped variant, which stay put."""
    if is_store_uri(ref):
        return store_model_pin(ref)
    if is_model_uri(ref):
        from raytrieve.tracking.model_uri import pinned_version

        return pinned_version(ref)
    return None


def resolve_pinned(ref: str, pin: str | None) -> Path:
    """The local folder of the model ``ref`` as ``model_pin`` pinned it (``resolve_model``
    without a pin). A folder URI written again since is refused where this machine has no copy,
    a registry version registered again since is refused."""
    if pin is None:
        return resolve_model(ref)
    if is_store_uri(ref):
        return store_model(ref, pin)
    from raytrieve.tracking.model_uri import download_model

    return download_model(ref, pin=pin)


def store_model_pin(uri: str) -> str:
    """The key of the model folder at ``uri`` as it is now (listed, not downloaded)."""
    from raytrieve.data.files import folder_key

    try:
        return folder_key(uri, "model", MODEL_MARKERS, MODEL_EXPECT)
    except RaytrieveError as e:
        raise ModelLoadError(str(e)) from None


def check_max_seq_length(folder: Path, length: int | None, field: str) -> None:
    """Refuse ``length`` (the config key ``field``) past what the model in ``folder`` can run
    (modules/transformer.py ``position_limit``) before any work starts; the model refuses it
    too when it is set (``Transformer.max_seq_length``), but without the config's key."""
    if length is None:
        return
    from raytrieve.modules.transformer import saved_position_limit

    limit = saved_position_limit(folder)
    if limit is not None and length > limit:
        from raytrieve.errors import ConfigError

        raise ConfigError(
            f"{field}: {length} is more than the {limit} positions the model in {folder} can run (its position "
            f"embeddings: max_position_embeddings in its config.json); set it to at most {limit}"
        )


@dataclass(frozen=True)
class ShippedModel:
    """A resolved model folder as Ray workers reach it; see the module docstring. ``packed`` (a
    Ray object ref of the folder's tar archive) is None for a folder that travels by its path."""

    path: str
    node_id: str | None = None  # the Ray node that resolved it: there ``path`` is the folder
    digest: str | None = None  # sha256 of the archive: names the copy in a worker's cache
    packed: Any = None

    def local_path(self) -> str:
        """On a Ray worker: a folder of this machine holding the model."""
        if self.packed is None or self.digest is None:
            return self.path
        import ray

        # The driver's node has the folder (unless the driver is a Ray Client elsewhere: then not).
        if ray.get_runtime_context().get_node_id() == self.node_id and Path(self.path).is_dir():
            return self.path
        import fcntl

        from raytrieve import _io

        target, locks = assets.cache_dir() / "shipped" / self.digest, assets.cache_dir() / "shipped-locks"
        locks.mkdir(parents=True, exist_ok=True)
        # One actor of this machine fetches and unpacks; the others wait for it, then find it there.
        with open(locks / self.digest, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.is_dir():
                archive = io.BytesIO(memoryview(ray.get(self.packed)))
                with _io.atomic_directory(target, overwrite=False) as tmp, tarfile.open(fileobj=archive) as tar:
                    # The driver made this archive (regular files only); "data" refuses anything else too.
                    if hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+
                        tar.extractall(tmp, filter="data")
                    else:
                        tar.extractall(tmp)
        return str(_io.mark_used(target))


def ship(path: str | os.PathLike) -> ShippedModel:
    """On the driver, connected to Ray: ``path`` as workers on any machine reach it. A folder in
    raytrieve's cache is packed into the object store (once per call; the archive is made in
    memory, then copied into the store); any other travels by its path."""
    folder = Path(path).resolve()
    if not folder.is_relative_to(assets.cache_dir().expanduser().resolve()):
        return ShippedModel(os.fspath(path))
    import numpy as np
    import ray

    if not ray.is_initialized():  # ray.put would start a Ray of its own, not the job's
        raise RuntimeError("model_ref.ship needs the job's Ray connected first (raytrieve.ray_cluster.connect)")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                info = tarfile.TarInfo(str(file.relative_to(folder)))  # a plain file, links followed
                info.size, info.mode = file.stat().st_size, 0o644
                with open(file, "rb") as f:
                    tar.addfile(info, f)
    view = buffer.getbuffer()
    digest = hashlib.sha256(view).hexdigest()[:16]
    archive = np.frombuffer(view, dtype=np.uint8)  # no copy here; ray.put copies it into the store once
    return ShippedModel(str(folder), ray.get_runtime_context().get_node_id(), digest, ray.put(archive))


def local_folder(model: str | ShippedModel) -> str:
    """On a Ray worker: the folder of ``model`` on this machine (a path is taken as it is)."""
    return model if isinstance(model, str) else model.local_path()
