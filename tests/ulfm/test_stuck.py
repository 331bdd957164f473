"""asyncsgd.ulfm.stuck: a rank stuck inside one MPI call after a peer died ends itself instead of hanging the job
(Open MPI with ULFM; the job is tests/support/stuck_job.py)."""
import re
import subprocess
import sys
import time

import pytest

from asyncsgd.testing.launch import mpi_env, mpiexec_command
from jobs import require_ulfm
from paths import REPO, repo_env


@pytest.mark.slow
def test_a_rank_stuck_in_a_call_after_a_death_ends_itself_and_a_long_call_without_one_does_not():
    require_ulfm()
    cmd = mpiexec_command(3, [sys.executable, "tests/support/stuck_job.py"], timeout=100, with_ft=True)
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=mpi_env(repo_env()), capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert "rank 1: the long call with every rank alive returned" in out, out[-3000:]
    assert re.search(r"asyncsgd: error: rank 1 has been inside one MPI one-sided call \(stuck_job.py:\d+, "
                     r"stuck_call\) for \d+ s while rank\(s\) 2 are dead: .*osc/sm and osc/rdma.*"
                     r"this rank SIGKILLs itself",
                     out), out[-3000:]
    assert "the stuck call returned" not in out
    m = re.search(r"rank 0: dead ranks \[1, 2\] after ([0-9.]+) s", out)
    assert m, out[-3000:]
    assert float(m.group(1)) < 30, m.group(0)  # the limit is 6 s: ended within seconds of it, not at the timeout
    assert took < 90, f"the job took {took:.0f} s"
    assert proc.returncode == 0, out[-3000:]  # a vanished rank is run through
