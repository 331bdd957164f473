"""pytest hooks for asyncsgd's suites: the ``gpu`` and ``ranks`` markers, and a multi-rank mode that cannot hang.

Multi-rank suites run as ``mpiexec -n K python -m pytest --with-mpi -m mpi`` (tests/run_tests.py does it for every
K).  Left alone, that prints K interleaved copies of every report, and one rank failing before a collective leaves
the others blocked in it until the job timeout.  With ``--with-mpi`` and K > 1 this file therefore

* silences ranks > 0: their terminal reporter writes to /dev/null (their failures still reach rank 0, see below);
* forwards failures to rank 0: a rank whose test fails (or errors in setup or teardown, or whose collection fails)
  sends the report, with its captured output, to a listener thread on rank 0 over a communicator Dup'd from
  COMM_WORLD, and rank 0 prints it as "rank R: FAILED <test id>";
* aborts on the first failure: after a short grace period (ASYNCSGD_TEST_ABORT_GRACE seconds, default 2) for
  further reports to arrive, rank 0 prints a short summary and a pytest-style summary line, then calls
  ``MPI_Abort``, so the job ends with a non-zero status instead of leaving other ranks in a collective;
* replaces pytest-timeout's thread timer: a timeout (which a signal could never deliver inside an MPI call) is
  reported like a failure, with the stacks of the rank's threads, and aborts the job the same way.

Single-process runs (serial, or ``mpiexec -n 1``) keep going after a timeout: the test is failed through SIGALRM and
the next one runs; only if it has not ended _BACKSTOP_S seconds later (blocked in C code that a signal cannot
interrupt) does pytest-timeout's thread handler dump the stacks and end the process.

Without ``--with-mpi`` the multi-rank mode is not active and mpi4py is not imported here.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback

import pytest

# The suite that tests/harness/test_run_tests.py runs on purpose (it holds planted failures): its files are named fixture_*.py,
# which pytest's file pattern does not collect, and the folder is ignored here as well.  Paths given explicitly on
# the command line are still collected.
collect_ignore = ["support/harness_fixture"]

# Shared test code (fixtures' helpers, fake jobs, the namespace hosts and SLURM fixtures) lives in tests/support and
# is imported by module name (``from hosts import Hosts``) from every test folder.
_SUPPORT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "support")
if _SUPPORT not in sys.path:
    sys.path.insert(0, _SUPPORT)

_REPORT_TAG = 3117
_POLL_S = 0.05
_GRACE_S = float(os.environ.get("ASYNCSGD_TEST_ABORT_GRACE", "2"))
# A failing rank > 0 aborts the job itself this long after reporting, in case rank 0 cannot.
_FALLBACK_ABORT_S = _GRACE_S + 10.0
# Rank 0 waits this long between writing the aborted run's summary and MPI_Abort: the launcher forwards a rank's
# output asynchronously, and an abort that overtakes the forwarding loses the summary (measured: 4 runs in 15 under
# load lost it with no wait).
_FORWARD_S = 1.0
_WIDTH = 80
_BACKSTOP_S = 30.0


def _with_mpi(config) -> bool:
    return bool(config.getoption("with_mpi", default=False))


# ------------------------------------------------------------------ the communicator of multi-rank tests

@pytest.fixture
def comm():
    """A Dup of COMM_WORLD for one test, freed after it (mpi4py imported only by the tests that use it)."""
    from mpi4py import MPI
    dup = MPI.COMM_WORLD.Dup()
    yield dup
    dup.Free()


@pytest.fixture(params=["mpich", "openmpi"])
def python(request):
    """The interpreter (and so the MPI, with its own mpiexec) of each MPI, for the namespace-hosts tests; skips an MPI
    not installed here (support/hosts.py's mpi_pythons)."""
    from hosts import mpi_pythons
    found = mpi_pythons()
    if request.param not in found:
        pytest.skip(f"no virtualenv with {request.param} (.venv for MPICH, .venv-openmpi for Open MPI)")
    return found[request.param]


# ------------------------------------------------------------------ markers that every run honours

def pytest_runtest_setup(item):
    """Skip (or fail) gpu tests without a GPU; skip ``ranks``-restricted tests at other job sizes."""
    if item.get_closest_marker("gpu") is not None:
        _require_gpu()
    ranks = item.get_closest_marker("ranks")
    if ranks is not None and _with_mpi(item.config):
        sizes = tuple(ranks.args)
        if not sizes or not all(isinstance(n, int) and n >= 1 for n in sizes):
            raise ValueError(f"{item.nodeid}: use @pytest.mark.ranks(n, ...) with positive integer job sizes, "
                             f"got {sizes!r}")
        from mpi4py import MPI
        size = MPI.COMM_WORLD.size
        if size not in sizes:
            pytest.skip(f"runs only at {', '.join(map(str, sizes))} ranks (this job has {size})")


def _require_gpu():
    from asyncsgd.backends import cupy_importable, gpu_count
    if gpu_count() > 0:
        return
    why = ("CuPy finds no usable CUDA device" if cupy_importable()
           else "CuPy is not installed (pip install 'asyncsgd[gpu]')")
    if os.environ.get("ASYNCSGD_REQUIRE_GPU") == "1":
        pytest.fail(f"ASYNCSGD_REQUIRE_GPU=1 but {why}", pytrace=False)
    pytest.skip(f"needs a GPU: {why}")


# ------------------------------------------------------------------ multi-rank mode

@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """Install the multi-rank guard under mpiexec with more than one rank, else the single-process timeouts."""
    timeouts = config.pluginmanager.hasplugin("timeout")
    size = 1
    if _with_mpi(config):
        from mpi4py import MPI
        size = MPI.COMM_WORLD.size
    if size > 1:
        guard = MultiRankGuard(config, MPI.COMM_WORLD.Dup())
        config.pluginmanager.register(guard, "asyncsgd_multirank_guard")
        if timeouts:
            config.pluginmanager.register(RankTimeouts(guard), "asyncsgd_rank_timeouts")
    elif timeouts:
        config.pluginmanager.register(ProcessTimeouts(), "asyncsgd_process_timeouts")


def _section(title: str, fill: str = "_") -> str:
    """Return ``title`` centred in a rule of ``fill`` the way pytest prints section headers."""
    return f" {title} ".center(max(_WIDTH, len(title) + 12), fill)


def _report_text(report) -> str:
    """Return a failed report's traceback followed by its captured output sections."""
    parts = [report.longreprtext.rstrip("\n")]
    for title, content in report.sections:
        if content.strip():
            parts.append(_section(title, "-"))
            parts.append(content.rstrip("\n"))
    return "\n".join(parts) + "\n"


def _thread_stacks() -> str:
    """Return the stacks of every thread but the calling one and the timers, without pytest's own frames."""
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    machinery = (f"{os.sep}_pytest{os.sep}", f"{os.sep}pluggy{os.sep}", "runpy", f"{os.sep}threading.py")
    out = []
    for ident, frame in sys._current_frames().items():
        if ident != me and not str(names.get(ident, "")).startswith("asyncsgd timeout"):
            frames = [f for f in traceback.extract_stack(frame) if not any(m in f.filename for m in machinery)]
            out.append(_section(f"stack of thread {names.get(ident, ident)}", "~"))
            out.append("".join(traceback.format_list(frames)))
    return "\n".join(out)


class MultiRankGuard:
    """Quiet ranks > 0, gather failure reports on rank 0, abort the job after the first failure.

    ``comm`` is a Dup of COMM_WORLD that carries only failure reports (tag _REPORT_TAG) and the final barrier.
    """

    def __init__(self, config, comm):
        self.config = config
        self.comm = comm
        self.rank = comm.rank
        self.start = time.monotonic()
        # The terminal itself, opened before any test resumes pytest's fd capture (which would swallow writes
        # from the listener thread during a test).
        self.terminal = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
        self.lock = threading.Lock()
        self.outcomes = {}         # rank 0: test id -> outcome, as pytest's summary line counts them
        self.failures = []         # rank 0: (FAILED/ERROR/TIMEOUT, test id, rank) in the order reported
        self.texts = {}            # rank 0: report text -> first rank that sent it (identical ones print once)
        self.abort_started = False
        self.done = threading.Event()
        self.listener = None
        if self.rank == 0:
            self.listener = threading.Thread(target=self._listen, name="asyncsgd failure listener", daemon=True)
            self.listener.start()
        else:
            self._silence()

    # ---------------------------------------------------------------- quieting ranks > 0

    def _silence(self):
        devnull = open(os.devnull, "w")
        pm = self.config.pluginmanager
        old = pm.get_plugin("terminalreporter")
        if old is not None:
            pm.unregister(old, "terminalreporter")
        pm.register(pytest.TerminalReporter(self.config, devnull), "terminalreporter")
        # Output outside pytest's capture (e.g. with -s) goes nowhere either.
        os.dup2(devnull.fileno(), sys.stdout.fileno())

    # ---------------------------------------------------------------- pytest hooks

    def pytest_runtest_logreport(self, report):
        if self.rank == 0:
            self._count(report)
        if report.failed:
            what = "FAILED" if report.when == "call" else f"ERROR at {report.when} of"
            self.fail(report.nodeid, what, _report_text(report))

    def pytest_collectreport(self, report):
        if report.failed:
            self.fail(report.nodeid or "<collection>", "ERROR collecting", _report_text(report))

    def pytest_sessionfinish(self, session):
        """Wait until every rank has finished its tests (a late failure is still reported), then stop listening."""
        from asyncsgd.runtime.mpi import polled_barrier
        polled_barrier(self.comm, sleep=0.01)
        self.done.set()
        if self.listener is not None:
            self.listener.join()

    # ---------------------------------------------------------------- failures

    def fail(self, nodeid: str, what: str, text: str):
        """Report a failure of this rank to rank 0 and end the job; does not return."""
        if self.rank == 0:
            self._record(0, nodeid, what, text)
        else:
            req = self.comm.isend((self.rank, nodeid, what, text), dest=0, tag=_REPORT_TAG)
            deadline = time.monotonic() + _FALLBACK_ABORT_S
            while not req.Test() and time.monotonic() < deadline:
                time.sleep(0.01)
            # Rank 0 aborts the job after its grace period; abort here only if it did not.
            time.sleep(max(0.0, deadline - time.monotonic()))
            self._abort()
        while True:                # the abort thread ends the process
            time.sleep(1)

    def _listen(self):
        from mpi4py import MPI
        status = MPI.Status()
        while not self.done.is_set():
            if self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_REPORT_TAG, status=status):
                rank, nodeid, what, text = self.comm.recv(source=status.Get_source(), tag=_REPORT_TAG)
                self._record(rank, nodeid, what, text)
            else:
                time.sleep(_POLL_S)

    def _record(self, rank: int, nodeid: str, what: str, text: str):
        with self.lock:
            self.failures.append((what.split()[0], nodeid, rank))
            self.outcomes[nodeid] = "error" if what.startswith("ERROR") else "failed"
            first = self.texts.setdefault(text, rank)
            if first == rank:
                self.terminal.write("\n" + _section(f"rank {rank}: {what} {nodeid}") + "\n" + text)
            else:
                self.terminal.write(f"\nrank {rank}: {what} {nodeid} (same report as rank {first})\n")
            self.terminal.flush()
            if not self.abort_started:
                self.abort_started = True
                threading.Thread(target=self._abort_after_grace, name="asyncsgd abort", daemon=True).start()

    def _abort_after_grace(self):
        time.sleep(_GRACE_S)
        with self.lock:
            lines = [_section("short test summary info (job aborted)", "=")]
            lines += [f"{verb} {nodeid} - on rank {rank}" for verb, nodeid, rank in self.failures]
            lines.append(self._summary_line())
            self.terminal.write("\n".join(lines) + "\n")
            self.terminal.flush()
        time.sleep(_FORWARD_S)
        self._abort()

    def _abort(self):
        from mpi4py import MPI
        sys.stdout.flush()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)

    def _count(self, report):
        """Keep rank 0's outcome per test id the way pytest's summary line counts them."""
        with self.lock:
            if self.outcomes.get(report.nodeid) in ("failed", "error"):
                return
            xfail = hasattr(report, "wasxfail")
            if report.when == "call" or (report.when == "setup" and report.skipped):
                if report.skipped:
                    self.outcomes[report.nodeid] = "xfailed" if xfail else "skipped"
                elif report.passed:
                    self.outcomes[report.nodeid] = "xpassed" if xfail else "passed"

    def _summary_line(self) -> str:
        order = ("failed", "passed", "skipped", "xfailed", "xpassed", "error")
        counts = {key: 0 for key in order}
        for outcome in self.outcomes.values():
            counts[outcome] += 1
        parts = [f"{counts[key]} {'errors' if key == 'error' and counts[key] > 1 else key}"
                 for key in order if counts[key]]
        elapsed = time.monotonic() - self.start
        return _section(f"{', '.join(parts)} in {elapsed:.2f}s (job aborted)", "=")


class RankTimeouts:
    """pytest-timeout's hooks for multi-rank runs: a timeout becomes a reported failure that aborts the job.

    pytest-timeout's own thread timer writes its stack dump to the terminal (silenced on ranks > 0) and leaves the
    job to mpiexec; this one sends the dump to rank 0 like any failure.  Used for every timeout method, since a
    signal cannot interrupt a rank blocked inside MPI.
    """

    def __init__(self, guard: MultiRankGuard):
        self.guard = guard

    @pytest.hookimpl(tryfirst=True)
    def pytest_timeout_set_timer(self, item, settings):
        def expire():
            text = f"Timeout: more than {settings.timeout:g} s\n{_thread_stacks()}"
            self.guard.fail(item.nodeid, "TIMEOUT in", text)

        timer = threading.Timer(settings.timeout, expire)
        timer.name = f"asyncsgd timeout {item.nodeid}"
        timer.daemon = True
        item._asyncsgd_timer = timer
        timer.start()
        return True

    @pytest.hookimpl(tryfirst=True)
    def pytest_timeout_cancel_timer(self, item):
        timer = getattr(item, "_asyncsgd_timer", None)
        if timer is not None:
            timer.cancel()
        return True


class ProcessTimeouts:
    """pytest-timeout's hooks for a single process: fail the timed-out test and go on; exit only as a last resort.

    SIGALRM interrupts the main thread (sleeps, subprocess waits and most Python code) and fails the test; a thread
    timer _BACKSTOP_S later covers C code that a signal cannot interrupt, with pytest-timeout's own thread handler
    (stack dump, then exit).
    """

    @pytest.hookimpl(tryfirst=True)
    def pytest_timeout_set_timer(self, item, settings):
        if threading.current_thread() is not threading.main_thread():
            return None                      # pytest-timeout's own handling (a thread timer)
        import pytest_timeout

        def on_alarm(signum, frame):
            __tracebackhide__ = True
            pytest.fail(f"Timeout: more than {settings.timeout:g} s\n{_thread_stacks()}", pytrace=True)

        backstop = threading.Timer(settings.timeout + _BACKSTOP_S, pytest_timeout.timeout_timer, (item, settings))
        backstop.name = f"asyncsgd timeout backstop {item.nodeid}"
        backstop.daemon = True

        def cancel():
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            backstop.cancel()

        item._asyncsgd_cancel_timeout = cancel
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, settings.timeout)
        backstop.start()
        return True

    @pytest.hookimpl(tryfirst=True)
    def pytest_timeout_cancel_timer(self, item):
        cancel = getattr(item, "_asyncsgd_cancel_timeout", None)
        if cancel is None:
            return None
        cancel()
        return True
