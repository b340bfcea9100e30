"""Progress a person can read on long jobs: one bar per stage in a terminal, plain periodic lines
in a log file or CI.

    from raytrieve.progress import stage

    with stage("encode", total=len(shards), unit="shard") as bar:
        for result in results:
            bar.update(1, rows=written)

When stderr is a terminal the stage is a tqdm bar (count, rate, ETA, redrawn in place). When it
is not (``raytrieve train ... > train.log 2>&1``, CI), a redrawn bar would be a flood of carriage
returns, so the stage writes a line when it starts, at most one line every ``every_s`` seconds
or at each further ``every_fraction`` of the total, and a last line when it ends:

    train: 12/94 steps (13%), 1.21 steps/s, ETA 01:08, loss 2.3114
    train: 94/94 steps (100%), 1.19 steps/s, in 01:40 (rate over 01:19), loss 1.9021

Counts made in another process of the cluster (a Ray Train worker's steps) reach the driver's
stage through ``ClusterCount``; ``periodic`` runs a callback on a thread while a block runs (the
demo's heartbeat, the driver following that count).
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

EVERY_S = 30.0  # lines mode: a line at least this often while a stage moves...
EVERY_FRACTION = 0.1  # ...and one at each further tenth of a known total


def interactive(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (stderr by default) is a terminal, where bars are redrawn in place."""
    stream = stream if stream is not None else sys.stderr
    try:
        return stream is not None and bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def format_duration(seconds: float) -> str:
    """``MM:SS``, or ``H:MM:SS`` from an hour on."""
    s = max(0, round(seconds))
    hours, rest = divmod(s, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


class Stage:
    """One stage's count: a tqdm bar on a terminal, else plain lines (see the module docstring).
    ``update(n)`` adds to the count, ``set(done)`` gives it outright; keyword details (a loss,
    rows written) are shown after the count. ``rebase(done)``: the stage starts at ``done`` (a
    resumed run), which then counts neither in the rate nor as this run's progress."""

    def __init__(
        self,
        name: str,
        total: int | None = None,
        unit: str = "it",
        *,
        stream: TextIO | None = None,
        tty: bool | None = None,
        every_s: float = EVERY_S,
        every_fraction: float = EVERY_FRACTION,
        eta: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name, self.total, self.unit, self.eta = name, total, unit, eta
        self.stream = stream if stream is not None else sys.stderr
        self.tty = interactive(self.stream) if tty is None else tty
        self.every_s, self.every_fraction, self.clock = every_s, every_fraction, clock
        self.done, self.base = 0, 0
        self.info: dict[str, Any] = {}
        self.t0 = self.t_base = self.t_moved = self.last_line = clock()
        self.next_mark = self._mark_after(0)
        self.closed = False
        self._bar: Any = None
        self._redirect: Any = None
        if self.tty:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(
                total=total,
                desc=name,
                unit=f" {self._units(2)}",
                file=self.stream,
                dynamic_ncols=True,
                bar_format=None if eta else "{l_bar}{bar}| {n_fmt}/{total_fmt}{postfix}",
            )
            # Log records of the job print above the bar instead of through it.
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
        else:
            self._line(f"{name}: started" + (f", {total} {self._units(total)}" if total is not None else ""))

    def _units(self, n: int) -> str:
        return self.unit if n == 1 or self.unit.endswith("s") else f"{self.unit}s"

    def _mark_after(self, done: int) -> int | None:
        if not self.total or self.every_fraction <= 0:
            return None
        step = max(1, int(self.total * self.every_fraction))
        return (done // step + 1) * step

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def rate(self) -> float | None:
        """This run's units per second up to the last change of the count (None before the first
        one): the wind-down after the last unit (saving, shutting down) is not a unit's time."""
        elapsed = self.t_moved - self.t_base
        moved = self.done - self.base
        return moved / elapsed if moved > 0 and elapsed > 0 else None

    def summary(self) -> str:
        """The line lines mode writes: count (and percent), rate, ETA, details."""
        if self.total is not None:
            pct = 100.0 * self.done / self.total if self.total else 100.0
            parts = [f"{self.done}/{self.total} {self._units(self.total)} ({pct:.0f}%)"]
        else:
            parts = [f"{self.done} {self._units(self.done)}"]
        rate = self.rate() if self.eta else None
        if rate is not None:
            parts.append(f"{rate:.3g} {self._units(2)}/s" if rate < 1000 else f"{rate:,.0f} {self._units(2)}/s")
        if self.closed:
            # The stage's time, and what the rate is over when that differs (a training job's
            # workers start before its first step; a count posted from elsewhere may have
            # started before this stage did).
            wall = self.clock() - self.t0
            counted = self.t_moved - self.t_base if rate is not None else 0.0
            parts.append(f"in {format_duration(max(wall, counted))}")
            if wall - counted >= 2.0 and rate is not None:
                parts[-1] += f" (rate over {format_duration(counted)})"
        elif rate is not None and self.total is not None:
            parts.append(f"ETA {format_duration(max(0, self.total - self.done) / rate)}")
        parts += [f"{k} {_number(v)}" for k, v in self.info.items()]
        return f"{self.name}: " + ", ".join(parts)

    def rebase(self, done: int) -> None:
        self.done = self.base = done
        self.t_base = self.t_moved = self.clock()
        self.next_mark = self._mark_after(done)
        if self._bar is not None:
            self._bar.n = self._bar.last_print_n = self._bar.initial = done
            self._bar.refresh()

    def update(self, n: int = 1, **info: Any) -> None:
        self.set(self.done + n, **info)

    def set(self, done: int, *, seconds: float | None = None, **info: Any) -> None:
        """``seconds``: how long this run's units took by the counter's own clock (a count from
        another process, which may be over before this stage first sees it); the rate uses it."""
        if self.closed:
            return
        moved = done - self.done
        self.done = done
        self.info.update(info)
        if moved:
            self.t_moved = self.clock()
        if seconds is not None and seconds > 0 and done > self.base:
            self.t_base = self.t_moved - seconds
        if self._bar is not None:
            if info:
                self._bar.set_postfix({k: _number(v) for k, v in self.info.items()}, refresh=False)
            self._bar.update(moved)
            return
        crossed = self.next_mark is not None and done >= self.next_mark
        if moved and (crossed or self.t_moved - self.last_line >= self.every_s):
            self.last_line = self.t_moved
            self.next_mark = self._mark_after(done)
            if not (self.total is not None and done >= self.total):  # the last line says it
                self._line(self.summary())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
            self._redirect.__exit__(None, None, None)
        else:
            self._line(self.summary())


@contextlib.contextmanager
def stage(name: str, total: int | None = None, unit: str = "it", **options: Any) -> Iterator[Stage]:
    """A ``Stage`` for the block, closed at its end (with its last line), even when it fails.
    ``options``: ``Stage``'s keyword arguments (stream, tty, every_s, every_fraction, clock)."""
    s = Stage(name, total, unit, **options)
    try:
        yield s
    finally:
        s.close()


@contextlib.contextmanager
def periodic(every_s: float, tick: Callable[[], None], name: str = "progress") -> Iterator[None]:
    """Call ``tick`` every ``every_s`` seconds on a daemon thread while the block runs. An error
    in ``tick`` ends the ticking, never the block: progress must not break the work it watches."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(every_s):
            try:
                tick()
            except Exception:
                return

    thread = threading.Thread(target=run, daemon=True, name=name)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class ClusterCount:
    """A count one process of the Ray cluster posts and another follows: a Ray Train worker's
    steps, read by the driver, which waits in ``trainer.fit()`` and gets no reports between
    checkpoints. It is a small JSON value in the GCS key-value store (the one Ray's libraries
    keep their own state in): one write per post, no actor to start, any node can reach it.
    Posting never fails the work: a lost post only delays the bar."""

    NAMESPACE = "raytrieve-progress"

    def __init__(self, key: str) -> None:
        self.key = key.encode()

    def post(self, done: int, **info: Any) -> None:
        try:
            from ray.experimental.internal_kv import _internal_kv_put

            _internal_kv_put(self.key, json.dumps({"done": done, **info}), True, namespace=self.NAMESPACE)
        except Exception:
            pass

    def read(self) -> dict[str, Any] | None:
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(self.key, namespace=self.NAMESPACE)
        return json.loads(raw) if raw else None

    def clear(self) -> None:
        with contextlib.suppress(Exception):
            from ray.experimental.internal_kv import _internal_kv_del

            _internal_kv_del(self.key, namespace=self.NAMESPACE)

    @contextlib.contextmanager
    def follow(self, into: Stage, every_s: float = 1.0) -> Iterator[None]:
        """While the block runs, read the count every ``every_s`` seconds into the stage ``into``
        (once more at the end). A post may carry ``start``: where the work began (a resume), and
        ``seconds``: how long the poster has worked since ``start``, by its own clock. The rate
        then counts the poster's seconds (a short run may be over before the first read); without
        them it counts from the first post read. Either way the time spent starting the workers
        and loading the model stays out of it: it says nothing of how long the steps will take."""
        based = False

        def tick() -> None:
            nonlocal based
            value = self.read()
            if value is None:
                return
            info = dict(value)
            done, start = int(info.pop("done")), int(info.pop("start", 0))
            seconds = info.pop("seconds", None)
            if not based:
                based = True
                into.rebase(start)
            into.set(done, seconds=float(seconds) if isinstance(seconds, (int, float)) else None, **info)

        try:
            with periodic(every_s, tick, name="progress-follow"):
                yield
            with contextlib.suppress(Exception):
                tick()
        finally:
            self.clear()


def configure_logging() -> None:
    """The commands' log format: INFO and up, each line led by its level and logger. FAISS's
    loader says at INFO which SIMD build it could not load before the one it did: noise here."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)
