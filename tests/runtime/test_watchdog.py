"""A rank that dies mid-run ends the whole job quickly, with a message naming it, instead of a hang."""
import os
import signal
import sys
import time

import pytest

from asyncsgd.testing.launch import mpi_flavour
from jobs import TRAIN, BackgroundJob, jsonl_lines


def _run_and_hit(tmp_path, sig, extra_env=None):
    """Start a 4-rank Downpour job, send ``sig`` to rank 2 once training is under way (rank 0 has logged 2
    evaluations); return (rc, seconds from the signal to the job's end, out)."""
    log = tmp_path / "log.jsonl"
    argv = TRAIN + ["--data", "synthetic:600", "--time-limit", "120", "--progress", "none", "--eval-every", "1",
                    "--log", str(log)]
    with BackgroundJob(4, argv, timeout=150, env=extra_env) as job:
        victim = job.wait_until(lambda: jsonl_lines(log) >= 2 and job.rank_pid(2), timeout=90,
                                what="rank 2 trains")
        os.kill(victim, sig)
        hit_at = time.monotonic()
        rc, out = job.communicate(60)
        return rc, time.monotonic() - hit_at, out


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds rank processes through /proc")
def test_killed_worker_ends_job(tmp_path):
    """SIGKILL: the launcher ends the job at once; under Open MPI rank 0 names the dead rank (MPICH's mpiexec
    SIGKILLs every survivor itself and prints only its own banner, naming the PID)."""
    rc, seconds, out = _run_and_hit(tmp_path, signal.SIGKILL)
    assert rc != 0
    assert seconds < 30, f"job took {seconds:.0f} s to end after rank 2 died"
    if mpi_flavour() == "openmpi":
        assert "rank 2 (pid" in out and "died" in out, out[-3000:]
    else:
        assert "BAD TERMINATION" in out or "Killed" in out, out[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds rank processes through /proc")
def test_unresponsive_worker_is_named_and_job_ends(tmp_path):
    """SIGSTOP: the launcher sees nothing wrong; the heartbeat watchdog on rank 0 names the rank and ends the job."""
    rc, seconds, out = _run_and_hit(tmp_path, signal.SIGSTOP, {"ASYNCSGD_HEARTBEAT_TIMEOUT": "8"})
    assert rc != 0
    assert seconds < 30, f"job took {seconds:.0f} s to end after rank 2 stopped"
    assert "rank 2 (pid" in out and "stopped responding" in out, out[-3000:]
