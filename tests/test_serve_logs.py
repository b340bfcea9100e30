"""Serve's log lines that raytrieve's replicas filter (serve/deployments.py: quiet_serve_logs):
the lines are the ones Ray's installed source writes, and the filters drop only those. No Ray
cluster: the filters are plain logging.Filters, fed records as Ray's logger would make them."""

from __future__ import annotations

import inspect
import logging

import pytest

from raytrieve.serve import deployments


def _record(message: str, created: float) -> logging.LogRecord:
    record = logging.LogRecord("ray.serve", logging.INFO, __file__, 1, message, None, None)
    record.created = created
    return record


def _drain_line(ongoing: int) -> str:
    return f"Waiting for an additional 0.25s to shut down: {ongoing} ongoing requests, 0.0s minimum draining period remaining."


def test_ray_still_writes_the_lines_the_filters_match():
    """A filter for a line Ray no longer writes, or writes to another logger, would pass
    silently: read Ray's own source and loggers."""
    from ray.serve import batching
    from ray.serve._private import replica

    assert replica.logger is batching.logger is logging.getLogger("ray.serve")

    assert 'f"Waiting for an additional {wait_loop_period_s}s to shut down: "' in inspect.getsource(replica)
    assert 'f"`max_batch_size` ({self.max_batch_size}) * `max_concurrent_batches` "' in inspect.getsource(batching)


def test_a_draining_replica_logs_one_wait_line_every_two_seconds():
    f = deployments._DrainWaitLines()
    # Four looks a second (app.DRAIN_POLL_S) for 5 s: by hand, the lines at 0, 2.0 and 4.0 pass.
    looks = [i * 0.25 for i in range(21)]
    passed = [t for t in looks if f.filter(_record(_drain_line(3), 100.0 + t))]
    assert passed == [0.0, 2.0, 4.0]
    # Every other line passes, among them Serve's last one of the drain.
    assert f.filter(_record("Drained ongoing requests; shutting down servers.", 100.1))
    assert f.filter(_record("Started replica.", 100.2))
    # A later drain (the next stop) shows its first line at once.
    assert f.filter(_record(_drain_line(1), 200.0))


def test_the_filters_go_on_the_serve_logger_once(monkeypatch):
    logger = logging.getLogger("ray.serve")
    monkeypatch.setattr(logger, "filters", [])
    deployments.quiet_serve_logs(deployments._TokenBatchWarning())
    deployments.quiet_serve_logs()
    deployments.quiet_serve_logs(deployments._TokenBatchWarning())
    assert sorted(type(f).__name__ for f in logger.filters) == ["_DrainWaitLines", "_TokenBatchWarning"]
    # On the logger, they drop what they match and nothing else.
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep()
    monkeypatch.setattr(logger, "handlers", [handler])
    monkeypatch.setattr(logger, "propagate", False)
    monkeypatch.setattr(logger, "disabled", False)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        for _ in range(3):
            logger.info(_drain_line(2))
        logger.warning("`max_batch_size` (8192) * `max_concurrent_batches` (1) is larger than `max_ongoing_requests` (32).")
        logger.info("Started replica.")
    finally:
        logger.setLevel(level)
    assert seen == [_drain_line(2), "Started replica."]


@pytest.mark.parametrize("every_s", [0.5, 10.0])
def test_the_interval_is_a_setting(every_s):
    f = deployments._DrainWaitLines(every_s=every_s)
    looks = [i * 0.25 for i in range(41)]  # 10 s of looks
    passed = [t for t in looks if f.filter(_record(_drain_line(1), t))]
    expected = [t for t in looks if (t / every_s).is_integer()]  # every_s a multiple of 0.25
    assert passed == expected


def test_each_deployment_filters_its_replicas_serve_logs(monkeypatch):
    """Every replica process (a model, the indices' Retriever, the ingress) installs the filters
    in its constructor, before Serve can drain it."""
    from types import SimpleNamespace

    from raytrieve.serve import app

    logger = logging.getLogger("ray.serve")
    monkeypatch.setattr(logger, "filters", [])
    monkeypatch.setattr(deployments.Documents, "__init__", lambda self, *a, **k: None)
    deployments.Retriever.func_or_class(["index"])
    assert [type(f).__name__ for f in logger.filters] == ["_DrainWaitLines"]

    monkeypatch.setattr(logger, "filters", [])
    monkeypatch.setattr(deployments.ModelRunner, "__init__", lambda self, *a, **k: None)
    deployments.ModelReplica.func_or_class("dense", SimpleNamespace(max_batch_tokens=64, batch_wait_timeout_s=0.01))
    assert sorted(type(f).__name__ for f in logger.filters) == ["_DrainWaitLines", "_TokenBatchWarning"]
    # The ingress's constructor needs a whole app's handles: its source calls it.
    ours = [c for c in app.Ingress.__mro__ if c.__module__ == app.__name__ and "__init__" in vars(c)]
    assert "quiet_serve_logs()" in inspect.getsource(ours[-1].__init__)
