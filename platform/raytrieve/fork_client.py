"""The embedded Ray's worker command (``runtime_env.py_executable``, see raytrieve.worker_fork):
``python -I -S fork_client.py SOCKET default_worker.py ARGS...``.

It asks the fork server at SOCKET to run ``default_worker.py ARGS`` in a process forked from
one that has torch and transformers imported already, hands it this process's stdin, stdout
and stderr, environment and working folder, and stays as the process Ray started: signals it
gets go to the worker, and it exits as the worker exits (a signal's death as that signal). If
this process is killed, the worker's process group is killed (the worker watches the socket).
If the server cannot be reached, or declines (a runtime env with its own Python or code), it
runs the worker itself, as Ray would have.

Standard library only, and nothing of raytrieve: it starts in milliseconds, once per worker.
"""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import struct
import sys
import time

HEADER = struct.Struct("!I")
# The signals the client passes on to its worker (SIGKILL and SIGSTOP cannot be caught).
RELAYED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def send(conn: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    payload = HEADER.pack(len(data)) + data
    if fds:
        sent = conn.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        if sent < len(payload):  # the rest, once the peer has read some (no empty send: it may have replied)
            conn.sendall(payload[sent:])
    else:
        conn.sendall(payload)


def receive(conn: socket.socket, max_fds: int = 0) -> tuple[dict | None, list[int]]:
    """One message and the descriptors that came with it; (None, []) once the peer has closed."""
    fds = array.array("i")
    size = socket.CMSG_SPACE(max_fds * fds.itemsize) if max_fds else 0
    head, ancillary, _flags, _addr = conn.recvmsg(HEADER.size, size)
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    while head and len(head) < HEADER.size:
        more = conn.recv(HEADER.size - len(head))
        if not more:
            break
        head += more
    if len(head) < HEADER.size:
        return None, list(fds)
    (length,) = HEADER.unpack(head)
    body = b""
    while len(body) < length:
        more = conn.recv(length - len(body))
        if not more:
            return None, list(fds)
        body += more
    return json.loads(body), list(fds)


def _run_here(argv: list[str], interpreter: str | None = None) -> None:
    """Run the worker in this process, as Ray would have: with this Python, or with the one the
    worker's environment puts first on PATH (a runtime env's own virtualenv or conda env)."""
    if interpreter == "path":
        os.execvp("python", ["python", *argv])
    os.execv(sys.executable, [sys.executable, *argv])


def _die_as(status: int) -> None:
    """Exit as the worker did: its exit code, or its death by a signal."""
    if status < 0:
        sig = -status
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those cannot be handled, nor reset
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        time.sleep(1)
        os._exit(128 + sig)
    os._exit(status & 0xFF)


def main(path: str, argv: list[str]) -> None:
    pid: list[int] = []  # the worker's, once the server has forked it

    def forward(signum: int, _frame: object) -> None:
        if not pid:  # not started yet: end as that signal would have ended the worker
            _die_as(-signum)
        try:
            os.kill(pid[0], signum)
        except ProcessLookupError:
            pass

    for s in RELAYED:
        signal.signal(s, forward)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        send(conn, {"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}, fds=[0, 1, 2])
        started, _ = receive(conn)
    except OSError:
        started = None
    if started is None or "plain" in started:  # no server, or a worker it must not fork
        conn.close()
        for s in RELAYED:
            signal.signal(s, signal.SIG_DFL if s != signal.SIGINT else signal.default_int_handler)
        _run_here(argv, (started or {}).get("plain"))
        return
    if "status" in started:  # the fork ended before it could say it had started
        _die_as(int(started["status"]))
    pid.append(int(started["pid"]))
    while True:
        try:
            ended, _ = receive(conn)
            break
        except InterruptedError:
            continue
    if ended is None:  # the server is gone: the worker's status is not known
        os._exit(1)
    _die_as(int(ended["status"]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
