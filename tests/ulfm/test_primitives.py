"""Running through a dead rank with ULFM (Open MPI, ``mpirun --with-ft ulfm``): tests/support/ulfm_job.py under mpirun.

Each job has workers accumulate into a ShardedParameters store; a worker or a server dies (SIGKILL, or SIGSTOP found
by the heartbeat watch), the survivors shrink, rebuild the store and finish, and rank 0 checks the final vector
against the pushes every rank counted (exact integers).  Without ULFM (MPICH, or mpirun without --with-ft) the same
job must end promptly, non-zero, naming the dead rank.
"""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from asyncsgd.testing.launch import mpi_env, mpi_flavour, mpiexec_path
from jobs import require_ulfm
from paths import REPO, repo_env

JOB = os.path.join(REPO, "tests", "support", "ulfm_job.py")
JOB_TIMEOUT = 150  # s, whole job: every case here ends in well under 30 s on a quiet machine


def _run(n, args, *, with_ft=True):
    """Run the job on ``n`` ranks; return (exit status, seconds, output).

    MPICH's mpiexec runs with ``-disable-auto-cleanup``: with its default cleanup it SIGKILLs every rank at once and
    its banner names one PID, which was a survivor killed by the cleanup in our runs, not the dead rank.
    """
    env = mpi_env(repo_env())
    cmd = [mpiexec_path()]
    if mpi_flavour() == "openmpi":
        cmd += ["--timeout", str(JOB_TIMEOUT - 20)] + (["--with-ft", "ulfm"] if with_ft else [])
    else:
        env["MPIEXEC_TIMEOUT"] = str(JOB_TIMEOUT - 20)
        cmd += ["-disable-auto-cleanup"]
    cmd += ["-n", str(n), sys.executable, JOB] + list(args)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                            start_new_session=True)
    try:
        raw, _ = proc.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raw, _ = proc.communicate()
        pytest.fail(f"job did not end within {JOB_TIMEOUT} s:\n" + raw.decode(errors="replace")[-3000:])
    return proc.returncode, time.monotonic() - start, raw.decode(errors="replace")


def _ok(rc, out):
    assert rc == 0, out[-4000:]
    assert "RESULT ok" in out, out[-4000:]
    assert not re.search(r"^FAIL ", out, re.M), out[-4000:]


# ---------------------------------------------------------------- Open MPI with ULFM

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals and /proc")


@pytest.mark.slow
def test_undisturbed_job_is_exact():
    require_ulfm()
    rc, _, out = _run(4, ["--scenario", "none", "--rounds", "4"])
    _ok(rc, out)
    assert "ULFM on" in out and "lost at" not in out


@pytest.mark.slow
def test_killed_worker_is_run_through():
    require_ulfm()
    rc, _, out = _run(4, ["--scenario", "worker"])
    _ok(rc, out)
    assert re.search(r"worker 2 \(rank 3\) lost at [0-9.]+ s; 2 workers continue", out), out[-3000:]
    # killed after 2.5 rounds of 10 pushes: exactly those 25 landed, and the survivors' counts match the store
    assert "worker 2 (rank 3): 25 pushes landed" in out, out[-3000:]
    assert "3 ranks left" in out


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [0, 80], ids=["before-first-push", "after-last-push"])
def test_worker_killed_at_the_start_or_the_end(kill_at):
    require_ulfm()
    rc, _, out = _run(4, ["--scenario", "worker", "--kill-at", str(kill_at)])  # 8 rounds x 10 pushes
    _ok(rc, out)
    assert re.search(r"worker 2 \(rank 3\) lost at [0-9.]+ s; 2 workers continue", out), out[-3000:]
    assert f"worker 2 (rank 3): {kill_at} pushes landed" in out, out[-3000:]


@pytest.mark.slow
def test_rank0_death_ends_the_job_and_says_how_to_resume():
    require_ulfm()
    rc, seconds, out = _run(4, ["--scenario", "root"])
    assert rc == 3, out[-3000:]
    assert seconds < 60, f"took {seconds:.0f} s"
    assert "rank 0 lost at" in out and "--resume" in out, out[-3000:]
    assert "RESULT" not in out


@pytest.mark.slow
def test_two_workers_killed_at_different_times():
    require_ulfm()
    rc, _, out = _run(6, ["--scenario", "two"])
    _ok(rc, out)
    assert "worker 4 (rank 5) lost at" in out and "worker 3 (rank 4) lost at" in out, out[-3000:]
    assert "3 workers continue" in out and "4 ranks left" in out


@pytest.mark.slow
def test_worker_dying_inside_the_recovery_is_run_through_exactly():
    """A second worker dies after the survivors' shrink, as they rebuild the store: the attempt fails everywhere
    (commit), they shrink again and rebuild from the shards and version they held; no push of a survivor lost."""
    require_ulfm()
    rc, _, out = _run(6, ["--scenario", "during"])
    _ok(rc, out)
    assert "SIGKILL to itself inside the recovery" in out and "shrinking again" in out, out[-3000:]
    assert "3 ranks left" in out or "4 ranks left" in out, out[-3000:]


@pytest.mark.slow
def test_killed_server_shard_is_restored_from_the_freshest_replica():
    require_ulfm()
    rc, _, out = _run(5, ["--scenario", "server", "--servers", "2"])
    _ok(rc, out)
    m = re.search(r"server 1 \(rank 1\) lost at [0-9.]+ s; shard 1 restored from rank \d+'s replica; "
                  r"(\d+) pushes lost; 2 workers continue", out)
    assert m, out[-3000:]
    # the server died mid-round: the pushes of that round after the last replica were lost, and counted
    assert int(m.group(1)) > 0


@pytest.mark.slow
def test_stopped_worker_found_by_heartbeat_then_excluded():
    require_ulfm()
    rc, _, out = _run(5, ["--scenario", "stop", "--heartbeat-timeout", "4"])
    _ok(rc, out)
    assert "rank 4 sent no heartbeat for 4 s: killed it" in out, out[-3000:]
    assert re.search(r"worker 3 \(rank 4\) lost at [0-9.]+ s; 3 workers continue", out), out[-3000:]
    assert "worker 3 (rank 4): 25 pushes landed" in out


# ---------------------------------------------------------------- without ULFM: today's clean end

@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["worker", "stop"])
def test_without_ulfm_the_job_ends_naming_the_rank(scenario):
    rc, seconds, out = _run(4, ["--scenario", scenario, "--heartbeat-timeout", "4"], with_ft=False)
    assert rc != 0, out[-3000:]
    assert seconds < 60, f"took {seconds:.0f} s"
    assert "ULFM off" in out and "RESULT" not in out
    if mpi_flavour() == "openmpi":
        assert re.search(r"process rank 3 with PID \d+ .*exited on\s+signal 9", out, re.S), out[-3000:]
    # Under MPICH the demo job's own naming races hydra's cleanup (seen both ways on the loaded 2-core machine);
    # the trainer's naming of the dead rank under MPICH is tested in tests/test_fault_tolerance.py.


# ---------------------------------------------------------------- the rebuild itself, under either MPI

@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize("lost", ["server", "worker"])
def test_rebuild_on_a_smaller_communicator(lost):
    """Drop one rank (Split stands in for Shrink, so it runs under MPICH too) and rebuild the store without it.

    Servers 0..S-1, workers after.  Three phases of one push per worker (each worker w adds w+1 everywhere); all
    workers fetch after phase A, only the last one after phase B.  A lost server's shard must come back from that
    freshest replica (state after B, W pushes lost); a surviving shard must hold all three phases; the version goes on.
    """
    import numpy
    from mpi4py import MPI

    from asyncsgd.runtime.mpi import polled_barrier
    from asyncsgd.store import ShardedParameters
    from asyncsgd.store.rebuild import abandon, rebuild

    comm = MPI.COMM_WORLD
    S = 2 if lost == "server" else 1
    n_params, W = 10 * S + 1, comm.size - S
    initial = numpy.arange(n_params, dtype=numpy.float32)
    store = ShardedParameters(comm, n_params, n_servers=S, initial=initial)
    me_worker = comm.rank - S if comm.rank >= S else None
    delta = numpy.full(n_params, (me_worker or 0) + 1, numpy.float32)
    replica = None
    for phase in "ABC":
        if me_worker is not None:
            store.push(delta, base_version=0)
        polled_barrier(comm)
        if me_worker is not None and (phase == "A" or (phase == "B" and me_worker == W - 1)):
            out = numpy.empty(n_params, numpy.float32)
            replica = (out, store.fetch(out))
        polled_barrier(comm)
    victim = 1 if lost == "server" else comm.size - 1
    new = comm.Split(MPI.UNDEFINED if comm.rank == victim else 0, comm.rank)
    if comm.rank == victim:
        abandon(store)
        return
    version = store.version() if comm.rank == 0 else None
    rb = rebuild(store, comm.rank, new, [victim], version=version, replica=replica, timeout=60)
    cont = rb.store  # its counter continues the old numbering
    per_phase = numpy.float32(sum(range(1, W + 1)))
    assert rb.version_base == 3 * W
    if lost == "server":
        assert rb.restored == (1,) and rb.lost_pushes == W
        assert rb.replica_rank == new.size - 1  # the last worker: its fetch after phase B is the freshest
    else:
        assert rb.restored == () and rb.lost_pushes == 0
    polled_barrier(new)
    if new.rank == 0:
        got = cont.read_all()
        (s0, e0) = rb.store.bounds[0]
        assert numpy.array_equal(got[s0:e0], initial[s0:e0] + 3 * per_phase)
        if lost == "server":
            (s1, e1) = rb.store.bounds[1]
            assert numpy.array_equal(got[s1:e1], initial[s1:e1] + 2 * per_phase)
        tau = cont.push(numpy.ones(n_params, numpy.float32), base_version=cont.version())
        assert tau == 0 and cont.version() == 3 * W + 1
    polled_barrier(new)
    cont.free()
    new.Free()
