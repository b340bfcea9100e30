"""Joining Ray, or starting the embedded one: the one place every job and server does it.

``address``: None joins the cluster this process runs on (``ray job submit`` sets
RAY_ADDRESS), ``"local"`` starts a Ray owned by this process (never joining a stray cluster
on the host), anything else is a cluster address.

Why the embedded start is more than ``ray.init(address="local")``: Ray Train's controller
starts a placement-group cleaner that asks Ray's state API whether the controller is still
alive. Inside workers that API finds its cluster through RAY_ADDRESS or the file
/tmp/ray/ray_current_cluster, which `ray start` writes and an embedded Ray does not. A file
left by any earlier `ray start` on the host points at a dead cluster: each query then hangs
40 s, and every training run waited 12 s more on the cleaner's stop (measured: 38 s -> 24 s
for a 6-step run). So the embedded Ray runs its dashboard (the state API server) on a free
127.0.0.1 port and names it in RAY_API_SERVER_ADDRESS for every worker of the job. (Before
that, a successful run could also end with the cleaner's RpcError trace, "Timed out while waiting
for GCS to become available", from a query still waiting on the dead cluster.)

Ray's own progress output is sized for a terminal: Ray Data redraws one bar per operator, with
carriage returns and blank lines, from every process that runs a dataset (a Ray Train worker
among them). Into a log file that is a flood, and the jobs show their own progress
(``raytrieve.progress``), so when stderr is not a terminal ``connect`` turns Ray Data's bars
off, in this process and in every worker of the job. Its per-dataset INFO lines ("Starting
execution of Dataset ...", the plan, "execution finished") are left out either way: WARNING and
above still print.

Idle workers: Ray kills a task worker that has been idle for 1 s once more than one per CPU
are alive. raytrieve's Ray Data stages run several tasks per CPU, and each new worker imports
torch and transformers again (about 3-4 CPU-seconds each), so on a small machine a job spent a
good part of its CPU re-importing. The embedded Ray (and cluster/local.sh's head) keeps idle
workers for ``IDLE_WORKER_KEEP_S`` instead (measured on 2 cores: the encoding-job tests 138 ->
112 s, the training tests 205 -> 159 s). Idle workers hold their memory that long (a few hundred
MB each); RAY_idle_worker_killing_time_threshold_ms in the environment overrides it.

Preemption watcher: Ray Train starts, per run, an actor that polls Ray for nodes being drained
(a cloud's spot reclaim, an autoscaler's scale-down) so that the controller can restart its
workers before they are lost. An embedded Ray is one machine that nothing drains, and the actor
is a process of its own that imports Ray Train's modules (about 2.4 CPU-seconds per run measured
on 2 cores, beside the run's ~20), so the embedded start turns it off
(``PREEMPTION_WATCHER_SETTING``, set in this process's environment before Ray starts: Ray Train
hands it from the driver to its controller, and Ray's own processes, a job submitted to the
embedded Ray included, inherit it). A cluster keeps Ray's default; the variable in the
environment wins either way.

Fork server (Linux): the embedded Ray starts its workers as forks of one process that has torch
and transformers imported (``raytrieve.worker_fork``), through the job's
``runtime_env.py_executable``; each new worker otherwise spent ~3.5 CPU-seconds importing them
again. ``RAYTRIEVE_FORK_WORKERS=0`` turns it off. A joined cluster starts its workers as Ray
does.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any

IDLE_WORKER_KEEP_S = 300
IDLE_WORKER_SETTING = "idle_worker_killing_time_threshold_ms"
PREEMPTION_WATCHER_SETTING = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def free_port(pair: bool = False) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now; ``pair``: the next one too
    (``direct_ingress`` puts Serve's proxy there). Drawn below the kernel's ephemeral range where
    it can: a port that ``bind(("", 0))`` handed out is free again the moment it is tested, and
    the next process to bind port 0 may get it first (each Ray worker binds its gRPC server so;
    measured: a Serve app's direct-ingress port taken by a worker that started in between)."""
    import random

    below = _below_ephemeral_ports()
    for _ in range(200):
        if below is None:
            break
        port = random.choice(below)
        if _bindable(port) and (not pair or _bindable(port + 1)):
            return port
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if not pair or _bindable(port + 1):
            return port


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except (OSError, OverflowError):
            return False


def _below_ephemeral_ports() -> range | None:
    """Ports under Linux's ephemeral range (ip_local_port_range, 32768-60999 by default), which
    no bind to port 0 hands out, and above `ray start`'s worker ports (10002-19999, which a
    joined node's workers bind and `ray start` refuses for its other components); None where the
    range cannot be read or leaves too few."""
    try:
        low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return range(_ABOVE_RAY_WORKER_PORTS, low - 1) if low > _ABOVE_RAY_WORKER_PORTS + 1000 else None


_ABOVE_RAY_WORKER_PORTS = 20000


# Placement groups that stopped runs of this process made (hex ids), for the next job here to
# remove (``leave_behind``).
_LEFT_BEHIND: set[str] = set()


def own_placement_groups(bundles: int | None = None) -> frozenset[str]:
    """The placement groups this driver's job made (a group's id ends with its job's) that hold
    or await resources, by hex id; ``bundles``: only those with that many bundles."""
    import ray
    from ray.util.placement_group import placement_group_table

    job = ray.get_runtime_context().get_job_id()
    return frozenset(
        g
        for g, info in placement_group_table().items()
        if g.endswith(job)
        and info["state"] != "REMOVED"
        and (bundles is None or len(info.get("bundles") or {}) == bundles)
    )


def leave_behind(groups: frozenset[str] | set[str]) -> None:
    """Placement groups of a run this process stopped, removed by the next job it runs (``connect``)
    rather than now. A group made by an actor lives as long as the driver's job, and Ray Train's
    cleaner removes its workers' group only once they have started: a run stopped before that
    kept its CPUs reserved in a process that lives on (a notebook's, a test session's). Not at
    once: the process is often about to exit, which ends them anyway, and a group removed while
    a worker in it still starts has Ray SIGTERM that worker, whose stack dump then lands in the
    stopping job's log."""
    _LEFT_BEHIND.update(groups)


def release_left_behind() -> None:
    """Remove the placement groups ``leave_behind`` noted that still hold resources. A failure is
    a warning: the job that called it goes on (it may wait for those CPUs, as before)."""
    import logging

    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        for group in _LEFT_BEHIND & own_placement_groups():
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group))))
    except Exception as e:
        logging.getLogger(__name__).warning(
            "could not remove the placement groups of a stopped run (%s): their CPUs stay reserved", e
        )
    _LEFT_BEHIND.clear()


def connect(
    address: str | None,
    *,
    num_cpus: float | None = None,
    log_to_driver: bool = True,
    runtime_env: dict[str, Any] | None = None,
) -> str | None:
    """Initialise Ray for this process unless it already is (see the module docstring). Returns
    the cluster's dashboard (job server) address when this call started or joined Ray and the
    cluster runs one, else None."""
    import ray

    _original_errors()
    if ray.is_initialized():
        if _LEFT_BEHIND:  # a run this process stopped: its CPUs are this job's again
            release_left_behind()
        return None
    _LEFT_BEHIND.clear()  # groups of an earlier Ray of this process went with it
    with sigterm_handler():
        return _init(ray, address, num_cpus, log_to_driver, runtime_env)


@contextlib.contextmanager
def sigterm_handler(handler: Callable[[int, Any], None] | None = None) -> Iterator[None]:
    """SIGTERM's handler is ``handler`` while the block runs (None: whatever the block sets), and
    the one from before is put back after it. ``connect`` uses it bare: ``ray.init`` installs
    Ray's own handler (a stack dump at error level, then exit status 15) over the one a command
    set (``jobs_entry.sigterm_as_interrupt``'s). A default disposition from before is put back
    only over ``handler``, never over Ray's: with none, Ray's exit still runs ``ray.shutdown``.
    Only the main thread may set handlers; elsewhere nothing changes."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGTERM) if handler is None else signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        if callable(before) or (handler is not None and before is not None):
            signal.signal(signal.SIGTERM, before)


def _init(
    ray: Any, address: str | None, num_cpus: float | None, log_to_driver: bool, runtime_env: dict[str, Any] | None
) -> str | None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    runtime_env = _quiet_ray_data(runtime_env)
    if address != "local":
        # A job that joins a cluster by address (``ray job submit`` sets RAY_ADDRESS) hands that
        # address to its workers for the same reason: the host's /tmp/ray file may name another,
        # dead cluster (measured: a submitted 24-step run 8 s slower with a stale file).
        gcs = address or os.environ.get("RAY_ADDRESS")
        if gcs and "://" not in gcs and gcs != "auto":
            runtime_env = dict(runtime_env or {})
            runtime_env["env_vars"] = {"RAY_ADDRESS": gcs, **runtime_env.get("env_vars", {})}
        return _dashboard(ray.init(address=address, log_to_driver=log_to_driver, runtime_env=runtime_env))
    os.environ.setdefault(PREEMPTION_WATCHER_SETTING, "0")  # see the module docstring
    port = free_port()
    # In the job's runtime environment, not this process's: every actor and task of the job gets
    # it, while a `ray job submit --address ...` or state query from this process still goes
    # where it says (the variable overrides an explicit address).
    runtime_env = dict(runtime_env or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    from raytrieve import worker_fork

    if worker_fork.wanted(runtime_env):  # workers start from a fork server (see raytrieve.worker_fork)
        runtime_env["py_executable"] = worker_fork.start(runtime_env["env_vars"])
    return _dashboard(
        ray.init(
            address="local",
            num_cpus=int(num_cpus) if num_cpus is not None else None,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            log_to_driver=log_to_driver,
            runtime_env=runtime_env,
            _system_config=_system_config(),
        )
    )


def _system_config() -> dict[str, Any]:
    """Ray settings of the embedded start (see the module docstring); the environment's
    ``RAY_<setting>`` wins, as Ray's own settings do."""
    if f"RAY_{IDLE_WORKER_SETTING}" in os.environ:
        return {}
    return {IDLE_WORKER_SETTING: IDLE_WORKER_KEEP_S * 1000}


def _quiet_ray_data(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """Ray Data's console output as the module docstring says, here and in the job's workers
    (through the runtime env: Ray Data reads these variables when it is imported). A value the
    caller or the environment already sets wins."""
    import logging

    from raytrieve.progress import interactive

    quiet = {"RAY_DATA_LOG_LEVEL": "WARNING"}
    if not interactive():
        quiet["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    quiet = {k: v for k, v in quiet.items() if k not in os.environ}
    runtime_env = dict(runtime_env or {})
    runtime_env["env_vars"] = {**quiet, **runtime_env.get("env_vars", {})}
    if "ray.data" in sys.modules:  # already imported here: its settings are made, set them directly
        from ray.data import DataContext

        if "RAY_DATA_DISABLE_PROGRESS_BARS" in quiet:
            DataContext.get_current().enable_progress_bars = False
        if "RAY_DATA_LOG_LEVEL" in quiet:
            logging.getLogger("ray.data").setLevel(logging.WARNING)
    else:
        os.environ.update(quiet)
    _skip_progress_bar_hint()
    return runtime_env


def _original_errors() -> None:
    """Ray Data raises what a stage's function raised, not its own "UDF failed to process a data
    block" wrapper: the wrapper's cause does not survive the trip to the driver, so a worker's
    DataError (a csv row with a field too many, naming the file and the fix) reached the user as
    a Ray traceback with exit status 1 (``checks.raise_worker_error`` finds it now). Ray Data
    hands this process's DataContext to the tasks of every dataset it runs; the environment's
    RAY_DATA_RAISE_ORIGINAL_MAP_EXCEPTION wins."""
    if "RAY_DATA_RAISE_ORIGINAL_MAP_EXCEPTION" in os.environ:
        return
    from ray.data import DataContext

    DataContext.get_current().raise_original_map_exception = True


def _skip_progress_bar_hint() -> None:
    """With its bars off, Ray Data warns once per process how to turn them on: a line in every
    job's log about a choice made on purpose. Ray keys the warning by name (``log_once``), so
    taking that key first leaves it out (under another Ray version the line merely returns)."""
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")


def quiet_train_worker() -> None:
    """What a Ray Train worker runs first, for the job's log (see the module docstring): Ray
    Data's hint on its disabled bars, and the INFO line Ray Train's per-worker context writes at
    every checkpoint report (a repr of the report, under a logger named by its file, so
    RunConfig's LoggingConfig does not reach it)."""
    import logging

    from ray.train.v2._internal.execution import context

    _skip_progress_bar_hint()
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _dashboard(context: Any) -> str | None:
    url = getattr(context, "dashboard_url", None)
    return None if not url else url if "://" in url else f"http://{url}"
