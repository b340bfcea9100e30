"""One MLflow run per training job.

The driver resolves the tracking store, opens the run and logs the whole resolved config as
params; rank 0 logs metrics (already averaged over ranks) and the final model into that run
by id; the driver ends it FINISHED or FAILED and registers the model if asked.

Tracking store: ``mlflow.tracking_uri`` in the config, else ``MLFLOW_TRACKING_URI``, else a
local directory ``./mlruns``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from raytrieve._io import redact
from raytrieve.errors import ConfigError

PARAM_LIMIT = 6000  # MLflow's longest param value
MODEL_CARD_ARTIFACT = "model_card.md"  # the model card, also a run artifact of its own
# The evaluator's last figures under its own key names (``ndcg@10``: MLflow's metrics cannot hold "@")
EVALUATION_ARTIFACT = "evaluation.json"
CARD_SUMMARY_TAG = "raytrieve.model_card.summary"  # its summary line: a registered version's description


def tracking_uri(configured: str | None) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or Path("mlruns").resolve().as_uri()
    if "://" not in uri:  # a bare path
        uri = Path(uri).resolve().as_uri()
    return uri


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, dict) and any(not re.fullmatch(r"[\w\-. :/]+", str(k)) for k in value):
        # Free-text keys (regexes of learning_rate_mapping...) are no valid param names: one JSON value.
        return {prefix[:-1]: redact(json.dumps(value, default=str))[:PARAM_LIMIT]}
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(value, list) and any(isinstance(v, (dict, list, BaseModel)) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: redact(str(value))[:PARAM_LIMIT]}  # a URI's keys are no parameter


def process_env(uri: str) -> dict[str, str]:
    """Environment a process (a Serve replica, a Ray worker) needs to read from ``uri``."""
    env = {"MLFLOW_TRACKING_URI": uri}
    if uri.startswith("file:"):
        env["MLFLOW_ALLOW_FILE_STORE"] = "true"
    return env


def ui_command(uri: str) -> str:
    """How to open MLflow's UI on ``uri``: a tracking server's own address, else ``mlflow ui`` on
    the store (a file store, a path or file:, needs the variable that allows it: MLflow 3
    refuses one otherwise)."""
    import shlex

    if uri.startswith(("http://", "https://")):
        return f"open {uri} (the tracking server's UI)"
    allow = "MLFLOW_ALLOW_FILE_STORE=true " if uri.startswith("file:") or "://" not in uri else ""
    # This interpreter's mlflow, by its absolute path: the line works from any folder, and a
    # shell that never activated the venv has no mlflow on its PATH.
    installed = Path(sys.executable).parent / "mlflow"
    mlflow = shlex.quote(str(installed)) if installed.exists() else "mlflow"
    return f"{allow}{mlflow} ui --backend-store-uri {shlex.quote(uri)} --port 5000"


@contextlib.contextmanager
def _variables(values: dict[str, str]):
    """``values`` set in this process's environment for the block, then put back as they were."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def environment(uri: str):
    """Point this process's MLflow at ``uri`` for the block (model URIs resolve through it)."""
    with _variables(process_env(uri)):
        yield


def client(uri: str):
    from mlflow.tracking import MlflowClient

    if uri.startswith("file:"):
        # MLflow 3 refuses a plain file store unless allowed explicitly (in every process).
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def registry(uri: str):
    """A client for the model registry at ``uri``, with this process's default store pointed at
    ``uri`` for the block. MLflow's file registry reads each version's logged model through a
    client made without a URI, so on the default store: in MLflow 3 that is ``sqlite:///mlflow.db``
    in the working directory, which every registration (its new version is read back) and every
    version read would create there, migrations and all, and read the version's metrics from.
    (A process that called ``mlflow.set_tracking_uri`` keeps that store for those lookups: MLflow
    prefers it to the environment.)"""
    with environment(uri):
        yield client(uri)


def check_store(uri: str, experiment: str, tags: dict[str, str], where: str) -> None:
    """Before any cluster work: the tag keys and experiment name MLflow accepts, and a store that
    opens (a reachable server, an installed database driver). A run failed there after Ray had
    started, with MLflow's traceback; a bad registry name is the config's own check."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_experiment_name, _validate_tag_name

    for key in tags:
        try:
            _validate_tag_name(key)
        except MlflowException as e:
            raise ConfigError(f"{where}.mlflow.tags: {key!r}: {e.message}") from None
    try:
        _validate_experiment_name(experiment)
    except MlflowException as e:
        raise ConfigError(f"{where}.mlflow.experiment: {e.message}") from None
    # One quick try: MLflow retries an unreachable server for minutes by default.
    try:
        with _variables({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}):
            client(uri).get_experiment_by_name(experiment)
    except Exception as e:  # MlflowException, a missing driver (ModuleNotFoundError), a refused connection
        text = " ".join(str(e).split())
        raise ConfigError(
            f"{where}.mlflow.tracking_uri (or MLFLOW_TRACKING_URI) {redact(uri)}: the tracking store does not open "
            f"({type(e).__name__}: {redact(text[:300])}); fix the URI or start its server, or leave it unset for "
            "./mlruns"
        ) from None


def start_run(uri: str, experiment: str, run_name: str | None, tags: dict[str, str], params: dict[str, str]) -> str:
    from mlflow.entities import Param, RunTag

    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else c.create_experiment(experiment)
    run = c.create_run(exp_id, run_name=run_name, tags=dict(tags))
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        c.log_batch(run.info.run_id, params=items[i : i + 100])
    c.log_batch(run.info.run_id, tags=[RunTag("raytrieve.component", "train")])
    return run.info.run_id


def reopen_run(uri: str, run_id: str, experiment: str) -> bool:
    """Mark the run ``run_id`` of the store ``uri`` running again (a rerun that resumes its
    checkpoints logs on into it); False when the store has no such run (deleted, another store)
    or it is not in ``experiment`` (the config now names another: a new run goes there).
    Its params are kept as they were: MLflow refuses a param changed, and the resumed training
    is the same run (its identity is checked against the checkpoints' before this)."""
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        run = c.get_run(run_id)
    except MlflowException:
        return False
    wanted = c.get_experiment_by_name(experiment)
    if run.info.lifecycle_stage != "active" or wanted is None or wanted.experiment_id != run.info.experiment_id:
        return False
    resumes = int(run.data.tags.get("raytrieve.resumes", "0")) + 1
    c.update_run(run_id, status="RUNNING")
    c.log_batch(run_id, tags=[RunTag("raytrieve.resumes", str(resumes))])
    return True


def metric_name(key: str) -> str:
    """MLflow's allowed characters: ``ndcg@10`` becomes ``ndcg_at_10``."""
    return re.sub(r"[^\w\-. :/]", "_", key.replace("@", "_at_"))


class MetricLogger:
    """Rank 0's handle on the run."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.client, self.run_id = client(uri), run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(metric_name(k), float(v), now, step) for k, v in metrics.items()]
        )

    def log_model_dir(self, path: str | Path, artifact_path: str = "model") -> None:
        self.client.log_artifacts(self.run_id, str(path), artifact_path)

    def log_evaluation(self, metrics: dict[str, float]) -> None:
        """The evaluator's last figures, keys as it names them, as the run's ``evaluation.json``."""
        self.client.log_dict(self.run_id, {k: float(v) for k, v in metrics.items()}, EVALUATION_ARTIFACT)

    def log_model_card(self, card: str, summary: str) -> None:
        """The card as the run's ``model_card.md``, its summary line as a tag (``register_model``
        describes the version with it)."""
        self.client.log_text(self.run_id, card, MODEL_CARD_ARTIFACT)
        self.client.set_tag(self.run_id, CARD_SUMMARY_TAG, summary[:PARAM_LIMIT])


@contextlib.contextmanager
def download_bars(on_a_terminal: bool) -> Iterator[None]:
    """MLflow's per-file download bars for this block: in a log (a job's, a piped console) they
    are noise, so drawn ``on_a_terminal`` only, as raytrieve's own, or never (a setting of the
    user's own wins)."""
    from raytrieve.progress import interactive

    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if (on_a_terminal and interactive()) or name in os.environ:
        yield
        return
    os.environ[name] = "false"
    try:
        yield
    finally:
        os.environ.pop(name, None)


def read_evaluation(uri: str, run_id: str) -> dict[str, float]:
    """The run's last evaluation under the evaluator's key names (``evaluation.json``); a run
    without it (one written before it was logged) gives its ``eval_`` metrics as MLflow holds them."""
    import tempfile

    c = client(uri)
    if any(f.path == EVALUATION_ARTIFACT for f in c.list_artifacts(run_id)):
        with tempfile.TemporaryDirectory() as tmp, download_bars(on_a_terminal=False):  # one small file
            return json.loads(Path(c.download_artifacts(run_id, EVALUATION_ARTIFACT, tmp)).read_text())
    return {k: v for k, v in sorted(c.get_run(run_id).data.metrics.items()) if k.startswith("eval_")}


RunStatus = Literal["FINISHED", "FAILED", "KILLED"]


def end_run(uri: str, run_id: str, status: RunStatus) -> None:
    """``status``: KILLED is a run stopped by Ctrl-C, SIGTERM or ``ray job stop``."""
    client(uri).set_terminated(run_id, status=status)


def register_model(uri: str, run_id: str, name: str) -> str:
    """Register the run's ``model`` artifact folder (a sentence-transformers directory, not an
    MLflow flavour) as a new version of ``name``, described by its model card's summary line;
    returns the version number. A run has one version of ``name``: a rerun of a run stopped while
    it registered (it resumes into the same MLflow run) gets the version made then, not another."""
    from mlflow.exceptions import MlflowException

    with registry(uri) as c:
        try:
            c.create_registered_model(name)
        except MlflowException as e:
            if "already exists" not in str(e).lower() and e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        run = c.get_run(run_id)
        artifact_uri = run.info.artifact_uri
        assert artifact_uri is not None, "MLflow gives every run an artifact root"
        source = f"{artifact_uri.rstrip('/')}/model"
        made = [v for v in c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'") if v.source == source]
        if made:
            return str(min(int(v.version) for v in made))
        description = run.data.tags.get(CARD_SUMMARY_TAG)
        return str(c.create_model_version(name, source, run_id=run_id, description=description).version)
