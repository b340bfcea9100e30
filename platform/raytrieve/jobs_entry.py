"""The config-driven jobs (train, encode, mine) from a command line: ``python jobs/<job>.py``
under ``ray job submit`` (joins the cluster's Ray) and ``raytrieve <job>`` (starts an embedded
local Ray) both run here. A job loads its YAML config with ``key=value`` overrides, runs, and
prints its summary as one JSON line on stdout; a RaytrieveError is one line on stderr,
``raytrieve <job>: error: ...``, and exit status 2.

One module for both, rather than one entry per package: the scripts and the CLI differ only in
the Ray they use, and the CLI imports this before parsing its arguments, so it stays light
(each job imports its own modules when it runs, after its config loads and its model
references are checked (``model_ref.check_reference``): a config error or a model name that is
nothing is reported in under a second, not after ~5 s of torch and transformers imports).

Stopping: Ctrl-C (SIGINT) and SIGTERM (``ray job stop``, a process manager, ``kill``) end a job
the same way. ``sigterm_as_interrupt`` makes SIGTERM raise KeyboardInterrupt, so a training
run's MLflow run ends KILLED, not FAILED, and the command prints one line (``interrupted``) and
exits 130 (SIGINT) or 143 (SIGTERM) rather than a traceback. Without it Ray's own SIGTERM
handler raised SystemExit(15): the run ended FAILED, and the job ended silently with status 15
(``ray_cluster.connect`` keeps a handler set before Ray starts).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

from raytrieve._io import redact
from raytrieve.errors import RaytrieveError
from raytrieve.model_ref import check_reference
from raytrieve.ray_cluster import sigterm_handler

_terminated = False  # set by the SIGTERM handler: how ``interrupted`` tells SIGTERM from Ctrl-C


def _raise_interrupt(signum: int, frame: Any) -> None:
    # A KeyboardInterrupt, as Ctrl-C raises: Ray's blocking calls (ray.get) re-raise a plain one
    # for any exception a signal handler raised, so a subclass would not reach ``interrupted``.
    global _terminated
    _terminated = True
    raise KeyboardInterrupt("SIGTERM")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the main thread while the block runs (the module
    docstring says why); the handler before it is put back after (``ray_cluster.sigterm_handler``)."""
    global _terminated
    _terminated = False
    with sigterm_handler(_raise_interrupt):
        yield


def interrupted(prog: str) -> int:
    """The one line an interrupted command prints (every job's finished work is kept) and its
    exit status: 128 + the signal's number, as a shell reports a process the signal ended."""
    name, code = ("SIGTERM", 143) if _terminated else ("Ctrl-C", 130)
    print(
        f"{prog}: interrupted ({name}); finished work is kept (encode, mine and train resume it on a rerun)",
        file=sys.stderr,
        flush=True,
    )
    return code


def _train(config: str, overrides: list[str], ray_address: str | None) -> dict[str, Any]:
    from raytrieve.train.config import load_train_config

    cfg = load_train_config(config, overrides)  # first: a config error costs no torch import
    check_reference(cfg.model.name_or_path, f"{config}.model.name_or_path")
    from raytrieve.data.validate import list_datasets

    # A wrong path or column too; the listings are handed on (each dataset is listed once).
    listed = list_datasets(cfg, config)
    from raytrieve.train.run import run_training

    result = run_training(cfg, where=config, ray_address=ray_address, listed=listed)
    if result.already_complete:
        print(f"{result.output_dir}: already trained by this config; nothing to do", file=sys.stderr)
    if result.eval_metrics:  # the evaluator's last figures, as sentence-transformers' trainer logs them
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.eval_metrics.items())
        print(f"evaluation at the last step: {shown}", file=sys.stderr)
    if result.tracking_uri:
        from raytrieve.tracking.mlflow_run import ui_command

        print(
            f"MLflow run {result.run_id} in {result.tracking_uri}; its UI: {ui_command(result.tracking_uri)}",
            file=sys.stderr,
        )
    return {
        "output_dir": result.output_dir,
        "steps": result.steps,
        "mlflow_run_id": result.run_id,
        "mlflow_tracking_uri": result.tracking_uri,
        "model_version": result.model_version,
        "not_trained_on": result.dropped,
        "already_complete": result.already_complete,
        **({"eval_metrics": result.eval_metrics} if result.eval_metrics else {}),
    }


def _encode(config: str, overrides: list[str], ray_address: str | None) -> dict[str, Any]:
    from raytrieve.inference.config import load_encode_config

    cfg = load_encode_config(config, overrides)
    for kind, out in (("dense", cfg.dense), ("sparse", cfg.sparse)):
        if out is not None:
            check_reference(out.model, f"{config}.{kind}.model")
    from raytrieve.inference.encode import run_encode

    # A finished job's rerun says so in run_encode's log ("already complete ...; nothing to do").
    return asdict(run_encode(cfg, where=config, ray_address=ray_address))


def _mine(config: str, overrides: list[str], ray_address: str | None) -> dict[str, Any]:
    from raytrieve.inference.config import load_mine_config

    cfg = load_mine_config(config, overrides)
    check_reference(cfg.retriever.model, f"{config}.retriever.model")
    if cfg.reranker is not None:
        check_reference(cfg.reranker.model, f"{config}.reranker.model")
    from raytrieve.inference.mine import run_mine

    return asdict(run_mine(cfg, where=config, ray_address=ray_address))


JOBS: dict[str, Callable[[str, list[str], str | None], dict[str, Any]]] = {
    "train": _train,
    "encode": _encode,
    "mine": _mine,
}


def run_job(job: str, config: str, overrides: list[str], ray_address: str | None) -> int:
    """Run ``job`` as the YAML file ``config`` with ``overrides`` says; the exit status.
    ``ray_address``: None joins the cluster the process runs on, "local" starts an embedded Ray."""
    from raytrieve.progress import configure_logging

    configure_logging()
    try:
        with sigterm_as_interrupt():
            summary = JOBS[job](config, overrides, ray_address)
    except RaytrieveError as e:
        print(redact(f"raytrieve {job}: error: {e}"), file=sys.stderr)  # a job's log is kept (ray job logs)
        return 2
    except KeyboardInterrupt:
        return interrupted(f"raytrieve {job}")
    print(redact(json.dumps(summary)))  # without the keys a URI in it may hold
    return 0


def add_config_arguments(
    parser: argparse.ArgumentParser, example: str = "jobs/configs/", override: str | None = None
) -> None:
    """``--config X.yaml`` and ``key=value`` overrides, as every config-driven command takes them."""
    parser.add_argument("--config", required=True, help=f"a YAML config (see {example})")
    parser.add_argument(
        "overrides", nargs="*", help=f"key=value overrides, e.g. {override}" if override else "key=value overrides"
    )


def job_main(job: str, description: str | None) -> int:
    """The body of ``jobs/<job>.py``: parse ``sys.argv``, run on the cluster this process runs on."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    args = parser.parse_args()
    return run_job(job, args.config, args.overrides, ray_address=None)
