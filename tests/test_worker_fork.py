"""The embedded Ray's fork server (raytrieve.worker_fork) without Ray: what Ray starts (the
client) must behave as the worker it stands for. A stand-in ``default_worker.py`` plays the
worker; tests/test_cluster.py checks real Ray workers forked from the server."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raytrieve import worker_fork

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork server runs on Linux")

WORKER = """
import os, signal, sys, time
import torch  # imported by the server already: the fork does not import it again
out = dict(pid=os.getpid(), ppid=os.getppid(), argv=sys.argv[1:], cwd=os.getcwd(), env=os.environ.get("JOB_SETTING"),
           threads=torch.get_num_threads(), path=sys.path[:2], group=os.getpgid(0), session=os.getsid(0), exe=sys.executable,
           autogroup=(open("/proc/self/autogroup").read().split() or [None])[0] if os.path.exists("/proc/self/autogroup") else None,
           wrapped=os.environ.get("WRAPPED"))
print(repr(out), flush=True)
what = sys.argv[1]
if what == "exit":
    sys.exit(int(sys.argv[2]))
if what == "signal":
    os.kill(os.getpid(), getattr(signal, sys.argv[2]))
    time.sleep(30)
if what == "sleep":
    open(sys.argv[2], "w").write(str(os.getpid()))
    time.sleep(60)
"""


@pytest.fixture(scope="module")
def server():
    # torch in the server sized for 2 threads: each fork must follow its own OMP_NUM_THREADS
    command = worker_fork.start({"JOB_SETTING": "from the job", "OMP_NUM_THREADS": "2"})
    yield shlex.split(command), worker_fork._server
    assert worker_fork._server is not None
    worker_fork._server.kill()
    worker_fork._server.wait()
    worker_fork._server = None


@pytest.fixture
def script(tmp_path) -> Path:
    path = tmp_path / "default_worker.py"  # the server runs Ray's worker script only
    path.write_text(WORKER)
    return path


def _run(command: list[str], *args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    return subprocess.run(command + list(args), capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def test_the_worker_is_a_fork_with_the_clients_argv_environment_and_folder(server, script, tmp_path):
    command, process = server
    # Ray Train's workers and the encoding actors get MKL's thread count beside OpenMP's: still a fork.
    done = _run(command, str(script), "exit", "3", cwd=tmp_path,
                env={"JOB_SETTING": "the worker's", "OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"})
    assert done.returncode == 3, done.stderr  # the worker's status is the client's
    seen = eval(done.stdout.strip().splitlines()[-1])  # noqa: S307 - our own repr
    assert seen["ppid"] == process.pid  # forked from the server, not started by the client
    assert seen["argv"] == ["exit", "3"]
    assert seen["cwd"] == str(tmp_path)
    assert seen["env"] == "the worker's"  # the client's environment, not the server's
    assert seen["threads"] == 3  # torch follows the worker's OMP_NUM_THREADS, not the server's 2
    # As `python default_worker.py` has it (Ray, once imported, puts its thirdparty_files before it).
    assert str(script.parent) in seen["path"], seen["path"]
    assert seen["group"] == seen["pid"]  # a process group of its own: Ray kills a worker by its group
    # In the driver's session, as Ray's own workers are, not one of its own: Linux schedules each
    # session as one group (autogroup), so a worker in a session of its own took as much CPU as
    # the driver's whole session, whatever the nice values in it (the reduced demo 139 s alone,
    # 235-250 s beside one SCHED_IDLE busy loop of make test's session).
    assert seen["session"] == os.getsid(0)
    # The server too: its own process group (off the terminal's Ctrl-C), the driver's session.
    assert os.getpgid(process.pid) == process.pid != os.getpgrp() and os.getsid(process.pid) == os.getsid(0)
    # A kernel with autogroup on: /proc/self/autogroup names the group. With it off (CI's
    # kernel, sched_autogroup_enabled=0) the file is there but empty, and there is no group.
    if seen["autogroup"] is not None:
        assert seen["autogroup"] == open("/proc/self/autogroup").read().split()[0]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_worker_killed_by_a_signal_kills_its_client_with_it(server, script, sig):
    command, _ = server
    done = _run(command, str(script), "signal", sig)
    assert done.returncode == -getattr(signal, sig), done.stderr
    assert "Traceback" not in done.stderr


def test_a_killed_client_takes_its_worker_with_it(server, script, tmp_path):
    command, _ = server
    pid_file = tmp_path / "pid"
    client = subprocess.Popen(command + [str(script), "sleep", str(pid_file)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and client.poll() is None
        time.sleep(0.05)
    worker = int(pid_file.read_text())
    client.kill()  # as raylet kills a worker it started
    client.wait()
    deadline = time.monotonic() + 10
    while _alive(worker):
        assert time.monotonic() < deadline, "the worker outlived its client"
        time.sleep(0.05)


def test_only_rays_worker_script_is_forked_and_no_server_means_a_plain_start(server, script, tmp_path):
    command, process = server
    other = tmp_path / "other.py"
    other.write_text(WORKER)
    done = _run(command, str(other), "exit", "0")
    assert done.returncode == 0
    assert eval(done.stdout.strip().splitlines()[-1])["ppid"] != process.pid  # noqa: S307 - started by the client

    gone = [*command[:-1], str(tmp_path / "no-such-socket")]
    done = _run(gone, str(script), "exit", "4")
    assert done.returncode == 4
    assert eval(done.stdout.strip().splitlines()[-1])["ppid"] != process.pid  # noqa: S307


def test_a_worker_with_its_own_python_or_code_is_started_plainly(server, script, tmp_path):
    """A task's own runtime env (pip, conda: an activated environment; working_dir, py_modules:
    PYTHONPATH) comes with the job's py_executable: such a worker is not a fork of these imports.
    With another environment active, the worker runs the `python` its PATH names."""
    command, process = server
    # Its own code on the path, or a setting huggingface_hub read when the server imported it.
    # MKL's thread count other than OpenMP's, or one the fork's torch.set_num_threads cannot give.
    for own in ({"PYTHONPATH": str(tmp_path)}, {"HF_HOME": str(tmp_path / "hf")},
                {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "5"}, {"OMP_NUM_THREADS": "0", "MKL_NUM_THREADS": "0"}):
        done = _run(command, str(script), "exit", "0", env=own)
        seen = eval(done.stdout.strip().splitlines()[-1])  # noqa: S307
        assert done.returncode == 0 and seen["ppid"] != process.pid and seen["exe"] == sys.executable, own

    bin_dir = tmp_path / "env" / "bin"
    bin_dir.mkdir(parents=True)
    wrapper = bin_dir / "python"  # the environment's interpreter: this one, marked
    wrapper.write_text(f'#!/bin/sh\nWRAPPED=1 exec {shlex.quote(sys.executable)} "$@"\n')
    wrapper.chmod(0o755)
    done = _run(command, str(script), "exit", "0",
                env={"VIRTUAL_ENV": str(tmp_path / "env"), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    seen = eval(done.stdout.strip().splitlines()[-1])  # noqa: S307
    assert done.returncode == 0 and seen["ppid"] != process.pid and seen["wrapped"] == "1", (seen, done.stderr)


def test_a_reconnect_keeps_the_server_unless_what_its_imports_read_changed(server, monkeypatch):
    """Each embedded start names a new state-API port (RAY_API_SERVER_ADDRESS): the server, which
    never imports Ray, is kept; a setting its imports read starts a new one."""
    command, process = server
    again = worker_fork.start({"JOB_SETTING": "from the job", "OMP_NUM_THREADS": "2",
                               "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:1"})
    assert shlex.split(again) == command and worker_fork._server is process
    monkeypatch.setenv("HF_HOME", "/elsewhere")
    other = worker_fork.start({"JOB_SETTING": "from the job", "OMP_NUM_THREADS": "2"})
    try:
        assert shlex.split(other) != command and worker_fork._server is not process
    finally:
        assert worker_fork._server is not None
        worker_fork._server.kill()
        worker_fork._server.wait()
        worker_fork._server = process  # the module's server again, for the fixture to end


def test_off_where_asked_or_where_the_runtime_env_brings_its_own_python(monkeypatch):
    assert worker_fork.wanted({"env_vars": {"A": "1"}})
    for key in ("working_dir", "pip", "conda", "py_executable"):
        assert not worker_fork.wanted({key: "x"})
    monkeypatch.setenv(worker_fork.SETTING, "0")
    assert not worker_fork.wanted({})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False
