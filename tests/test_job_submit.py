"""`ray job submit` of jobs/train.py to a running cluster's job server, the way README tells
users to launch training on a cluster. The cluster is the test session's own Ray (one cluster
per session): its dashboard is the job server, and the job's driver joins it through the
RAY_ADDRESS the job server gives it, as on any cluster. The job server writes the driver's
stdout and stderr to a file, as `raytrieve train ... > train.log 2>&1` would: that log is read
back as a user reads it (raytrieve.progress's lines mode). The second node of the multi-node
tests comes from `cluster/local.sh join` (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tests.train_helpers import ROOT, check_shipped_run, shipped_config, write_data

from raytrieve.train.run import prepare

TRAIN_LINE = re.compile(r"^train: (\d+)/(\d+) steps \(100%\), [\d.]+ steps/s, in \d\d:\d\d(?: \(rate over \d\d:\d\d\))?, loss [\d.]+$")


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
    job_id = f"raytrieve-test-{os.getpid()}-{time.time_ns()}"
    for attempt in range(30):
        submit = subprocess.run(
            [str(bin_dir / "ray"), "job", "submit", "--address", ray_dashboard, "--working-dir", str(ROOT),
             "--submission-id", f"{job_id}-{attempt}",
             "--runtime-env", str(ROOT / "cluster" / "runtime_env.yaml"),
             # What connect decides for the job's driver, not what it decided for this session (whose
             # environment the head, and so the job server, inherited).
             "--", "env", "-u", "RAY_DATA_DISABLE_PROGRESS_BARS", "-u", "RAY_DATA_LOG_LEVEL",
             "python", "jobs/train.py", "--config", str(config_path)],
            env=env, capture_output=True, text=True, cwd=ROOT, timeout=480,
        )
        # The job server answers before its per-node agent is up: retry only that.
        if "No available agent to submit job" not in submit.stdout + submit.stderr:
            job_id = f"{job_id}-{attempt}"
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

    # The driver's log as the job server wrote it (a file, not a terminal): the training stage's
    # lines with the steps the worker made, no bar redraws (Ray Data's included: they ran in the
    # Ray Train worker), no error trace, and it ends naming the MLflow run and how to open it.
    from ray.job_submission import JobSubmissionClient

    text = JobSubmissionClient(ray_dashboard).get_job_logs(job_id)
    assert "\r" not in text and "\n\n" not in text, text[-3000:]
    assert "Traceback" not in text and "RpcError" not in text, text[-3000:]
    lines = text.splitlines()
    assert f"train: started, {summary['steps']} steps" in lines, text
    done = [m.groups() for m in map(TRAIN_LINE.match, lines) if m]
    assert done == [(str(summary["steps"]),) * 2], text
    assert len(lines) <= 20, text
    # Registering into the file store touches no other store (MLflow's default, a sqlite database
    # it would create in the job's working directory: test_model_ref).
    assert not [line for line in lines if "mlflow.store.db" in line], text
    # No error-level line of Ray's (its C++ logs: "[date time,ms E pid tid] file.cc:line: ..."), but
    # one Ray 2.60 logs at that level for its own restartable actors (Ray Train's PreemptionWatcher,
    # Ray Data's map workers get ray.put arguments): ray-project/ray#53727, not an error of the run.
    known = "has constructor arguments in the object store and max_restarts > 0"
    errors = [line for line in lines if re.search(r"\[[\d :,-]+ E \d+ \d+\]", line) and known not in line]
    assert not errors, text
    uri = cfg.mlflow.tracking_uri  # a file store needs MLflow's opt-in variable to be browsed
    assert summary["mlflow_tracking_uri"] == uri
    assert (f"MLflow run {summary['mlflow_run_id']} in {uri}; its UI: MLFLOW_ALLOW_FILE_STORE=true "
            f"{Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri {uri} --port 5000") in lines, text
