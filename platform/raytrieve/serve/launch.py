"""Starting the application: what can fail is checked before Ray starts (the config, each
model, the index and the models that built it), then Serve starts and the app deploys.

    url = start(load_serve_config("jobs/configs/serve_pydocs.yaml"))   # embedded Ray

Direct ingress (``ServeConfig.direct_ingress``): by default a request reaches the app through
Serve's proxy, an actor of its own that hands it to an ingress replica, a hop that cost 12-18 ms
of a 35 ms /search on 2 cores (benchmarks/serve_hop.py). With direct ingress, Ray Serve runs an
HTTP server inside each ingress replica, on a port its controller hands out from a range; the
range here is the configured port alone, so the replica answers ``port`` itself, and the
proxy, which Serve still runs, listens on ``port + 1``. Serve reads the setting when its
controller and each replica start (environment variables, not an API): the controller gets them
through ``serve.start``'s controller_options, the ingress replicas through their runtime_env
(raytrieve.serve.app.build_app), so nothing has to be set before Ray itself starts.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from ray import serve

from raytrieve.errors import ConfigError, RaytrieveError
from raytrieve.serve.app import build_app
from raytrieve.serve.config import DeploymentConfig, ServeConfig

# What each ingress replica needs (see the module docstring): Ray holds a stopping direct-ingress
# replica open for 30 s so that a load balancer can take it out of rotation; none sits in front
# of it here, so it drains its in-flight requests only (Ctrl-C and redeploys stay fast).
DIRECT_INGRESS_REPLICA_ENV = {
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
}


def direct_ingress_controller_env(port: int) -> dict[str, str]:
    """What Serve's controller needs to hand each ingress replica ``port``: the range is
    [port, port + 1), and a released port comes back at once (Ray holds it back 150 s for
    HAProxy's workers, which do not run here; a redeployed ingress would wait that long)."""
    return {
        **DIRECT_INGRESS_REPLICA_ENV,
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
    }


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
    """Check, start Serve for cfg (or use the one this Ray already runs, if it listens where cfg
    says) and deploy; returns the base URL the app answers on, cfg.host:cfg.port."""

    check_before_start(cfg, where)
    from ray.serve.context import _get_global_client

    from raytrieve.ray_cluster import connect

    connect(ray_address)
    app = build_app(cfg, where)  # sized from the cluster and checked to fit before Serve starts
    running = _get_global_client(raise_if_no_controller_running=False)
    if running is None:
        if ray_address == "local":  # this machine's ports: the embedded Ray's replicas bind them
            for port in dict.fromkeys((cfg.port, cfg.proxy_port)):
                check_port_free(cfg.host, port, f"{where}.port")
        options = {"runtime_env": {"env_vars": direct_ingress_controller_env(cfg.port)}} if cfg.direct_ingress else None
        serve.start(http_options={"host": cfg.host, "port": cfg.proxy_port}, controller_options=options)
    elif running.http_config.port != cfg.proxy_port:
        # Serve keeps the options it was started with; the app would answer elsewhere.
        raise ConfigError(
            f"{where}.port: Serve already runs in this Ray with its proxy on port {running.http_config.port}, but "
            f"this config {'has it on port + 1 = ' if cfg.direct_ingress else 'wants it on '}{cfg.proxy_port}; "
            "deploy with that Serve's port (and direct_ingress as it was started), or stop Serve first "
            "(serve.shutdown())"
        )
    if cfg.direct_ingress and cfg.app_name in serve.status().applications:
        # An update starts the new ingress replica before it stops the old one, which holds the
        # port (measured: the update failed, "No available ports"); so the app is replaced, stopped
        # then started, and requests in between are refused.
        serve.delete(cfg.app_name)
    if cfg.direct_ingress:
        wait_port_released(cfg.host, cfg.port, f"{where}.port")
    serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=blocking)
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "localhost") else host


def check_port_free(host: str, port: int, field: str) -> None:
    """Refuse a port something on this machine already listens on: Serve would otherwise start
    and never answer there (its proxy or ingress replica retries the bind in the background)."""
    with socket.socket() as s:
        if s.connect_ex((_local(host), port)) == 0:
            raise ConfigError(f"{field}: {host}:{port} is already in use; pick a free port")


def wait_port_released(host: str, port: int, field: str, timeout_s: float = 120.0) -> None:
    """Wait until the ingress replica can bind ``port`` on this machine. Ray binds it without
    SO_REUSEADDR, so the connections a stopped server closed itself (TIME_WAIT, 60 s on Linux)
    keep the port from it: measured, a redeploy right after a benchmark's keep-alive clients
    failed to start ("No available ports"), as would `raytrieve serve` restarted right after
    Ctrl-C. A port something listens on is refused at once."""
    import time

    deadline = time.monotonic() + timeout_s
    said = False
    while True:
        check_port_free(host, port, field)
        with socket.socket() as s:
            try:
                s.bind((_local(host), port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"{field}: {host}:{port} was not released in {timeout_s:g} s (connections of a stopped "
                        "server linger there); try again, or pick another port"
                    ) from None
        if not said:
            print(
                f"raytrieve: waiting for {host}:{port} to be released by closed connections (up to 60 s)",
                file=sys.stderr,
                flush=True,
            )
            said = True
        time.sleep(1.0)
