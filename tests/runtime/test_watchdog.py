"""A rank that dies mid-run ends the whole job quickly, with a message naming it, instead of a hang."""
import os
import signal
import subprocess
import sys
import time

import pytest

from asyncsgd.testing.launch import mpi_env, mpi_flavour, mpiexec_command, rank_pid

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_and_hit(tmp_path, sig, extra_env=None):
    """Start a 4-rank Downpour job, send ``sig`` to rank 2 once training is under way; return (rc, seconds, out)."""
    log = tmp_path / "log.jsonl"
    env = {**mpi_env(), "PYTHONPATH": REPO, **(extra_env or {})}
    argv = [sys.executable, "-m", "asyncsgd.train", "--data", "synthetic:600", "--time-limit", "120",
            "--progress", "none", "--eval-every", "1", "--log", str(log)]
    cmd = mpiexec_command(4, argv, timeout=150)
    if mpi_flavour() == "mpich":
        env["MPIEXEC_TIMEOUT"] = "150"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    try:
        victim = None
        deadline = time.monotonic() + 90
        while victim is None and time.monotonic() < deadline:
            time.sleep(0.5)
            victim = rank_pid(proc.pid, 2)
        assert victim is not None, "rank 2 never started"
        while time.monotonic() < deadline and not (log.exists() and log.read_text().count("\n") >= 2):
            time.sleep(0.5)  # until training is well under way
        assert proc.poll() is None, proc.communicate()[0]
        os.kill(victim, sig)
        hit_at = time.monotonic()
        out, _ = proc.communicate(timeout=60)
        return proc.returncode, time.monotonic() - hit_at, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


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
