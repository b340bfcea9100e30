"""The embedded Ray's worker command (``runtime_env.py_executable``, see raytrieve.worker_fork):
``python -I -S fork_client.py SOCKET default_worker.py ARGS...``.

It asks the fork server at SOCKET to run ``default_worker.py ARGS`` in a process forked from
one that has torch and transformers imported already, hands it this process's stdin, stdout
and stderr, environment and working folder, and stays as the process Ray started: signals it
gets go to the worker, and it exits as the worker exits (a signal's death as that signal). If
this process is killed, the worker kills itself (it watches the socket). If the server cannot
be reached, it runs the worker itself, as Ray would have.

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

HEADER = struct.Struct("!I")


def send(conn: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    payload = HEADER.pack(len(data)) + data
    if fds:
        conn.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
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


def _run_here(argv: list[str]) -> None:
    os.execv(sys.executable, [sys.executable, *argv])


def main(path: str, argv: list[str]) -> None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        send(conn, {"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}, fds=[0, 1, 2])
        started, _ = receive(conn)
    except OSError:
        started = None
    if started is None:  # no server (it ended with its driver, or never started)
        conn.close()
        _run_here(argv)
        return
    pid = started["pid"]

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, forward)
    while True:
        try:
            ended, _ = receive(conn)
            break
        except InterruptedError:
            continue
    if ended is None:  # the server is gone and the worker with it: its status is not known
        os._exit(1)
    status = int(ended["status"])
    if status < 0:  # died of a signal: so does this process
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    os._exit(status & 0xFF)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
