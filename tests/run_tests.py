"""Run asyncsgd's whole test suite: the serial tests, then the multi-rank suites under mpiexec at 1, 2, 3 and 6 ranks.

Usage, from the repository root with the virtualenv's python (its mpiexec is used, see asyncsgd.testing.launch):

    python tests/run_tests.py                      # everything
    python tests/run_tests.py --only mpi --ranks 2,3 -k store
    python tests/run_tests.py --fast               # no `slow` tests; mpi stages at 2 and 3 ranks only
    python tests/run_tests.py tests/store/test_sharded.py -x    # paths and other pytest options are passed through

Every stage runs with a per-test timeout by a thread (a signal is never delivered inside an MPI call), a whole-job
timeout on mpiexec (MPIEXEC_TIMEOUT for MPICH, --timeout for Open MPI) and one on the process group from here, so
nothing hangs.  Each stage's output is streamed; at the end comes a summary per stage, and the last line is a
pytest-style summary line summed over the stages, a stage that crashed or was aborted counting as one failure.
The exit status is 0 only when every stage passed (a stage whose tests were all deselected passes).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from asyncsgd.testing.launch import mpi_env, mpi_flavour, mpiexec_command  # noqa: E402

DEFAULT_RANKS = (1, 2, 3, 6)
FAST_RANKS = (2, 3)
SERIAL_TEST_TIMEOUT = 300      # s per serial test (some start whole MPI jobs)
MPI_TEST_TIMEOUT = 120         # s per multi-rank test
SERIAL_STAGE_TIMEOUT = 1500    # s for the serial pytest: a backstop, per-test timeouts end hangs first
MPI_STAGE_TIMEOUT = 900        # s per mpiexec job (also after the tests, e.g. a hang in MPI_Finalize)
EXIT_NO_TESTS = 5              # pytest's exit status when every test was deselected
WIDTH = 80

SUMMARY_LINE = re.compile(r"^=+ (?P<body>.+?) in (?P<secs>[0-9.]+)s\b.*=+\s*$")
COUNT = re.compile(r"(\d+) (failed|passed|skipped|deselected|xfailed|xpassed|warnings?|errors?)\b")
FAILED_LINE = re.compile(r"^(FAILED|ERROR|TIMEOUT) \S+")
ORDER = ("failed", "passed", "skipped", "xfailed", "xpassed", "errors", "warnings")


@dataclasses.dataclass
class Stage:
    """One pytest process (serial) or one mpiexec job (multi-rank)."""
    name: str
    argv: list
    env: dict
    timeout: float              # s before the process group is killed from here


@dataclasses.dataclass
class StageResult:
    """What a stage did: its exit status (None when killed from here), output, counts and failed tests."""
    stage: Stage
    returncode: int | None
    output: str
    elapsed: float
    counts: dict
    summary_line: str | None
    failed_tests: list
    problem: str | None         # why the stage failed when its counts do not show it

    @property
    def ok(self) -> bool:
        return self.problem is None and not (self.counts.get("failed") or self.counts.get("errors"))

    def totals(self) -> dict:
        """Counts for the combined summary: a stage that failed without a failed test counts as one failure."""
        counts = dict(self.counts)
        if self.problem is not None and not (counts.get("failed") or counts.get("errors")):
            counts["failed"] = counts.get("failed", 0) + 1
        return counts


def parse_counts(body: str) -> dict:
    """Return {'passed': n, 'failed': n, 'errors': n, ...} from the text of a pytest summary line."""
    counts = {}
    for n, key in COUNT.findall(body):
        key = {"error": "errors", "warning": "warnings"}.get(key, key)
        counts[key] = counts.get(key, 0) + int(n)
    return counts


def summary_text(counts: dict, seconds: float) -> str:
    """Return a pytest-style summary line, e.g. '===== 3 failed, 120 passed, 4 skipped in 301.2s ====='."""
    parts = []
    for key in ORDER:
        n = counts.get(key, 0)
        if n:
            word = key[:-1] if key in ("errors", "warnings") and n == 1 else key
            parts.append(f"{n} {word}")
    body = ", ".join(parts) if parts else "no tests ran"
    return f" {body} in {seconds:.1f}s ".center(WIDTH, "=")


def _pytest_args(*, marker: str, k: str | None, test_timeout: float, paths, extra) -> list:
    # --durations: the slowest tests of each stage, to keep the whole CI well under its time budget.
    args = ["-m", "pytest", "-p", "no:cacheprovider", "-o", "tmp_path_retention_count=64",
            f"--timeout={test_timeout:g}", "--timeout-method=thread", "--durations=8", "-m", marker]
    if k:
        args += ["-k", k]
    return args + list(extra) + list(paths)


def _marker(base: str, fast: bool) -> str:
    return f"{base} and not slow" if fast else base


def _base_env() -> dict:
    env = dict(os.environ)
    env["PY_COLORS"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def serial_stage(paths=("tests",), *, k=None, fast=False, test_timeout=SERIAL_TEST_TIMEOUT,
                 stage_timeout=SERIAL_STAGE_TIMEOUT, extra=()) -> Stage:
    """Return the stage running every test not marked mpi with plain pytest."""
    argv = [sys.executable] + _pytest_args(marker=_marker("not mpi", fast), k=k, test_timeout=test_timeout,
                                           paths=paths, extra=extra)
    return Stage("serial", argv, _base_env(), stage_timeout)


def mpi_stage(n_ranks: int, paths=("tests",), *, k=None, fast=False, test_timeout=MPI_TEST_TIMEOUT,
              stage_timeout=MPI_STAGE_TIMEOUT, extra=()) -> Stage:
    """Return the stage running the mpi-marked tests as one mpiexec job of ``n_ranks`` ranks."""
    env = mpi_env(_base_env())
    # each rank gets its share of the cores for BLAS, as asyncsgd.train gives its ranks (unless already set)
    threads = str(max(1, (os.cpu_count() or 1) // n_ranks))
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(name, threads)
    job_timeout = int(stage_timeout)
    if mpi_flavour() == "mpich":
        env["MPIEXEC_TIMEOUT"] = str(job_timeout)
    pytest_argv = [sys.executable] + _pytest_args(marker=_marker("mpi", fast), k=k, test_timeout=test_timeout,
                                                  paths=paths, extra=["--with-mpi", *extra])
    argv = mpiexec_command(n_ranks, pytest_argv, timeout=job_timeout)
    name = f"mpi, {n_ranks} rank{'s' if n_ranks > 1 else ''}"
    return Stage(name, argv, env, job_timeout + 30)


def run_stage(stage: Stage, *, echo: bool = True) -> StageResult:
    """Run ``stage`` from the repository root, streaming its output when ``echo``; never hangs."""
    start = time.monotonic()
    proc = subprocess.Popen(stage.argv, cwd=ROOT, env=stage.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", bufsize=1, start_new_session=True)
    killed = threading.Event()

    def kill():
        killed.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    watchdog = threading.Timer(stage.timeout, kill)
    watchdog.daemon = True
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
        returncode = proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            kill()
            proc.wait()
    # Processes of the job that outlived mpiexec (they share its session) go too.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    elapsed = time.monotonic() - start
    return _result(stage, None if killed.is_set() else returncode, "".join(lines), elapsed)


def _result(stage: Stage, returncode, output: str, elapsed: float) -> StageResult:
    summary = None
    for line in reversed(output.splitlines()):
        if SUMMARY_LINE.match(line.strip()):
            summary = line.strip()
            break
    counts = parse_counts(SUMMARY_LINE.match(summary).group("body")) if summary else {}
    failed = [line.strip() for line in output.splitlines() if FAILED_LINE.match(line.strip())]
    problem = None
    if returncode is None:
        problem = f"killed after {stage.timeout:.0f} s"
    elif summary is None:
        problem = f"exit status {returncode} without a pytest summary (crashed or timed out)"
    elif returncode == EXIT_NO_TESTS and not counts.get("failed") and not counts.get("errors"):
        problem = None
    elif returncode != 0 and not (counts.get("failed") or counts.get("errors")):
        problem = f"exit status {returncode} after a summary without failures"
    elif "(job aborted)" in summary:
        problem = "job aborted after a failure"
    return StageResult(stage, returncode, output, elapsed, counts, summary, failed, problem)


def print_report(results, seconds: float) -> bool:
    """Print the per-stage summary, the failed tests and the combined summary line (last); return True if all ok."""
    totals = {}
    print()
    print(" summary of all stages ".center(WIDTH, "="))
    for r in results:
        body = SUMMARY_LINE.match(r.summary_line).group("body") if r.summary_line else "no summary"
        status = "ok" if r.ok else f"FAILED{': ' + r.problem if r.problem else ''}"
        print(f"{r.stage.name:<14} {body} ({r.elapsed:.1f}s)  {status}")
        for key, n in r.totals().items():
            totals[key] = totals.get(key, 0) + n
    failed = [(r.stage.name, line) for r in results for line in r.failed_tests]
    if failed:
        print("failed tests:")
        for name, line in failed:
            print(f"  [{name}] {line}")
    print(summary_text(totals, seconds), flush=True)
    return all(r.ok for r in results)


def _ranks(text: str) -> tuple:
    try:
        ranks = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        ranks = ()
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"--ranks takes positive integers separated by commas, e.g. 1,2,3,6; "
                                         f"got {text!r}")
    return ranks


def parse_args(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False,
        description="Run the serial tests with pytest, then the mpi-marked tests under mpiexec at several sizes. "
                    "Options not listed here are passed to every pytest (write them as --opt=value).")
    parser.add_argument("paths", nargs="*", default=["tests"], help="test files or folders (default: tests)")
    parser.add_argument("--only", choices=("serial", "mpi"), help="run only the serial or only the mpi stages")
    parser.add_argument("--ranks", type=_ranks, default=None,
                        help="job sizes of the mpi stages, comma separated (default 1,2,3,6; 2,3 with --fast)")
    parser.add_argument("-k", dest="k", metavar="EXPR", help="pytest -k expression, passed to every stage")
    parser.add_argument("--fast", action="store_true",
                        help="deselect tests marked slow and, unless --ranks is given, run mpi stages at 2, 3 ranks")
    parser.add_argument("--timeout", type=float, default=None,
                        help=f"per-test timeout in s (default {SERIAL_TEST_TIMEOUT} serial, {MPI_TEST_TIMEOUT} mpi)")
    parser.add_argument("--stage-timeout", type=float, default=None,
                        help=f"whole-stage timeout in s (default {SERIAL_STAGE_TIMEOUT} serial, "
                             f"{MPI_STAGE_TIMEOUT} per mpiexec job)")
    args, extra = parser.parse_known_args(argv)
    args.extra = extra
    if args.ranks is None:
        args.ranks = FAST_RANKS if args.fast else DEFAULT_RANKS
    return args


def stages_for(args) -> list:
    """Return the stages ``args`` asks for, serial first."""
    common = dict(k=args.k, fast=args.fast, extra=args.extra)
    stages = []
    if args.only in (None, "serial"):
        stages.append(serial_stage(args.paths, test_timeout=args.timeout or SERIAL_TEST_TIMEOUT,
                                   stage_timeout=args.stage_timeout or SERIAL_STAGE_TIMEOUT, **common))
    if args.only in (None, "mpi"):
        stages += [mpi_stage(n, args.paths, test_timeout=args.timeout or MPI_TEST_TIMEOUT,
                             stage_timeout=args.stage_timeout or MPI_STAGE_TIMEOUT, **common)
                   for n in args.ranks]
    return stages


def _launch_failed(result: StageResult) -> bool:
    """True when a stage's launcher exited non-zero before pytest printed its session header (no test ran)."""
    return result.returncode not in (0, None) and "test session starts" not in result.output


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    stages = stages_for(args)
    results = []
    for i, stage in enumerate(stages, 1):
        print(f" stage {i}/{len(stages)}: {stage.name} ".center(WIDTH, "#"))
        print("$ " + shlex.join(stage.argv), flush=True)
        result = run_stage(stage)
        if _launch_failed(result):
            # the launcher died before any test started (Open MPI once: "The PMIx server's listener thread failed to
            # start", exit 213, in a clean-clone CI run): nothing was tested, so try the stage once more
            print(f"(the launcher failed before any test ran; retrying {stage.name} once)", flush=True)
            result = run_stage(stage)
        results.append(result)
    return 0 if print_report(results, time.monotonic() - start) else 1


if __name__ == "__main__":
    sys.exit(main())
