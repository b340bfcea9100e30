"""`make test`: the whole suite as two pytest processes side by side, each with its own share of
the tests (tests/conftest.py marks a test that starts or joins Ray `slow`):

- the Ray tests, in one process against its one session cluster, in the order pytest collects
  them; their output streams here as it comes;
- the tests without Ray, in a second process with one torch thread at the lowest CPU priority
  (nice 19), printed when they end.

Why: the Ray tests keep the cores busy only ~80% of the time (workers starting, polls, HTTP
round trips), and the tests without Ray fill that slack at the lowest priority, so that they
take the cores only when the Ray tests leave them; one process running both in turn leaves it
idle (README: "Testing" has the measurements). Extra arguments go to both processes
(`python tests/run_suite.py -x tests/test_errors.py`); a part with no test selected counts as
passed. The exit status is 0 when both parts pass, else the first failing part's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

NO_TESTS_COLLECTED = 5  # pytest's exit code


def main(args: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest", "-q"]
    # One torch (OpenMP) thread for the tests without Ray: the Ray tests' workers hold most of
    # both cores, and a second thread would mostly wait for them.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryFile("w+") as no_ray_log:
        no_ray = subprocess.Popen([*pytest, "-m", "not slow", *args], stdout=no_ray_log, stderr=subprocess.STDOUT,
                                  env=env, preexec_fn=lambda: os.nice(19))
        try:
            print("== tests with Ray (this process's output follows; the tests without Ray run beside it)",
                  flush=True)
            ray_code = subprocess.call([*pytest, "-m", "slow", *args])
            no_ray_code = no_ray.wait()
        finally:
            if no_ray.poll() is None:
                no_ray.kill()
        no_ray_log.seek(0)
        print("\n== tests without Ray (run beside the ones above)", flush=True)
        sys.stdout.write(no_ray_log.read())
    codes = [c for c in (ray_code, no_ray_code) if c != NO_TESTS_COLLECTED]
    if not codes:
        return NO_TESTS_COLLECTED
    return next((c for c in codes if c != 0), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
