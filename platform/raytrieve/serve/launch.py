"""Starting the application: what can fail is checked before Ray starts (the config, each
model, the index and the models that built it), then Serve starts and the app deploys.

    url = start(load_serve_config("jobs/configs/serve_pydocs.yaml"))   # embedded Ray
"""

from __future__ import annotations

from pathlib import Path

from ray import serve

from raytrieve.errors import ConfigError, RaytrieveError
from raytrieve.serve.app import build_app
from raytrieve.serve.config import DeploymentConfig, ServeConfig


def check_before_start(cfg: ServeConfig, where: str = "config") -> None:
    """What can fail before Ray starts: the config, each model path, each index folder, and
    whether each served query model is the one that encoded its index's documents."""
    from raytrieve.index.build import Indices, load_indices
    from raytrieve.model_ref import is_model_uri, resolve_model
    from raytrieve.serve.deployments import one_corpus
    from raytrieve.tracking import mlflow_run

    cfg.check(where)
    indices: dict[str, Indices] = {}  # folder -> its indices, loaded once
    for m in cfg.served():
        try:
            with mlflow_run.environment(mlflow_run.tracking_uri(cfg.mlflow_tracking_uri)):
                path = resolve_model(m.spec.model)
        except RaytrieveError as e:
            # tracking/model_uri.py turns every MLflow error into a ModelLoadError; here the
            # store comes from this config, so the fix names its key too.
            hint = (
                f" (store: {mlflow_run.tracking_uri(cfg.mlflow_tracking_uri)}; set {where}.mlflow_tracking_uri "
                "to the store the model is registered in)"
                if is_model_uri(m.spec.model)
                else ""
            )
            raise ConfigError(f"{where}.{m.path}.model: {e}{hint}") from None
        if m.index is None:
            continue
        if m.index not in indices:
            indices[m.index] = load_indices(m.index)
        key = f"{m.path}.index" if m.spec.index is not None else "index"
        if getattr(indices[m.index], m.kind) is None:
            raise ConfigError(
                f"{where}.{key} {m.index}: has no {m.kind}/ index for the {m.path} model; build it from vectors "
                f"encoded with that model, or drop {m.path}{':' if m.path == m.kind else ''}"
            )
        built = getattr(indices[m.index].source, m.kind)
        if built is not None and not m.spec.allow_index_model_mismatch:
            _check_index_model(m.path, m.spec, path, built.model, built.model_path, where)
    if indices:
        one_corpus({folder: ix.source for folder, ix in indices.items()}, where)


def _check_index_model(
    field: str, served: DeploymentConfig, served_path: Path, built_ref: str, built_path: str, where: str
) -> None:
    """Queries must be encoded by the model that encoded the documents: another model's vectors
    live in another space, and search would answer confidently wrong. The same reference, the
    same folder, or weights of equal content (a registered copy of the model) pass.
    ``served_path``: the served model's local folder."""
    from raytrieve.assets import weights_digest

    if served.model == built_ref:
        return
    path = served_path.resolve()
    built = Path(built_path)
    if path == built.resolve() or (built.is_dir() and weights_digest(path) == weights_digest(built)):
        return
    known = "" if built.is_dir() else f" ({built_path} is not on this machine, so its weights cannot be compared)"
    raise ConfigError(
        f"{where}.{field}.model: serves {served.model!r}, but the index's {field} vectors were encoded with "
        f"{built_ref!r}{known}. Serve the model that encoded the index, rebuild the index with this one, or set "
        f"{field}.allow_index_model_mismatch: true if the two really share one vector space"
    )


def start(cfg: ServeConfig, where: str = "config", ray_address: str | None = "local", blocking: bool = False) -> str:
    """Check, start Serve on cfg.host:cfg.port and deploy; returns the base URL."""

    check_before_start(cfg, where)
    from raytrieve.ray_cluster import connect

    connect(ray_address)
    app = build_app(cfg, where)  # sized from the cluster and checked to fit before Serve starts
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=blocking)
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
