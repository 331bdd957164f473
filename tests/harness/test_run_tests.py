"""Tests of the test harness itself (tests/run_tests.py and tests/conftest.py) on the planted suites in
tests/support/harness_fixture/: a rank failing before a collective, or a rank left alone in one, must end the mpiexec job
with a failure reported by rank 0 within seconds instead of hanging it, and a passing run must end with a pytest
summary line.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import run_tests
from asyncsgd.backends import gpu_count

FIXTURE = os.path.join("tests", "support", "harness_fixture")
PASSING = os.path.join(FIXTURE, "fixture_pass.py")
FAILING = os.path.join(FIXTURE, "fixture_fail.py")
FAIL_ID = "tests/support/harness_fixture/fixture_fail.py::test_rank1_raises_before_barrier"
HANG_ID = "tests/support/harness_fixture/fixture_fail.py::test_rank0_waits_in_barrier_alone"
# Far longer than a working harness needs: exceeding it means the abort-on-failure machinery did not act.
DEADLINE_S = 60


def _runner(*args, timeout=240):
    """Run tests/run_tests.py with ``args``; return (exit status, output lines, seconds)."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, os.path.join("tests", "run_tests.py"), *args], cwd=run_tests.ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                          timeout=timeout)
    return proc.returncode, proc.stdout.splitlines(), time.monotonic() - start


def _final_counts(lines):
    """Return the counts of the last line, which must be a pytest-style summary line."""
    assert lines, "the runner printed nothing"
    match = run_tests.SUMMARY_LINE.match(lines[-1])
    assert match, f"last line is not a pytest summary line: {lines[-1]!r}"
    return run_tests.parse_counts(match.group("body"))


def test_failure_on_one_rank_before_a_barrier_ends_the_job_with_rank_0_reporting_it():
    # The job timeout (120 s) is far above DEADLINE_S, so only the conftest's abort can end the run in time.
    status, lines, seconds = _runner("--only", "mpi", "--ranks", "3", "--stage-timeout", "120",
                                     "-k", "passes_first or before_barrier", FAILING)
    text = "\n".join(lines)
    assert status != 0, text
    assert seconds < DEADLINE_S, f"took {seconds:.0f} s: the job was not aborted on the failure\n{text}"
    assert f"rank 1: FAILED {FAIL_ID}" in text, text
    assert "RuntimeError: planted failure on rank 1" in text, text
    assert "rank 0: FAILED" not in text and "rank 2: FAILED" not in text, text
    assert _final_counts(lines) == {"failed": 1, "passed": 1}, lines[-1]


def test_rank_left_alone_in_a_collective_is_ended_by_the_per_test_timeout():
    stage = run_tests.mpi_stage(2, [FAILING], k="alone", test_timeout=5, stage_timeout=120)
    result = run_tests.run_stage(stage, echo=False)
    assert result.returncode not in (0, None), result.output
    assert result.elapsed < DEADLINE_S, f"took {result.elapsed:.0f} s\n{result.output}"
    assert f"rank 0: TIMEOUT in {HANG_ID}" in result.output, result.output
    assert "comm.Barrier()" in result.output, "the report should show the stack where rank 0 waited"
    assert not result.ok and result.totals()["failed"] == 1


def test_timeout_in_a_single_process_fails_that_test_and_the_run_goes_on():
    stage = run_tests.serial_stage([FAILING], k="serial", test_timeout=3, stage_timeout=120)
    result = run_tests.run_stage(stage, echo=False)
    assert result.elapsed < DEADLINE_S, result.output
    assert result.counts == {"failed": 1, "passed": 1, "deselected": 3}, result.output
    assert "Timeout: more than 3 s" in result.output and "time.sleep(600)" in result.output


def test_passing_suite_exits_0_with_ranks_quiet_and_the_summary_last():
    status, lines, seconds = _runner("--ranks", "2", "--stage-timeout", "120", PASSING)
    text = "\n".join(lines)
    assert status == 0, text
    # One pytest header per stage: rank 1 of the mpi stage prints nothing.
    assert text.count("test session starts") == 2, text
    has_gpu = gpu_count() > 0
    # serial: the arithmetic test and the gpu test; mpi at 2 ranks: allreduce and ring pass, ranks(3) is skipped.
    expected = {"passed": 3 + has_gpu, "skipped": 1 + (not has_gpu)}
    assert _final_counts(lines) == expected, lines[-1]


def test_gpu_test_fails_instead_of_skipping_when_a_gpu_is_required():
    stage = run_tests.serial_stage([PASSING], k="gpu_visible")
    stage.env["ASYNCSGD_REQUIRE_GPU"] = "1"
    result = run_tests.run_stage(stage, echo=False)
    if gpu_count() > 0:
        assert result.ok and result.counts.get("passed") == 1, result.output
    else:
        # Reported at setup, before the test's fixtures could fail less clearly: pytest counts it as an error.
        assert result.returncode == 1 and not result.ok, result.output
        assert result.counts.get("failed", 0) + result.counts.get("errors", 0) == 1, result.output
        assert "ASYNCSGD_REQUIRE_GPU=1 but" in result.output


def test_summary_line_sums_stages_and_counts_a_crashed_stage_as_failed():
    stage = run_tests.serial_stage()
    ok = run_tests._result(stage, 0, "==== 3 passed, 1 skipped, 2 deselected in 1.50s ====\n", 1.5)
    crashed = run_tests._result(stage, 139, "tests/test_x.py ..\nSegmentation fault\n", 2.0)
    assert ok.ok and not crashed.ok
    assert crashed.totals() == {"failed": 1}
    totals = {}
    for r in (ok, crashed):
        for key, n in r.totals().items():
            totals[key] = totals.get(key, 0) + n
    line = run_tests.summary_text(totals, 3.5)
    assert run_tests.SUMMARY_LINE.match(line)
    assert " 1 failed, 3 passed, 1 skipped in 3.5s " in line
