"""`make test`: the whole suite as two pytest processes side by side, each with its own share of
the tests (tests/conftest.py marks a test that starts or joins Ray `slow`; pyproject.toml's marker
says which others are):

- the Ray tests, in one process against its one session cluster, in the order pytest collects
  them; their output streams here as it comes;
- the tests without Ray, in a second process with one torch thread at the lowest CPU priority
  (Linux's SCHED_IDLE, else nice 19); its output is printed once both parts have ended. Once the
  Ray part has ended, the next test file without Ray and the ones after it run with the threads
  a plain `pytest` would give them (this module is a pytest plugin there: ``pytest_runtest_teardown``
  below).

Why: the Ray tests keep the cores busy only ~80% of the time (workers starting, polls, HTTP
round trips), and the tests without Ray fill that slack at the lowest priority, so that they
take the cores only when the Ray tests leave them; one process running both in turn leaves it
idle (README: "Testing" has the measurements). Extra arguments go to both processes
(`python tests/run_suite.py -x tests/test_errors.py`), except `-m`, which splits the suite here;
a part with no test selected counts as passed. The exit status is 0 when both parts pass, else
the first failing part's. Interrupted (Ctrl-C, SIGTERM, SIGHUP), it asks both parts to stop
(the Ray part shuts its cluster down), and kills what is left after ``STOP_GRACE_S``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

NO_TESTS_COLLECTED = 5  # pytest's exit code
STOP_GRACE_S = 30
ROOT = Path(__file__).resolve().parent.parent


class _Stop(Exception):
    pass


def _stop(signum: int, frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def _end(procs: list[subprocess.Popen], signal_them: bool) -> None:
    """Let both parts stop; ``signal_them``: they were not told (Ctrl-C reaches the terminal's
    whole process group, a SIGTERM or SIGHUP only this process)."""
    for p in procs:
        if signal_them and p.poll() is None:
            p.send_signal(signal.SIGINT)  # pytest's own interrupt: fixtures tear down, Ray stops
    for p in procs:
        try:
            p.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _yield_the_cores() -> None:
    """In the tests without Ray's process, before it runs: take the cores only when the Ray tests
    leave them. nice 19 alone does not: Ray starts its workers at nice 15 (its ``worker_niceness``),
    and a nice-19 process still gets ~30% of a core against them (two nice-15 and two nice-19 busy
    loops on 2 cores: 71% / 29%; the reduced demo took 312 s beside the tests without Ray, 139 s
    alone). A SCHED_IDLE process gets ~8% there; its children inherit it. Where the kernel refuses
    it (some sandboxes), nice 19 alone."""
    os.nice(19)
    if hasattr(os, "SCHED_IDLE"):  # Linux
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


# Set in the tests without Ray's process: the file that appears once the Ray part has ended, and
# the OMP_NUM_THREADS to restore then ("" where the caller set none).
RAY_PART_DONE = "RAYTRIEVE_SUITE_RAY_PART_DONE"
THREADS_AFTER = "RAYTRIEVE_SUITE_THREADS_AFTER"


def pytest_runtest_teardown(item: Any, nextitem: Any) -> None:
    """After each test file's last test without Ray: once the Ray part has ended, take back the
    threads it was left to, for the next file. Where the Ray part ends first (CI's kernel has no
    autogroup, and SCHED_IDLE there leaves the tests without Ray only the cores' idle moments),
    the rest of them ran on one thread with the second core idle. Only between files: a file's
    tests compare results of its fixtures, and a thread count changed between them could change
    a float sum (`--ff` or `--sw` reordering can still split a file). The count is what a fresh
    torch picks with the caller's OMP_NUM_THREADS (none: its own default), so this process and
    the ones its tests start agree, as in a plain `pytest`."""
    done = os.environ.get(RAY_PART_DONE)
    if nextitem is None or nextitem.path == item.path or not done or not os.path.exists(done):
        return
    del os.environ[RAY_PART_DONE]  # once
    threads = os.environ.pop(THREADS_AFTER, "")
    if threads:
        os.environ["OMP_NUM_THREADS"] = threads
    else:
        os.environ.pop("OMP_NUM_THREADS", None)
    torch = sys.modules.get("torch")  # not imported yet: it reads OMP_NUM_THREADS when it is
    if torch is not None:
        fresh = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                               capture_output=True, text=True, timeout=120)
        if fresh.returncode == 0 and fresh.stdout.strip().isdigit():
            torch.set_num_threads(int(fresh.stdout))


def main(args: list[str]) -> int:
    if any(a.startswith("-m") for a in args):
        print("run_suite.py: -m is how the suite is split here; run pytest itself with -m", file=sys.stderr)
        return 4  # pytest's usage error
    pytest = [sys.executable, "-m", "pytest", "-q"]
    cache = ROOT / ".pytest_cache"

    def cache_dir(part: str) -> list[str]:  # each part its own pytest cache: `--lf` sees both parts' failures
        return [] if "no:cacheprovider" in args else ["-o", f"cache_dir={cache / part}"]

    # One torch (OpenMP) thread for the tests without Ray: the Ray tests' workers hold most of
    # both cores, and a second thread would mostly wait for them.
    ray_part_done = Path(tempfile.mkdtemp(prefix="raytrieve-suite-")) / "ray-part-done"
    env = {**os.environ, "OMP_NUM_THREADS": "1", RAY_PART_DONE: str(ray_part_done),
           THREADS_AFTER: os.environ.get("OMP_NUM_THREADS", "")}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stop)
    procs: list[subprocess.Popen] = []
    codes: dict[str, int] = {}
    with tempfile.TemporaryFile() as no_ray_log:
        try:
            procs.append(subprocess.Popen(
                [*pytest, "-m", "not slow", "-p", "tests.run_suite", *cache_dir("no-ray"), *args],
                stdout=no_ray_log, stderr=subprocess.STDOUT, env=env, preexec_fn=_yield_the_cores))
            print("== tests with Ray (this process's output follows; the tests without Ray run beside it)",
                  flush=True)
            procs.append(subprocess.Popen([*pytest, "-m", "slow", *cache_dir("ray"), *args]))
            codes["ray"] = procs[1].wait()
            ray_part_done.touch()
            codes["no-ray"] = procs[0].wait()
        except (KeyboardInterrupt, _Stop) as e:
            print(f"\n== interrupted ({e or 'SIGINT'}): stopping both parts", flush=True)
            _end(procs, signal_them=isinstance(e, _Stop))
            codes["interrupted"] = 2  # pytest's code for an interrupted run
        finally:
            shutil.rmtree(ray_part_done.parent, ignore_errors=True)
            no_ray_log.seek(0)
            print("\n== tests without Ray (run beside the ones above)", flush=True)
            sys.stdout.buffer.write(no_ray_log.read())
            sys.stdout.flush()
    ran = [c for c in codes.values() if c != NO_TESTS_COLLECTED]
    if not ran:
        return NO_TESTS_COLLECTED
    return next((c for c in ran if c != 0), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
