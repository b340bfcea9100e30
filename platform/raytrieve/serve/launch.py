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

import json
import logging
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray import serve

from raytrieve._io import redact
from raytrieve.errors import ConfigError, DataError, RaytrieveError
from raytrieve.serve.app import build_app
from raytrieve.serve.config import DeploymentConfig, ServeConfig

if TYPE_CHECKING:
    from raytrieve.inference.shards import ModelInfo

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


def check_before_start(cfg: ServeConfig, where: str = "config") -> dict[str, str | None]:
    """What can fail before Ray starts: the config, each model path, each index folder, and
    whether each served query model is the one that encoded its index's documents. Returns the
    pins (``app.store_pins``) of the index and model content checked, for ``build_app``."""
    from raytrieve.index.build import Indices, index_pin, load_indices, local_index
    from raytrieve.index.documents import DocumentStore
    from raytrieve.kinds import refuse_other_kind
    from raytrieve.model_ref import check_max_seq_length, is_model_uri, model_pin, resolve_pinned
    from raytrieve.serve.deployments import one_corpus
    from raytrieve.tracking import mlflow_run

    cfg.check(where)
    try:
        socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(
            f"{where}.host: {cfg.host!r} is neither an address nor a name that resolves ({e}); use 127.0.0.1 (this "
            "machine only), 0.0.0.0 (every interface) or a host name of this machine"
        ) from None
    indices: dict[str, Indices] = {}  # folder -> its indices, loaded once
    local: dict[str, Path] = {}  # folder -> this machine's copy of the content pinned
    pins: dict[str, str | None] = {}  # index folders and model URIs -> the content checked
    for m in cfg.served():
        try:
            with mlflow_run.environment(mlflow_run.tracking_uri(cfg.mlflow_tracking_uri)):
                if m.spec.model not in pins:  # pinned first: what is checked is what replicas load
                    pins[m.spec.model] = model_pin(m.spec.model)
                path = resolve_pinned(m.spec.model, pins[m.spec.model])
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
        # Another kind would load as m.kind's model and crash every replica in Ray.
        fix = f"serve it under {{field}}:, or name a {m.kind} model there"
        refuse_other_kind(path, m.kind, f"{where}.{m.path}.model: {redact(m.spec.model)}", fix)
        check_max_seq_length(path, m.spec.max_seq_length, f"{where}.{m.path}.max_seq_length")
        if m.index is None:
            continue
        key = f"{m.path}.index" if m.spec.index is not None else "index"
        if m.index not in indices:
            try:
                pins[m.index] = index_pin(m.index)  # first: what is checked is what replicas serve
                local[m.index] = local_index(m.index, pins[m.index])
                indices[m.index] = load_indices(local[m.index])
            except DataError as e:
                raise DataError(f"{where}.{key}: {e}") from None
        if getattr(indices[m.index], m.kind) is None:
            raise ConfigError(
                f"{where}.{key} {redact(m.index)}: has no {m.kind}/ index for the {m.path} model; build it from "
                f"vectors encoded with that model, or drop {m.path}{':' if m.path == m.kind else ''}"
            )
        built = getattr(indices[m.index].source, m.kind)
        if built is not None and not m.spec.allow_index_model_mismatch:
            _check_index_model(m.path, m.spec, path, built, where)
    if indices:
        one_corpus({folder: ix.source for folder, ix in indices.items()}, where)
        for folder, ix in indices.items():  # the texts /search returns and reranks (memory-mapped: cheap)
            try:
                DocumentStore(local[folder], ix.source.rows)
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
    return pins


def _check_index_model(field: str, served: DeploymentConfig, served_path: Path, built: ModelInfo, where: str) -> None:
    """Queries must be encoded by the model that encoded the documents: another model's vectors
    live in another space, and search would answer confidently wrong. The same files, wherever
    they are, pass (``ModelInfo.made_by``). ``served_path``: the served model's local folder."""
    if built.made_by(served.model, served_path):
        return
    raise ConfigError(
        f"{where}.{field}.model: serves {redact(served.model)!r}, but the index's {field} vectors were encoded with "
        f"{redact(built.model)!r}{built.not_made_by(served.model)}. Serve the model that encoded the index, rebuild "
        f"the index with this one, or set {field}.allow_index_model_mismatch: true if the two really share one vector "
        "space"
    )


def start(cfg: ServeConfig, where: str = "config", ray_address: str | None = "local", blocking: bool = False) -> str:
    """Check, start Serve for cfg (or use the one this Ray already runs, if it was started as cfg
    needs) and deploy; returns the base URL the app answers on, cfg.host:cfg.port."""

    pins = check_before_start(cfg, where)
    import ray
    from ray.serve.context import _get_global_client

    from raytrieve.ray_cluster import connect

    if ray_address == "local" and not ray.is_initialized():  # no Serve of ours can hold the ports yet
        check_ports_free(cfg, where)
    connect(ray_address)
    app = build_app(cfg, where, pins)  # sized from the cluster and checked to fit before Serve starts
    machines = _machines()
    if cfg.direct_ingress and len(machines) > 1 and _is_loopback(cfg.host):
        raise ConfigError(
            f"{where}.host: {cfg.host} with direct_ingress on a cluster of {len(machines)} machines: an ingress "
            "replica on another machine would listen on that machine's loopback, where no client reaches it; set "
            "host to an address clients reach (0.0.0.0 behind your own gateway), or direct_ingress: false"
        )
    running = _get_global_client(raise_if_no_controller_running=False)
    if running is None:
        if ray_address == "local":  # this machine's ports: the embedded Ray's replicas bind them
            check_ports_free(cfg, where)
        options = {"runtime_env": {"env_vars": direct_ingress_controller_env(cfg.port)}} if cfg.direct_ingress else None
        serve.start(http_options={"host": cfg.host, "port": cfg.proxy_port}, controller_options=options)
        if cfg.direct_ingress:
            _direct_record(_get_global_client(), cfg)
    elif running.http_config.port != cfg.proxy_port:
        # Serve keeps the options it was started with; the app would answer elsewhere.
        raise ConfigError(
            f"{where}.port: Serve already runs in this Ray with its proxy on port {running.http_config.port}, but "
            f"this config {'has it on port + 1 = ' if cfg.direct_ingress else 'wants it on '}{cfg.proxy_port}; "
            "deploy with that Serve's port (and direct_ingress as it was started), or stop Serve first "
            "(serve.shutdown())"
        )
    elif cfg.direct_ingress:
        _check_direct_serve(running, cfg, where)
    if cfg.direct_ingress:
        if cfg.app_name in serve.status().applications:
            # An update starts the new ingress replica before it stops the old one, which holds the
            # port (measured: the update failed, "No available ports"); so the app is replaced,
            # stopped then started, and requests in between are refused.
            serve.delete(cfg.app_name)
        if machines == {_this_machine()}:  # where the ingress replica will bind it
            # A Serve that already ran set up for this port: a listener there is its last ingress
            # replica, stopping (measured: still listening after serve.delete returned).
            wait_port_released(cfg.host, cfg.port, f"{where}.port", replica_may_linger=running is not None)
    logging.getLogger("ray.serve").addFilter(_KEPT_OPTIONS_NOTICE)
    try:
        serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=blocking)
    finally:
        logging.getLogger("ray.serve").removeFilter(_KEPT_OPTIONS_NOTICE)
    return app_url(cfg)


def app_url(cfg: ServeConfig) -> str:
    """Where the app answers, as `raytrieve serve` announces it: an IPv6 host in brackets."""
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


class _KeptOptionsNotice(logging.Filter):
    """``serve.run`` logs "Connecting to existing Serve app ... New http_options/controller_options
    will not be applied" whenever Serve runs already: also right after ``start`` started it with
    this config's options, or checked that the running one has them, so here it only misleads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Connecting to existing Serve app")


_KEPT_OPTIONS_NOTICE = _KeptOptionsNotice()


# Which Serve ``start`` set up for direct ingress, in Ray's own key-value store: Serve keeps its
# controller's settings and cannot report them, and a Serve started otherwise, or for another
# port, would hand the ingress no port or another one.
_DIRECT_KEY = b"raytrieve:direct_ingress"


def _controller_id(client: Any) -> str:
    return client._controller._actor_id.hex()


def _direct_record(client: Any, cfg: ServeConfig) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    record = {"controller": _controller_id(client), "port": cfg.port, "app": cfg.app_name}
    _internal_kv_put(_DIRECT_KEY, json.dumps(record).encode(), overwrite=True)


def _check_direct_serve(client: Any, cfg: ServeConfig, where: str) -> None:
    """A running Serve serves a direct-ingress app only if ``start`` set it up for this port, and
    for one app at a time (the port is one)."""
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(_DIRECT_KEY)
    record = json.loads(raw) if raw else {}
    if record.get("controller") != _controller_id(client) or record.get("port") != cfg.port:
        raise ConfigError(
            f"{where}.direct_ingress: the Serve running in this Ray was not started for direct ingress on port "
            f"{cfg.port} (its controller hands the ingress replica no such port); stop Serve first "
            "(serve.shutdown()), or set direct_ingress: false"
        )
    holder = record.get("app")
    if holder != cfg.app_name and holder in serve.status().applications:
        raise ConfigError(
            f"{where}.app_name: {cfg.app_name!r} with direct_ingress, but app {holder!r} holds this Serve's "
            f"direct-ingress port {cfg.port}; one such app per Serve: delete {holder!r} first, deploy under its "
            "name, or set direct_ingress: false"
        )
    _direct_record(client, cfg)


def _machines() -> set[str]:
    """The addresses of the cluster's alive nodes (several nodes of one machine share one)."""
    import ray

    return {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}


def _this_machine() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _local(host: str) -> str:
    """Where a client on this machine reaches a server bound to ``host``: the loopback address of
    its family for a wildcard (IPv4's or IPv6's), else ``host`` itself."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def check_port_free(host: str, port: int, field: str, what: str = "") -> None:
    """Refuse a port something on this machine already listens on: Serve would otherwise start
    and never answer there (its proxy or ingress replica retries the bind in the background).
    Each address ``host`` names is tried in its own family (``::1`` is IPv6; ``localhost`` may be
    both). ``what``: the port's role, where it is not the one the field names."""
    try:
        addresses = socket.getaddrinfo(_local(host), port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(
            f"{field}: host {host!r} does not resolve ({e.strerror}); give an address of this machine"
        ) from None
    for family, _, _, _, address in addresses:
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # a family this kernel lacks (IPv6 off, "localhost" still resolving to ::1)
            continue
        with s:
            s.settimeout(5)
            if s.connect_ex(address) == 0:
                raise ConfigError(f"{field}: {host}:{port}{what} is already in use; pick a free port")


def check_ports_free(cfg: ServeConfig, where: str) -> None:
    """The app's port and, with direct_ingress, Serve's proxy's on port + 1."""
    check_port_free(cfg.host, cfg.port, f"{where}.port")
    if cfg.proxy_port != cfg.port:
        role = f" (Serve's HTTP proxy's: with direct_ingress it takes port + 1, {cfg.port} + 1)"
        check_port_free(cfg.host, cfg.proxy_port, f"{where}.port", role)


def wait_port_released(
    host: str, port: int, field: str, timeout_s: float = 120.0, replica_may_linger: bool = False
) -> None:
    """Wait until the ingress replica can bind ``host:port`` on this machine. Ray binds it without
    SO_REUSEADDR, so the connections a stopped server closed itself (TIME_WAIT, 60 s on Linux)
    keep the port from it, and one failed bind blocks the port in Serve for good: measured, a
    redeploy right after a benchmark's keep-alive clients failed to start ("No available ports"),
    as would `raytrieve serve` restarted right after Ctrl-C. The test bind is the replica's own
    (the same address and family); a port something listens on, or an address this machine does
    not have, is refused at once. ``replica_may_linger``: the port is this Serve's direct-ingress
    port, whose last replica may still listen while it stops; a listener is waited for too."""
    import errno
    import time

    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    deadline = time.monotonic() + timeout_s
    said = False
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind(address)
                return
            except OSError as e:
                if e.errno == errno.EADDRNOTAVAIL:
                    raise ConfigError(f"{field}: {host} is not an address of this machine; {e.strerror}") from None
                if not replica_may_linger:
                    check_port_free(host, port, field)  # a listener: refused at once
                if time.monotonic() > deadline:
                    check_port_free(host, port, field)
                    raise ConfigError(
                        f"{field}: {host}:{port} was not released in {timeout_s:g} s (connections of a stopped "
                        "server linger there); try again, or pick another port"
                    ) from None
        if not said:
            print(
                f"raytrieve: waiting for {host}:{port} to be released (closed connections linger up to 60 s"
                + (", a stopping replica's listener a few" if replica_may_linger else "")
                + f"; giving up after {timeout_s:g} s)",
                file=sys.stderr,
                flush=True,
            )
            said = True
        time.sleep(1.0)
