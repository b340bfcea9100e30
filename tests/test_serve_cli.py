"""`raytrieve serve` as a user runs it: its own embedded Ray in a subprocess. A config the
machine cannot hold is refused before anything deploys, naming what each deployment asks for;
a config that fits starts with its CPUs sized from the machine, and Ctrl-C stops it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port

pytestmark = pytest.mark.slow  # starts its own Ray (not the session's) in a subprocess


def _machine_cpus() -> int:
    """The CPUs an embedded Ray finds on this machine (cgroup limits included)."""
    from ray._private.utils import get_num_cpus

    return get_num_cpus()


def _serve(config: dict, tmp_path: Path) -> subprocess.Popen:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "raytrieve.cli", "serve", "--config", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_a_config_the_machine_cannot_hold_is_refused_before_deploying(tiny_models, tmp_path):
    proc = _serve({"dense": {"model": str(tiny_models["dense"]), "num_cpus": 512}, "port": free_port()}, tmp_path)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 2, out + err
    assert "the deployments ask for 512.1 CPU(s) and 0 GPU(s) (dense 1 x 512 CPU, ingress 1 x 0.1 CPU)" in err
    assert f"the cluster has {_machine_cpus()} CPU(s)" in err
    assert "listening on" not in out


def _listener(port: int) -> str:
    """The command line of the process that listens on 127.0.0.1:``port``."""
    import psutil

    (pid,) = {c.pid for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}
    return " ".join(psutil.Process(pid).cmdline())


def _logs_of(server: subprocess.Popen, name: str) -> list[Path]:
    """The log files (its Serve log, its stdout and stderr) of the Ray process named ``name`` that
    ``server``'s own Ray started (another Ray on the machine may run a process of that name)."""
    import psutil

    (process,) = [p for p in psutil.Process(server.pid).children(recursive=True) if name in " ".join(p.cmdline())]
    return [Path(f.path) for f in process.open_files() if f.path.endswith((".log", ".out", ".err"))]


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_serve_sizes_its_replicas_from_the_machine_and_stops_on_ctrl_c(stop, tiny_models, tmp_path):
    """With direct_ingress: the port is answered by the ingress replica itself (its process
    listens there), Serve's proxy answers the next port the same; a batched request logs no
    Ray advice that does not apply. Ctrl-C and a process manager's
    SIGTERM stop it alike: "stopping", exit status 0, the ports closed (on SIGTERM Ray's own
    handler printed a stack dump and the process ended with status 15 and no "stopping", until
    raytrieve re-installed its own after Ray started)."""
    port = free_port(pair=True)
    config = {"dense": {"model": str(tiny_models["dense"]), "name": "tiny"}, "port": port, "direct_ingress": True}
    proc = _serve(config, tmp_path)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the app is up (or the process ends)
        assert f"listening on http://127.0.0.1:{port}" in line, line + proc.stderr.read() if proc.stderr else ""
        assert f"Serve's proxy on port {port + 1}" in line
        # Every route the app answers is announced (TEI's /similarity and root routes were not).
        routes = re.search(r"\(POST (.*); GET (.*)\)", line)
        assert routes and {*routes[1].split(", "), *routes[2].split(", ")} >= {
            "/search", "/v1/embeddings", "/embeddings", "/similarity", "/", "/invocations", "/v2/rerank", "/healthz",
            "/models", "/docs"}, line
        assert "ServeReplica:raytrieve:ingress" in _listener(port)
        assert "ProxyActor" in _listener(port + 1)
        answers = []
        for p in (port, port + 1):
            with urllib.request.urlopen(f"http://127.0.0.1:{p}/v1/models", timeout=30) as r:
                answers.append(json.load(r)["data"])
        assert answers[0] == answers[1]
        models = answers[0]
        assert [m["id"] for m in models] == ["tiny"]
        # the machine's CPUs less the ingress' 0.1, in steps of 0.05, at most 4: one replica's share
        want = min(4.0, int((_machine_cpus() - 0.1) * 20) / 20)
        assert models[0]["num_cpus"] == pytest.approx(want)
        assert models[0]["torch_threads"] == max(1, round(want))
        # Two texts go through the token-budget batch queue (one alone skips it).
        body = json.dumps({"model": "tiny", "input": ["a first text", "a second one"]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/embeddings", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            assert len(json.load(r)["data"]) == 2
        # Ray Serve's advice to raise max_ongoing_requests to max_batch_size counts requests; the
        # batch is in tokens, so the replica drops it (it was logged on the first batched call).
        logs = _logs_of(proc, "ServeReplica:raytrieve:dense")
        assert any(log.name.startswith("replica_raytrieve_dense") for log in logs), logs
        for log in logs:
            assert "max_ongoing_requests" not in log.read_text(), log
            # The ingress logs each request; the model's replica logs no access line of its own.
            assert "CALL __call__" not in log.read_text(), log
        ingress = _logs_of(proc, "ServeReplica:raytrieve:ingress")
        assert any("POST /v1/embeddings 200" in log.read_text() for log in ingress), ingress
        started = time.monotonic()
        proc.send_signal(stop)
        _, err = proc.communicate(timeout=60)
        stopped_in = time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert "raytrieve serve: stopping" in err and "SIGTERM received" not in err, err
    # Ray's "New http_options/controller_options will not be applied" at serve.run: they were (serve.start).
    assert "will not be applied" not in err, err
    print(f"raytrieve serve stopped {stopped_in:.1f} s after {signal.Signals(stop).name}")
    for p in (port, port + 1):
        with pytest.raises(ConnectionRefusedError):  # nothing listens on the ports any more (an HTTP error would)
            socket.create_connection(("127.0.0.1", p), timeout=5).close()
