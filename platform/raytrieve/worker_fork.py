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
threads beyond the BLAS pools (which reset themselves after a fork). Environment variables that
torch reads once at import (OMP_NUM_THREADS, which Ray sets per worker) are applied in the
fork. The server ends when the process that started it ends.

``RAYTRIEVE_FORK_WORKERS=0`` turns it off (Ray then starts every worker itself); a runtime env
that changes what a worker imports (``working_dir``, ``py_modules``, ``pip``, ``conda``, ``uv``,
a container, its own ``py_executable``) turns it off too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from raytrieve import fork_client

SETTING = "RAYTRIEVE_FORK_WORKERS"
# What every worker that touches a model would import first; nothing here may import Ray.
PRELOAD = ("torch", "transformers.modeling_utils", "raytrieve.encoders")
# Runtime-env keys under which a fork of this server would not be the worker Ray means to run.
_OWN_PYTHON = ("working_dir", "py_modules", "pip", "conda", "uv", "container", "image_uri", "py_executable")

_server: subprocess.Popen | None = None
_command: str | None = None


def wanted(runtime_env: dict) -> bool:
    return (
        sys.platform.startswith("linux")
        and os.environ.get(SETTING, "1") != "0"
        and not any(runtime_env.get(k) for k in _OWN_PYTHON)
    )


def start(env_vars: dict[str, str]) -> str:
    """Start the server (once per process) with this process's environment plus ``env_vars``
    (the job's); the ``py_executable`` command that reaches it."""
    global _server, _command
    if _server is not None and _server.poll() is None and _command is not None:
        return _command
    folder = Path(tempfile.mkdtemp(prefix="raytrieve-fork-"))  # 0700: only this user may ask
    path = folder / "socket"
    _server = subprocess.Popen(
        [sys.executable, "-m", "raytrieve.worker_fork", str(path), str(os.getpid())],
        env={**os.environ, **env_vars},
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # off the terminal: Ctrl-C reaches the driver, as for Ray's workers
    )
    deadline = time.monotonic() + 30
    while not path.exists() and _server.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # it binds before it imports: workers may queue while it loads
    _command = f"{sys.executable} -I -S {fork_client.__file__} {path}"
    return _command


def _serve(path: str, parent: int) -> None:
    import gc
    import importlib
    import selectors
    import signal
    import socket

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(256)
    for name in PRELOAD:
        importlib.import_module(name)
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
    while os.getppid() == parent:
        for key, _ in events.select(timeout=1.0):
            if key.fileobj is server:
                conn, _ = server.accept()
                pid = _fork(conn, server, clients, (wake_r, wake_w))
                if pid:
                    clients[pid] = conn
            elif key.fd == wake_r:
                os.read(wake_r, 4096)
        _collect(clients)
    os._exit(0)


def _collect(clients: dict) -> None:
    """Tell each ended worker's client how it ended."""
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
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.waitstatus_to_exitcode(status)
        try:
            fork_client.send(conn, {"status": code})
        except OSError:
            pass
        conn.close()


def _fork(conn, server, clients: dict, wake: tuple[int, int]) -> int:
    """Fork a worker for the request on ``conn``; the worker's pid here, and never returns in it."""
    try:
        request, fds = fork_client.receive(conn, max_fds=3)
    except OSError:
        request, fds = None, []
    if request is None or len(fds) != 3 or not request["argv"][0].endswith("default_worker.py"):
        for fd in fds:
            os.close(fd)
        conn.close()  # the client then runs the worker itself
        return 0
    pid = os.fork()
    if pid:
        for fd in fds:
            os.close(fd)
        return pid
    try:
        _become_worker(conn, server, clients, wake, request, fds)
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(1)
    os._exit(0)  # not reached: _become_worker exits


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


def _become_worker(conn, server, clients: dict, wake: tuple[int, int], request: dict, fds: list[int]) -> None:
    import runpy
    import signal
    import threading

    server.close()
    for other in clients.values():  # other workers' clients must see their own worker's end only
        other.close()
    signal.set_wakeup_fd(-1)
    for fd in wake:
        os.close(fd)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.setsid()  # a group of its own, as Ray gives each worker: Ray kills a worker by its group
    _follow_omp_num_threads()
    argv = request["argv"]
    script_dir = os.path.dirname(os.path.abspath(argv[0]))
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    sys.path[:1] = [script_dir, *extra]
    sys.argv = list(argv)
    fork_client.send(conn, {"pid": os.getpid()})

    def lifeline() -> None:  # the client is gone (killed): so is this worker
        try:
            while conn.recv(64):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=lifeline, name="raytrieve-fork-lifeline", daemon=True).start()
    code = 0
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
    os._exit(code)


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]))
