"""`ray job submit` of jobs/train.py to a running cluster's job server, the way README tells
users to launch training on a cluster. The cluster is the test session's own Ray (one cluster
per session): its dashboard is the job server, and the job's driver joins it through the
RAY_ADDRESS the job server gives it, as on any cluster. The second node of the multi-node tests
comes from `cluster/local.sh join` (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raytrieve.train.run import prepare
from tests.train_helpers import ROOT, check_shipped_run, shipped_config, write_data



@pytest.mark.timeout(600)
def test_ray_job_submit_trains(ray_dashboard, tiny_models, tmp_path):
    bin_dir = Path(sys.executable).parent
    data = write_data(tmp_path / "data", n=96)
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data)
    initial = prepare(cfg).spec.model_path
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump()))
    # The job's entrypoint runs `python` from this venv, as a cluster image would have raytrieve's
    # dependencies installed.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    for _ in range(30):
        submit = subprocess.run(
            [str(bin_dir / "ray"), "job", "submit", "--address", ray_dashboard, "--working-dir", str(ROOT),
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
