"""`ray job submit` of jobs/train.py against a `ray start --head` cluster on 127.0.0.1, the
way README tells users to launch training on a cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from raytrieve.train.run import prepare
from tests.train_helpers import ROOT, check_shipped_run, shipped_config, write_data
from tests.conftest import free_port



@pytest.mark.slow  # starts its own Ray head
@pytest.mark.timeout(600)
def test_ray_job_submit_trains(tiny_models, tmp_path):
    bin_dir = Path(sys.executable).parent
    data = write_data(tmp_path / "data", n=96)
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data)
    initial = prepare(cfg).spec.model_path
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(asdict(cfg)))
    port, dashboard = free_port(), free_port()
    # The cluster runs from this venv, as a cluster image would have raytrieve's dependencies installed.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    # The head comes from cluster/local.sh, as README tells users to start one.
    # The test session's own Ray holds the default agent ports; a second node on this host
    # whose job agent cannot bind answers every submit with "No available agent".
    extra = " ".join(f"--{flag}={free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "ray-client-server-port"))
    head = subprocess.Popen(
        ["bash", str(ROOT / "cluster" / "local.sh"), "start"],
        env={**env, "RAY_BIN": str(bin_dir / "ray"), "RAY_PORT": str(port), "RAY_DASHBOARD_PORT": str(dashboard),
             "RAY_NUM_CPUS": "2", "RAY_BLOCK": "1", "RAY_EXTRA_ARGS": extra},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 120
        while time.time() < deadline:
            ok = subprocess.run([str(bin_dir / "ray"), "job", "list", "--address", address], env=env,
                                capture_output=True).returncode == 0
            if ok:
                break
            time.sleep(2)
        for _ in range(30):
            submit = subprocess.run(
                [str(bin_dir / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
                 "--runtime-env", str(ROOT / "cluster" / "runtime_env.yaml"),
                 "--", "python", "jobs/train.py", "--config", str(config_path)],
                env=env, capture_output=True, text=True, cwd=ROOT, timeout=480,
            )
            # The job server answers before its per-node agent is up: retry only that.
            if "No available agent to submit job" not in submit.stdout + submit.stderr:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout
        lines = [line for line in submit.stdout.splitlines() if "{\"output_dir\"" in line]
        assert lines, submit.stdout[-3000:]
        summary = json.loads(lines[-1][lines[-1].index("{"):])
        assert summary["not_trained_on"] == []
        # The run the job made is held to what every shipped config's run is (test_train_e2e).
        check_shipped_run(cfg, initial, summary["steps"], summary["mlflow_run_id"], summary["model_version"])
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # this cluster only; never `ray stop` (it would stop every Ray here)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
