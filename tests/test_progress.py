"""Progress on long jobs (raytrieve.progress): plain periodic lines when stderr is a log file,
a bar on a terminal. A real training job's log (a file) is read in tests/test_job_submit.py."""

from __future__ import annotations

import io
import re
import threading
import time

import pytest

from raytrieve.progress import ClusterCount, Stage, format_duration, interactive, periodic, stage


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


LINE = re.compile(r"^train: (\d+)/100 steps \((\d+)%\), ([\d.]+) steps/s, ETA (\d\d):(\d\d)(, loss [\d.]+)?$")


def test_lines_mode_writes_plain_lines_at_the_interval_with_count_rate_and_eta():
    out, clock = io.StringIO(), Clock()
    with stage("train", total=100, unit="step", stream=out, clock=clock, every_s=30.0, every_fraction=0.25) as bar:
        for i in range(1, 101):
            clock.now += 2.0  # 0.5 steps/s
            bar.update(1, loss=round(3.0 - i / 100, 4))
    text = out.getvalue()
    assert "\r" not in text and "\n\n" not in text
    lines = text.splitlines()
    assert lines[0] == "train: started, 100 steps"
    assert lines[-1] == "train: 100/100 steps (100%), 0.5 steps/s, in 03:20, loss 2"
    middle = [LINE.match(line) for line in lines[1:-1]]
    assert all(middle), lines
    # A line every 30 s of the fake clock (every 15 steps at 2 s a step) and at each quarter.
    steps = [int(m.group(1)) for m in middle if m]
    assert steps == [15, 25, 40, 50, 65, 75, 90]
    for m in middle:
        assert m is not None
        done = int(m.group(1))
        assert int(m.group(2)) == done
        assert float(m.group(3)) == pytest.approx(0.5)
        assert int(m.group(4)) * 60 + int(m.group(5)) == (100 - done) * 2  # ETA: what is left at the rate


def test_lines_mode_without_a_total_counts_and_rates_and_says_nothing_while_stalled():
    out, clock = io.StringIO(), Clock()
    s = Stage("encode", unit="row", stream=out, clock=clock, every_s=10.0)
    clock.now += 100.0
    s.set(0)  # nothing moved: no line, however long it has been
    assert out.getvalue() == "encode: started\n"
    s.update(50)
    clock.now += 5.0
    s.update(50)  # 5 s since the last line: none
    clock.now += 50.0  # winding down: counts in the time taken, not in the rate
    s.close()
    s.close()  # once only
    assert out.getvalue().splitlines() == [
        "encode: started",
        "encode: 50 rows, 0.5 rows/s",
        "encode: 100 rows, 0.952 rows/s, in 02:35 (rate over 01:45)",
    ]


def test_rebase_counts_only_this_runs_progress_in_rate_and_eta():
    out, clock = io.StringIO(), Clock()
    s = Stage("train", total=100, unit="step", stream=out, clock=clock, every_fraction=0.5)
    clock.now += 50.0  # startup
    s.rebase(40)  # resumed at step 40
    clock.now += 10.0
    s.set(50)  # 10 steps in 10 s
    assert out.getvalue().splitlines()[-1] == "train: 50/100 steps (50%), 1 steps/s, ETA 00:50"


def test_eta_off_and_failures_still_close_with_a_last_line():
    out, clock = io.StringIO(), Clock()
    with pytest.raises(RuntimeError):
        with stage("mine", total=3, unit="phase", stream=out, clock=clock, eta=False) as s:
            clock.now += 4.0
            s.update(1, finished="corpus vectors")
            raise RuntimeError("boom")
    assert out.getvalue().splitlines() == [
        "mine: started, 3 phases",
        "mine: 1/3 phases (33%), finished corpus vectors",
        "mine: 1/3 phases (33%), in 00:04, finished corpus vectors",
    ]


def test_a_terminal_gets_a_bar_redrawn_in_place():
    term = Terminal()
    assert interactive(term) and not interactive(io.StringIO())
    with stage("encode", total=4, unit="shard", stream=term) as bar:
        assert bar.tty and bar._bar is not None
        for _ in range(4):
            bar.update(1, encoded_rows=10)
    text = term.getvalue()
    assert "\r" in text and "4/4" in text and "encode" in text and "started" not in text


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.4, 61, 3599, 3600, 7322)] == [
        "00:00",
        "00:59",
        "01:01",
        "59:59",
        "1:00:00",
        "2:02:02",
    ]


def test_periodic_ticks_on_a_thread_and_survives_a_failing_tick():
    ticks = threading.Semaphore(0)
    calls: list[int] = []

    def tick() -> None:
        calls.append(1)
        ticks.release()
        if len(calls) == 2:
            raise ValueError("a probe failed")

    with periodic(0.01, tick):
        assert ticks.acquire(timeout=5) and ticks.acquire(timeout=5)
    assert len(calls) == 2  # the failing tick ended the ticking, not the block


def test_cluster_count_follows_a_posted_count_into_a_stage(monkeypatch):
    """The driver's side of training progress, over a stand-in for Ray's key-value store."""
    import ray.experimental.internal_kv as kv

    store: dict[tuple[bytes, str | None], bytes] = {}
    monkeypatch.setattr(
        kv,
        "_internal_kv_put",
        lambda k, v, overwrite=True, namespace=None: store.__setitem__(
            (k, namespace), v.encode() if isinstance(v, str) else v
        ),
    )
    monkeypatch.setattr(kv, "_internal_kv_get", lambda k, namespace=None: store.get((k, namespace)))
    monkeypatch.setattr(kv, "_internal_kv_del", lambda k, namespace=None: store.pop((k, namespace), None))
    out, clock = io.StringIO(), Clock()
    count = ClusterCount("train-test")
    with stage("train", total=10, unit="step", stream=out, clock=clock, every_fraction=0.5) as bar:
        with count.follow(bar, every_s=0.01):
            count.post(4, start=4)  # a run resumed at step 4
            deadline = time.monotonic() + 10
            while bar.base != 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            clock.now += 6.0
            count.post(10, start=4, loss=0.25)
        assert bar.base == 4 and bar.done == 10
    assert store == {}  # cleared at the end
    assert out.getvalue().splitlines()[-1] == "train: 10/10 steps (100%), 1 steps/s, in 00:06, loss 0.25"

    # A short run can be over before the first read: the poster's own seconds give the rate
    # (without them it would be 6 steps over the microseconds between two reads).
    out, clock = io.StringIO(), Clock()
    with stage("train", total=6, unit="step", stream=out, clock=clock) as bar:
        count.post(6, start=0, seconds=12.0, loss=0.5)
        with count.follow(bar, every_s=10):
            pass
    assert out.getvalue().splitlines()[-1] == "train: 6/6 steps (100%), 0.5 steps/s, in 00:12, loss 0.5"


def test_the_demo_heartbeat_beats_on_the_shared_ticker_and_outlives_a_failing_status():
    from raytrieve.demo.progress import Progress

    lines: list[str] = []
    beats = threading.Semaphore(0)
    progress = Progress(lambda line: (lines.append(line), beats.release()))
    statuses = iter(["step 3, loss 0.5"])

    def status() -> str | None:
        return next(statuses)  # StopIteration after the first: a failing probe

    with progress.heartbeat("training dense", status, every_s=0.01):
        assert beats.acquire(timeout=5) and beats.acquire(timeout=5)
    assert re.fullmatch(r"\[00:00\]   \.\.\. training dense: \ds, step 3, loss 0\.5", lines[0]), lines
    assert re.fullmatch(r"\[00:00\]   \.\.\. training dense: \ds", lines[1]), lines
