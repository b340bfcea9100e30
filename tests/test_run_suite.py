"""tests/run_suite.py, what `make test` runs: both parts run, and the exit status is the
suite's (a part that selects nothing counts as passed, a failing part fails the whole)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.train_helpers import ROOT


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAYTRIEVE_TEST_PROFILE"}  # this suite's profile only
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
