"""Workers of the embedded Ray start from a fork server (Linux): each new worker process (a Ray
Train worker, an encoding actor, a Serve replica, a task worker) otherwise imports torch and
transformers again, about 3.5 CPU-seconds each (``docs/test-time.md``), and a training run, an
encoding job or a Serve deploy starts several. The server imports them once; every worker is a
fork of it that then runs Ray's own ``default_worker.py``, unchanged, with the environment,
working folder and standard streams of the process Ray started for it.

How: ``ray_cluster.connect("local")`` calls ``start`` with the job's environment, and puts the
command it returns in the job's ``runtime_env.py_executable``. Ray then starts each worker as
``fork_client.py SOCKET default_worker.py ARGS``: that small process (standard library only)
hands its request, descriptors and environment to this server over a Unix socket in a private
folder, and stays as the process Ray knows; it relays signals to the worker and exits with the
worker's status, and the worker kills itself if it is killed (raylet's SIGKILL included). If
the server cannot be reached, the client runs the worker itself.

What the server does not import, on purpose: Ray (its C++ core reads its settings from the
environment when it loads, and each worker's differ: job id, raylet), and anything that starts
threads beyond the BLAS pools (which reset themselves after a fork). The thread counts torch
reads once at import are applied in the fork: OMP_NUM_THREADS, which Ray sets per worker, and
MKL_NUM_THREADS where it equals it (Ray Train's workers and the encoding actors get both); a
worker whose other settings read at import (HF_*, TRANSFORMERS_*, TORCH_*, KMP_*, MKL_*, ...)
differ from the server's is started plainly. The server ends when the process that started it
ends.

``RAYTRIEVE_FORK_WORKERS=0`` turns it off (Ray then starts every worker itself); a job runtime
env that changes what a worker imports (``working_dir``, ``py_modules``, ``pip``, ``conda``,
``uv``, a container, its own ``py_executable``) turns it off too. A task's or deployment's own
runtime env is merged over the job's by Ray, so such a worker still comes here: the server
starts it plainly (``fork_client`` runs it with the Python its activated environment names)
when its VIRTUAL_ENV, CONDA_PREFIX or PYTHONPATH differ from the server's. The fork ends as a
Python process does (it returns to the interpreter's exit: atexit handlers, Ray's shutdown).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from raytrieve import fork_client

SETTING = "RAYTRIEVE_FORK_WORKERS"
# What every worker that touches a model would import first; nothing here may import Ray.
PRELOAD = ("torch", "transformers.modeling_utils", "raytrieve.encoders")
# Runtime-env keys under which a fork of this server would not be the worker Ray means to run.
_OWN_PYTHON = ("working_dir", "py_modules", "pip", "conda", "uv", "container", "image_uri", "py_executable")

_server: subprocess.Popen | None = None
_command: str | None = None
_env: dict[str, str] | None = None  # the server's environment: its imports read it once
# Variables that say which Python and code a worker runs: a request whose values differ from the
# server's (a task's or deployment's own pip, uv or conda env, working_dir or py_modules, which
# Ray merges over the job's runtime env and so under this py_executable) is not forked.
_OWN_CODE = ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONPATH")


def wanted(runtime_env: dict) -> bool:
    return (
        sys.platform.startswith("linux")
        and os.environ.get(SETTING, "1") != "0"
        and not any(runtime_env.get(k) for k in _OWN_PYTHON)
    )


def start(env_vars: dict[str, str]) -> str:
    """Start the server with this process's environment plus ``env_vars`` (the job's); the
    ``py_executable`` command that reaches it. One server per process while the environment
    stays the same (what torch and transformers read at import is the server's)."""
    global _server, _command, _env
    env = {**os.environ, **env_vars}
    # Ray's own variables change with each embedded start (the state API's port) and the server
    # never imports Ray: a reconnect keeps the server unless what its imports read has changed.
    if _server is not None and _server.poll() is None and _command is not None and _same(env, _env or {}):
        return _command
    folder = Path(tempfile.mkdtemp(prefix="raytrieve-fork-"))  # 0700: only this user may ask
    path = folder / "socket"
    with open(folder / "server.log", "wb") as log:  # not this process's streams: its callers would wait on them
        _server = subprocess.Popen(
            # -P (3.11+): the driver's folder is not put first on the path of the server's imports
            [
                sys.executable,
                *(["-P"] if sys.version_info >= (3, 11) else []),
                "-m",
                "raytrieve.worker_fork",
                str(path),
                str(os.getpid()),
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    _env = env
    deadline = time.monotonic() + 30
    while not path.exists() and _server.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # it binds before it imports: workers may queue while it loads
    _command = shlex.join([sys.executable, "-I", "-S", str(fork_client.__file__), str(path)])
    return _command


def _same(a: dict[str, str], b: dict[str, str]) -> bool:
    """Whether a server started with ``b`` serves workers of ``a`` as one started with ``a`` would:
    the same code on the path and the same settings read at import (Ray's own variables, which
    change with each embedded start, and anything else its forks follow, aside)."""

    def mine(env: dict[str, str]) -> dict[str, str | None]:
        return {**_read_at_import(env), **{k: env.get(k) for k in _OWN_CODE}}

    return mine(a) == mine(b)


# Settings that torch, transformers and huggingface_hub (or the BLAS and OpenMP runtimes under
# them) read once, when the server imported them: a worker started with other values is started
# plainly, so that its imports read its own.
_READ_AT_IMPORT = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH_", "PYTORCH_", "KMP_", "MKL_", "OPENBLAS_")


def _read_at_import(env: dict[str, str]) -> dict[str, str]:
    """What of ``env`` the server's imports read, less MKL's thread count, which a fork applies
    itself where it can (``_threads_applied``)."""
    return {k: v for k, v in env.items() if k.startswith(_READ_AT_IMPORT) and k != "MKL_NUM_THREADS"}


def _threads_applied(env: dict[str, str]) -> bool:
    """Whether a fork gives a worker with ``env`` the MKL threads it asks for: none asked, or as
    many as its OMP_NUM_THREADS (``torch.set_num_threads``, which the fork calls with that, sizes
    both pools; Ray Train's workers and the encoding actors are given both, equal)."""
    mkl = env.get("MKL_NUM_THREADS")
    return mkl is None or (mkl.isdigit() and int(mkl) > 0 and mkl == env.get("OMP_NUM_THREADS"))


def _serve(path: str, parent: int) -> None:
    import gc
    import importlib
    import selectors
    import shutil
    import signal
    import socket

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(256)
    for name in PRELOAD:
        importlib.import_module(name)
    sys.stdout.flush()  # nothing buffered here may be written again by every fork
    sys.stderr.flush()
    gc.collect()
    gc.freeze()  # the imported objects stay shared with every fork, not copied on a GC pass
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the loop to collect a worker's status
    clients: dict[int, socket.socket] = {}
    events = selectors.DefaultSelector()
    events.register(server, selectors.EVENT_READ)
    events.register(wake_r, selectors.EVENT_READ)
    own = {k: os.environ.get(k) for k in _OWN_CODE}
    imported = _read_at_import(dict(os.environ))
    while os.getppid() == parent:
        for key, _ in events.select(timeout=1.0):
            if key.fileobj is server:
                try:
                    conn, _ = server.accept()
                except OSError:  # out of descriptors, say: the client starts the worker itself
                    continue
                pid = _fork(conn, (server, events, wake_r, wake_w), clients, own, imported)
                if pid:
                    clients[pid] = conn
            elif key.fd == wake_r:
                os.read(wake_r, 4096)
        _collect(clients)
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    os._exit(0)


def _collect(clients: dict) -> None:
    """Tell each ended worker's client how it ended (a negative status: killed by that signal)."""
    while clients:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = clients.pop(pid, None)
        if conn is None:
            continue
        try:
            fork_client.send(conn, {"status": os.waitstatus_to_exitcode(status)})
        except OSError:
            pass
        conn.close()


def _fork(conn, own_fds: tuple, clients: dict, own: dict, imported: dict[str, str]) -> int:
    """Fork a worker for the request on ``conn``: the worker's pid, or 0 where the client runs
    it itself. In the fork, this raises SystemExit once the worker is done, so that the fork ends
    as a Python process does (atexit handlers, Ray's own shutdown among them)."""
    conn.settimeout(10)  # a client that stalls mid-request does not hold up the others
    try:
        request, fds = fork_client.receive(conn, max_fds=3)
    except (OSError, ValueError):
        request, fds = None, []
    plain = None
    if (
        request is not None
        and _well_formed(request)
        and len(fds) == 3
        and request["argv"][0].endswith("default_worker.py")
    ):
        theirs = request["env"]
        if any(theirs.get(k) != own[k] for k in ("VIRTUAL_ENV", "CONDA_PREFIX")):
            plain = "path"  # its own interpreter, which its activation put first on PATH
        elif (
            theirs.get("PYTHONPATH") != own["PYTHONPATH"]
            or _read_at_import(theirs) != imported
            or not _threads_applied(theirs)
        ):
            plain = "self"  # its own code on the path, or settings these imports read: not a fork
        else:
            try:
                pid = os.fork()
            except OSError:
                pid = -1
            if pid == 0:
                conn.settimeout(None)
                _become_worker(conn, own_fds, clients, request, fds)
            if pid > 0:
                for fd in fds:
                    os.close(fd)
                return pid
    for fd in fds:
        os.close(fd)
    try:
        fork_client.send(conn, {"plain": plain or "self"})
    except OSError:
        pass
    conn.close()
    return 0


def _well_formed(request: Any) -> bool:
    return (
        isinstance(request, dict)
        and isinstance(request.get("argv"), list)
        and bool(request["argv"])
        and all(isinstance(a, str) for a in request["argv"])
        and isinstance(request.get("env"), dict)
        and isinstance(request.get("cwd"), str)
    )


def _follow_omp_num_threads() -> None:
    """torch sized its thread pool from OMP_NUM_THREADS when the server imported it; Ray sets
    the variable in each worker (to the CPUs of what it runs) only once it knows the task or
    actor, so the fork resizes torch's pool whenever Ray sets it, and now from the environment."""
    import torch

    def apply() -> None:
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0:
            torch.set_num_threads(int(threads))

    apply()
    import ray._private.utils as ray_utils  # the environment is the worker's now: Ray may load

    ray_set = ray_utils.set_omp_num_threads_if_unset

    def set_omp_num_threads_if_unset() -> bool:
        changed = ray_set()
        if changed:
            apply()
        return changed

    ray_utils.set_omp_num_threads_if_unset = set_omp_num_threads_if_unset


def _become_worker(conn, own_fds: tuple, clients: dict, request: dict, fds: list[int]) -> None:
    import runpy
    import signal
    import threading

    server, events, wake_r, wake_w = own_fds
    events.close()
    server.close()
    for other in clients.values():  # other workers' clients must see their own worker's end only
        other.close()
    signal.set_wakeup_fd(-1)
    os.close(wake_r)
    os.close(wake_w)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    # A process group of its own, as Ray gives each worker (Ray kills a worker by its group), in
    # the server's session (the driver's): not setsid, which made each worker a scheduling group
    # (autogroup) of its own, as strong as the driver's whole session, so that work the driver's
    # session ran at the lowest priority (make test's tests without Ray) still took a core from
    # the workers (the reduced demo 139 s alone, 235-250 s beside one SCHED_IDLE busy loop).
    os.setpgid(0, 0)
    try:
        fork_client.send(conn, {"pid": os.getpid()})
    except OSError:  # the client is gone already: so is this worker, quietly
        os._exit(1)

    def lifeline() -> None:  # the client is gone (killed): so are this worker and its children
        try:
            while conn.recv(64):
                pass
        except OSError:
            pass
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=lifeline, name="raytrieve-fork-lifeline", daemon=True).start()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    argv = request["argv"]
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))  # as `python default_worker.py` has it
    sys.argv = list(argv)
    _follow_omp_num_threads()
    runpy.run_path(argv[0], run_name="__main__")
    raise SystemExit(0)


if __name__ == "__main__":
    # Off the terminal's foreground group (Ctrl-C reaches the driver, as for Ray's workers), but in
    # the driver's session, as Ray's own workers are: Linux schedules each session as one group
    # (autogroup), so a session of its own would weigh as much as the driver's whole session,
    # whatever the workers' nice 15 (and see _become_worker's setpgid). Done here, not by Popen's
    # preexec_fn, which is unsafe in a driver with threads (Python 3.10 has no process_group=).
    os.setpgid(0, 0)
    _serve(sys.argv[1], int(sys.argv[2]))
