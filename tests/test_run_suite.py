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


# Three files without Ray and one Ray test. The Ray part waits until the second file has seen
# its one thread; that file waits until the Ray part has ended. The first file's boundary is
# crossed while the Ray part runs (one thread still), the second file's own next test keeps one
# thread, and the third file gets what a fresh torch picks.
WAIT = """
import os, time


def wait_for(path):
    deadline = time.monotonic() + 120
    while not os.path.exists(path):
        assert time.monotonic() < deadline, path
        time.sleep(0.1)
"""

RAY = """
import os
import pytest
from wait import wait_for


@pytest.mark.slow
def test_ray_part():
    wait_for(os.environ["HANDSHAKE"])
"""

ONE_THREAD = """
import os
import torch


def test_one_thread():
    assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
"""

WHILE_RAY_RUNS = ONE_THREAD + """
from wait import wait_for


def test_wait_for_the_ray_part():
    assert not os.path.exists(os.environ["RAYTRIEVE_SUITE_RAY_PART_DONE"])  # the Ray part waits for us
    open(os.environ["HANDSHAKE"], "w").close()
    wait_for(os.environ["RAYTRIEVE_SUITE_RAY_PART_DONE"])


def test_z_the_same_file_after_it():  # a file's tests share one thread count
    test_one_thread()
"""

AFTER = """
import os
import torch


def test_the_next_file():
    assert torch.get_num_threads() == int(os.environ["EXPECTED"]), torch.get_num_threads()
    assert os.environ.get("OMP_NUM_THREADS") == os.environ.get("EXPECTED_OMP")
"""


def test_the_tests_without_ray_get_their_threads_back_once_the_ray_part_has_ended(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    for name, text in (("wait", WAIT), ("test_1_ray", RAY), ("test_2_one_thread", ONE_THREAD),
                       ("test_3_while_ray_runs", WHILE_RAY_RUNS), ("test_4_after", AFTER)):
        (suite / f"{name}.py").write_text(text)
    # The caller set no thread count: what a fresh torch picks, and none for the processes tests
    # start; a caller's OMP_NUM_THREADS is restored as it was.
    def fresh(omp: str | None) -> str:  # torch caps OMP_NUM_THREADS at the cores it finds
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        return subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                              env={**env, **({"OMP_NUM_THREADS": omp} if omp else {})},
                              capture_output=True, text=True, check=True).stdout.strip()

    for outer in (None, "3"):
        expected = fresh(outer)
        # (On one core a fresh torch picks 1 too: there is nothing to give back.)
        env = {"HANDSHAKE": str(tmp_path / f"handshake-{outer}"), "EXPECTED": expected, "PYTHONPATH": str(suite)}
        env.update({"OMP_NUM_THREADS": outer, "EXPECTED_OMP": outer} if outer else {})
        done = _run(str(suite), "--rootdir", str(ROOT), env=env)
        assert done.returncode == 0, done.stdout[-3000:]
        ray_part, no_ray_part = done.stdout.split("== tests without Ray")
        assert "1 passed" in ray_part and "5 passed" in no_ray_part, done.stdout[-3000:]
