"""MLflow model URIs as local folders: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``,
``models:/NAME/latest`` (or a stage), ``runs:/RUN_ID/PATH``.

The store is the one training writes to (``MLFLOW_TRACKING_URI``, else ``./mlruns``:
``mlflow_run.tracking_uri``). A download lands once in ``$RAYTRIEVE_CACHE/mlflow/<key>``,
written atomically. A registry URI is first pinned to a version: an alias or ``latest`` moves,
and a version number is reused when a store is wiped and a model registered again, so the key
holds the store, the version and that version's run and source, and the cache never serves
weights that the URI no longer names.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from raytrieve import assets
from raytrieve._io import atomic_directory, mark_used, write_origin
from raytrieve.errors import ModelLoadError
from raytrieve.tracking import mlflow_run

# models:/NAME/SUFFIX (a version number, "latest" or a stage) or models:/NAME@ALIAS.
REGISTRY_URI = re.compile(r"models:/([^/@]+)(?:/([^/]+)|@([^/]+))")


# A registry pin: the version's URI, then this and the version's key (``_version_key``).
PIN_KEY = "#version-key="


def download_model(uri: str, tracking_uri: str | None = None, pin: str | None = None) -> Path:
    """A local folder with the model ``uri`` names, downloaded from the store on first use.
    ``pin``: ``pinned_version``'s answer for ``uri`` when a Serve app was built; that version is
    loaded, and refused if the registry's version of that number is another model now."""
    store = mlflow_run.tracking_uri(tracking_uri)
    with _read_from(uri, store), mlflow_run.registry(store) as client:
        pinned, _, key = (pin or _pin(client, uri)).partition(PIN_KEY)
        identity = f"{store}|{pinned}"
        unchanged: Callable[[], None] | None = None
        if pinned.startswith("models:/"):  # a registry version: its run and source tell a re-registered one apart
            try:
                version = _version(client, pinned)
            except Exception as e:
                if not key or getattr(e, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise
                raise ModelLoadError(
                    f"model {uri!r}: the registry no longer has {pinned}, which this Serve app was built with; "
                    "deploy the app again (raytrieve serve) to serve what the registry holds now"
                ) from None
            if key and _version_key(version) != key:
                raise ModelLoadError(
                    f"model {uri!r}: the registry's {pinned} is not the model this Serve app was built with (another "
                    "run or source registered under that version number since: a store wiped and registered again); "
                    "deploy the app again (raytrieve serve) to serve what the registry holds now"
                )
            identity += f"|{version.run_id}|{version.source}"

            def same_version(version: Any = version) -> None:  # the download resolved the number again
                if _version_key(_version(client, pinned)) != _version_key(version):
                    raise ModelLoadError(
                        f"model {uri!r}: the registry's {pinned} changed while it downloaded (another run or source "
                        "registered under that version number); load it again"
                    )

            unchanged = same_version
        target = assets.cache_dir() / "mlflow" / hashlib.sha256(identity.encode()).hexdigest()[:16]
        if not (target / "modules.json").exists() and not (target / "config.json").exists():
            _download(pinned, store, target, unchanged)
    return mark_used(target)


def pinned_version(uri: str, tracking_uri: str | None = None) -> str:
    """``uri`` as the version it names now (``models:/NAME@ALIAS`` -> ``models:/NAME/3``) and,
    after ``PIN_KEY``, that version's run and source as a key: a version number is reused when a
    store is wiped and a model registered again, and ``download_model(pin=)`` refuses it then. A
    ``runs:/`` URI as given. What a Serve app pins a registry reference to."""
    store = mlflow_run.tracking_uri(tracking_uri)
    with _read_from(uri, store), mlflow_run.registry(store) as client:
        pinned = _pin(client, uri)
        if pinned.startswith("models:/"):
            pinned += PIN_KEY + _version_key(_version(client, pinned))
        return pinned


def _version(client: Any, pinned: str) -> Any:
    """The registry's record of ``models:/NAME/VERSION``."""
    return client.get_model_version(*pinned.removeprefix("models:/").rsplit("/", 1))


def _version_key(version: Any) -> str:
    return hashlib.sha256(f"{version.run_id}|{version.source}".encode()).hexdigest()[:16]


@contextlib.contextmanager
def _read_from(uri: str, store: str) -> Iterator[None]:
    """The store's and registry's own errors as a ModelLoadError naming the URI, the store and the fix."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(
            f"model {uri!r}: cannot be read from the MLflow store at {store} ({type(e).__name__}: {e}); check the "
            "name and version (or alias), or point MLFLOW_TRACKING_URI at the store that holds it"
        ) from e


def _pin(client: Any, uri: str) -> str:
    """``uri`` with a registry alias, ``latest`` or stage replaced by the version it names now."""
    if not uri.startswith("models:/"):
        return uri  # runs:/ names a run's artifact, which does not move
    match = REGISTRY_URI.fullmatch(uri)
    if match is None:
        raise ModelLoadError(
            f"model {uri!r}: not a registry URI raytrieve reads; write models:/NAME/VERSION, models:/NAME@ALIAS "
            "or models:/NAME/latest"
        )
    name, suffix, alias = match.groups()
    if alias is not None:
        return f"models:/{name}/{client.get_model_version_by_alias(name, alias).version}"
    if suffix.isdigit():
        return uri
    versions = client.search_model_versions(f"name = '{name}'")
    if suffix.lower() != "latest":
        versions = [v for v in versions if (v.current_stage or "").lower() == suffix.lower()]
    if not versions:
        raise ModelLoadError(f"model {uri!r}: the registry has no version of {name!r} that {suffix!r} names")
    return f"models:/{name}/{max(int(v.version) for v in versions)}"


def _download(uri: str, store: str, target: Path, unchanged: Callable[[], None] | None = None) -> None:
    """``uri``'s artifacts into ``target``, whole or not at all; ``unchanged`` raises, after the
    download and before ``target`` is written, where what ``target`` is keyed by changed meanwhile."""
    import mlflow.artifacts

    with atomic_directory(target) as tmp:
        with mlflow_run.download_bars(on_a_terminal=True):
            mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp), tracking_uri=store, registry_uri=store)
        inner = list(tmp.iterdir())
        if len(inner) == 1 and inner[0].is_dir():  # the artifact folder itself: its files go to the top
            for p in inner[0].iterdir():
                p.rename(tmp / p.name)
            inner[0].rmdir()
        write_origin(tmp, f"{uri} in the MLflow store {store}")
        if unchanged is not None:
            unchanged()
