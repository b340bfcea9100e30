"""tests/run_suite.py, what `make test` runs: both parts run, and the exit status is the
suite's (a part that selects nothing counts as passed, a failing part fails the whole)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.train_helpers import ROOT


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # This suite's profile only; and as if called from a shell, not from inside `make test`'s own
    # part without Ray (its OMP_NUM_THREADS=1, its file to watch for the end of the Ray part).
    inner = ("RAYTRIEVE_TEST_PROFILE", "OMP_NUM_THREADS", "RAYTRIEVE_SUITE_RAY_PART_DONE",
             "RAYTRIEVE_SUITE_THREADS_AFTER")
    env = {**{k: v for k, v in os.environ.items() if k not in inner}, **(env or {})}
    return subprocess.run([sys.executable, "tests/run_suite.py", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_the_runner_reports_both_parts_and_the_suites_status(tmp_path):
    # A test without Ray: the Ray part selects nothing (pytest's code 5), the suite passes.
    ok = _run("tests/test_sources.py::test_parquet_folder_row_groups_and_glob")
    assert ok.returncode == 0, ok.stdout[-2000:]
    ray_part, no_ray_part = ok.stdout.split("== tests without Ray")
    assert "deselected" in ray_part and " passed" not in ray_part
    assert " passed" in no_ray_part and "failed" not in no_ray_part
    # A failing test fails the suite with pytest's own code (1), in either part; the other
    # part selecting nothing does not hide it.
    for mark, part in (("", "no-ray"), ("@pytest.mark.slow\n", "ray")):
        failing = tmp_path / part / "test_fails.py"
        failing.parent.mkdir()
        failing.write_text(f"import pytest\n\n\n{mark}def test_fails():\n    assert 1 == 2\n")
        bad = _run(str(failing), "--rootdir", str(ROOT))
        assert bad.returncode == 1 and "1 failed" in bad.stdout, (part, bad.stdout[-2000:])
        ray_part = bad.stdout.split("== tests without Ray")[0]
        assert ("1 failed" in ray_part) == (part == "ray"), bad.stdout[-2000:]
    # Nothing selected anywhere: pytest's 5. And -m, which splits the suite, is refused.
    assert _run("tests/test_sources.py", "-k", "no_such_test").returncode == 5
    refused = _run("-m", "slow")
    assert refused.returncode == 4 and "-m is how the suite is split" in refused.stderr


# The Ray part waits until the first test without Ray has seen its one thread; that test waits
# until the Ray part has ended; the next test of its file keeps one thread, and the next file's
# runs on every core's.
THREADS = """
import os, time
import pytest
import torch


def _wait_for(path):
    deadline = time.monotonic() + 120
    while not os.path.exists(path):
        assert time.monotonic() < deadline, path
        time.sleep(0.1)


@pytest.mark.slow
def test_ray_part():
    _wait_for(os.environ["HANDSHAKE"])


def test_a_while_the_ray_part_runs():
    assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    done = os.environ["RAYTRIEVE_SUITE_RAY_PART_DONE"]
    open(os.environ["HANDSHAKE"], "w").close()
    _wait_for(done)


def test_b_in_the_same_file():  # a file's tests share one thread count
    assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
"""

AFTER = """
import os
import torch


def test_c_in_the_next_file():
    assert torch.get_num_threads() == int(os.environ["EXPECTED"]), torch.get_num_threads()
    assert os.environ.get("OMP_NUM_THREADS") == os.environ.get("EXPECTED_OMP")
"""


def test_the_tests_without_ray_get_every_thread_once_the_ray_part_has_ended(tmp_path):
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "test_threads.py").write_text(THREADS)
    (tmp_path / "suite" / "test_threads_after.py").write_text(AFTER)
    cores = len(os.sched_getaffinity(0))
    # The caller set no thread count: torch's own default (every core), and none for the processes
    # tests start; a caller's OMP_NUM_THREADS is restored as it was.
    for outer, expected, expected_omp in ((None, cores, None), ("3", 3, "3")):
        env = {"HANDSHAKE": str(tmp_path / f"handshake-{outer}"), "EXPECTED": str(expected)}
        env.update({"OMP_NUM_THREADS": outer} if outer else {})
        env.update({"EXPECTED_OMP": expected_omp} if expected_omp else {})
        done = _run(str(tmp_path / "suite"), "--rootdir", str(ROOT), env=env)
        assert done.returncode == 0, done.stdout[-3000:]
        ray_part, no_ray_part = done.stdout.split("== tests without Ray")
        assert "1 passed" in ray_part and "3 passed" in no_ray_part, done.stdout[-3000:]
