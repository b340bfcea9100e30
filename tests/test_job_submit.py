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


def _ray_error_lines(log: str, *known: str) -> list[str]:
    """Error-level lines of Ray's in a job's log (its C++ logs: "[date time,ms E pid tid] file.cc:line:
    ..."), but one Ray 2.60 logs at that level for its own restartable actors (Ray Train's
    PreemptionWatcher, Ray Data's map workers get ray.put arguments): ray-project/ray#53727, not an
    error of the run; and the ``known`` ones."""
    known = ("has constructor arguments in the object store and max_restarts > 0", *known)
    return [line for line in log.splitlines()
            if re.search(r"\[[\d :,-]+ E \d+ \d+\]", line) and not any(k in line for k in known)]


def _submit(ray_dashboard: str, job_id: str, config_path: Path, *flags: str) -> tuple[str, subprocess.CompletedProcess]:
    """`ray job submit` of jobs/train.py with ``config_path``: the submission id used and the
    finished command."""
    bin_dir = Path(sys.executable).parent
    # The job's entrypoint runs `python` from this venv, as a cluster image would have raytrieve's
    # dependencies installed.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    for attempt in range(30):
        submit = subprocess.run(
            [str(bin_dir / "ray"), "job", "submit", "--address", ray_dashboard, "--working-dir", str(ROOT),
             "--submission-id", f"{job_id}-{attempt}", *flags,
             "--runtime-env", str(ROOT / "cluster" / "runtime_env.yaml"),
             # What connect decides for the job's driver, not what it decided for this session (whose
             # environment the head, and so the job server, inherited).
             "--", "env", "-u", "RAY_DATA_DISABLE_PROGRESS_BARS", "-u", "RAY_DATA_LOG_LEVEL",
             "python", "jobs/train.py", "--config", str(config_path)],
            env=env, capture_output=True, text=True, cwd=ROOT, timeout=480,
        )
        # The job server answers before its per-node agent is up: retry only that.
        if "No available agent to submit job" not in submit.stdout + submit.stderr:
            return f"{job_id}-{attempt}", submit
        time.sleep(2)
    raise AssertionError(submit.stdout[-3000:] + submit.stderr[-3000:])


@pytest.mark.timeout(600)
def test_ray_job_stop_ends_the_run_killed(ray_dashboard, tiny_models, tmp_path):
    """`ray job stop` (SIGTERM to the job's driver, SIGKILL 3 s later) ends a training job as
    Ctrl-C does: one line in its log, no traceback, its MLflow run KILLED, not FAILED or left
    RUNNING (before, Ray's SIGTERM handler ended the driver silently, status 15, the run FAILED)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from raytrieve.tracking import mlflow_run

    data = write_data(tmp_path / "data", n=96)
    # Many epochs: the run is still training whenever the stop comes.
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, training__epochs=200, eval={})
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump()))
    job_id, submit = _submit(ray_dashboard, f"raytrieve-stop-{os.getpid()}-{time.time_ns()}", config_path,
                             "--no-wait")
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    jobs = JobSubmissionClient(ray_dashboard)
    try:
        deadline = time.time() + 300
        while "train: started" not in jobs.get_job_logs(job_id):  # in fit: its workers start or train
            assert not jobs.get_job_status(job_id).is_terminal(), jobs.get_job_logs(job_id)[-3000:]
            assert time.time() < deadline, jobs.get_job_logs(job_id)[-3000:]
            time.sleep(0.5)
        time.sleep(2)
    finally:
        stop = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "stop", "--address", ray_dashboard,
                               job_id], capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert jobs.get_job_status(job_id) == JobStatus.STOPPED
    text = jobs.get_job_logs(job_id)
    assert ("raytrieve train: interrupted (SIGTERM); finished work is kept (encode, mine and train resume it on "
            "a rerun)") in text.splitlines(), text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    # The GCS may log that it could not kill an actor of the ended job whose process had already
    # exited (its KillActor RPC finds the socket closed): Ray's teardown race, seen in 1 of 5 runs.
    # And Ray Train's controller, force-killed while a task of its runs, may die in Ray's C++ core
    # ("Unhandled exception: St19bad_optional_access" in CoreWorker::ExecuteTask, then its stack,
    # one "logging.cc:474" line per frame): Ray 2.60's, seen once in ~8 runs (docs/test-time.md).
    assert not _ray_error_lines(text, "KillActor RPC failed", "Unhandled exception: St19bad_optional_access",
                                "logging.cc:474:"), text[-3000:]
    client = mlflow_run.client(cfg.mlflow.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"], text[-3000:]
    assert not Path(cfg.output_dir).exists()  # no half-written final model


@pytest.mark.timeout(600)
def test_ray_job_submit_trains(ray_dashboard, tiny_models, tmp_path):
    data = write_data(tmp_path / "data", n=96)
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data)
    prepared = prepare(cfg).spec  # the config as the job's run fills it in, which its model keeps
    initial = prepared.model_path
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump()))
    job_id, submit = _submit(ray_dashboard, f"raytrieve-test-{os.getpid()}-{time.time_ns()}", config_path)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout
    lines = [line for line in submit.stdout.splitlines() if "{\"output_dir\"" in line]
    assert lines, submit.stdout[-3000:]
    summary = json.loads(lines[-1][lines[-1].index("{"):])
    assert summary["not_trained_on"] == []
    # The run the job made is held to what every shipped config's run is (test_train_e2e).
    check_shipped_run(prepared.config, initial, summary["steps"], summary["mlflow_run_id"], summary["model_version"])

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
    assert not _ray_error_lines(text), text
    uri = cfg.mlflow.tracking_uri  # a file store needs MLflow's opt-in variable to be browsed
    assert summary["mlflow_tracking_uri"] == uri
    assert (f"MLflow run {summary['mlflow_run_id']} in {uri}; its UI: MLFLOW_ALLOW_FILE_STORE=true "
            f"{Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri {uri} --port 5000") in lines, text
