"""Downpour keeps training when a worker or a server rank other than 0 dies (Open MPI, ``mpirun --with-ft ulfm``).

Every case runs ``python -m asyncsgd.train`` through ``asyncsgd.testing.launch`` on small, short jobs (FSDD features,
logistic regression, a few seconds) and checks what a user sees: the exit status, the "lost" lines, the summary's
``lost_workers`` / ``lost_servers`` and the JSONL events.  Each job is bounded by the launcher's timeout and one from
here, so none hangs.  The store-level no-lost-update property among the survivors (exact integers) is checked by
tests/ulfm/test_primitives.py on the same rebuild code.  Under MPICH (no run-through) a killed rank still ends the job within
30 s, non-zero, naming the rank.
"""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from asyncsgd.testing.launch import mpi_flavour, mpiexec_command
from jobs import TRAIN, BackgroundJob, jsonl_lines, read_run, require_ulfm, train
from paths import REPO, repo_env

JOB_TIMEOUT = 150  # s per job; each ends in 10-30 s on the 2-core development machine
FSDD = ["--data", "fsdd", "--model", "logreg", "--eval-every", "1", "--progress", "lines"]
# Undisturbed, these jobs (4 or 5 ranks, 5 to 12 s) reach 0.963-0.977 test accuracy (2 runs each of the 12 s, 9 s,
# 8 s with 2 servers and 5 s jobs on the 2-core development machine), and 0.963-0.977 with a worker killed (2 runs
# each of the cases below): a run through a dead rank must still learn.
ACCURACY_FLOOR = 0.92


def _train(tmp_path, n, args, *, with_ft=True, env=None):
    """Run the trainer on ``n`` ranks; return (exit status, output, summary dict or None, JSONL records)."""
    job = train(n, FSDD + list(args), tmp_path / "run", timeout=JOB_TIMEOUT, with_ft=with_ft, env=env)
    return job.returncode, job.output, job.summary, job.records


def _lost(summary):
    return sorted(e["rank"] for e in summary["lost_workers"])


def _check_run_through(rc, out, summary, records, lost_ranks, n_servers=1):
    assert rc == 0, out[-4000:]
    assert summary is not None and summary["fault_tolerance"] is True, out[-4000:]
    assert _lost(summary) == sorted(lost_ranks), summary["lost_workers"]
    for r in lost_ranks:
        assert re.search(rf"worker {r - n_servers} \(rank {r}\) lost at [0-9.]+ s; \d+ workers continue", out), \
            out[-4000:]
        assert any(rec.get("event") == "lost_worker" and rec["rank"] == r for rec in records)
    assert summary["workers_at_end"] == summary["workers"] - len(lost_ranks)
    assert summary["test_accuracy"] >= ACCURACY_FLOOR, summary["test_accuracy"]
    assert f"final test accuracy: {summary['test_accuracy']:.4f}" in out, out[-4000:]


# ---------------------------------------------------------------- without a launch

def test_fault_tolerance_on_without_ulfm_is_a_usage_error():
    env = {k: v for k, v in os.environ.items() if k != "OMPI_MCA_mpi_ft_enable"}
    proc = subprocess.run(TRAIN + ["--fault-tolerance", "on", "--run-dir", "none"],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=repo_env(env))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("asyncsgd: error:")]
    assert len(lines) == 1 and "--with-ft ulfm" in lines[0], proc.stderr


@pytest.mark.parametrize("args, words", [
    (["--kill-ranks", "3"], "RANK:SECONDS"),
    (["--kill-ranks", "1:-2"], ">= 0"),
    (["--mode", "serial", "--kill-ranks", "1:2"], "--mode serial"),
])
def test_bad_kill_ranks_is_a_usage_error(args, words):
    proc = subprocess.run(TRAIN + ["--run-dir", "none"] + args, capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=repo_env())
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "asyncsgd: error:" in proc.stderr and words in proc.stderr, proc.stderr


def test_options_field_validated():
    from asyncsgd.options import DownpourOptions, OptionError
    assert DownpourOptions(kill_ranks={3: 2.5}).fault_tolerance == "auto"
    with pytest.raises(OptionError, match="fault_tolerance"):
        DownpourOptions(fault_tolerance="yes")
    with pytest.raises(OptionError, match="kill_ranks"):
        DownpourOptions(kill_ranks={-1: 2})


def test_auto_follows_the_launcher_marker():
    from asyncsgd.ulfm import policy as ft
    assert ft.resolve("off", environ={ft.FT_ENV: "1"}) is False
    assert ft.resolve("auto", environ={}) is False
    expected = "open mpi" in ft.MPI.Get_library_version().lower()
    assert ft.resolve("auto", environ={ft.FT_ENV: "1"}) is expected
    assert ft.resolve("auto", "adagrad", environ={ft.FT_ENV: "1"}) is False  # a lost shard's sums have no replica
    with pytest.raises(ValueError, match="with-ft ulfm"):
        ft.resolve("on", environ={})


def test_launch_adds_with_ft():
    cmd = mpiexec_command(6, ["python"], timeout=60, with_ft=True)
    if mpi_flavour() == "openmpi":
        assert cmd[cmd.index("--with-ft") + 1] == "ulfm"
    else:
        assert "-disable-auto-cleanup" in cmd


# ---------------------------------------------------------------- Open MPI: runs through

# The served store (ASYNCSGD_STORE=messages: Open MPI between hosts) is rebuilt too: its server threads serve on
# through a dead client, and the rebuild makes a served store again.
STORES = pytest.mark.parametrize("store", ["rma", "messages"])


@pytest.mark.slow
@STORES
def test_worker_killed_mid_run(tmp_path, store):
    require_ulfm()
    rc, out, summary, records = _train(tmp_path, 4, ["--time-limit", "12", "--kill-ranks", "3:3"],
                                       env={"ASYNCSGD_STORE": store})
    _check_run_through(rc, out, summary, records, [3])
    lost = summary["lost_workers"][0]
    assert lost["worker"] == 2 and lost["killed_at"] == 3.0 and lost["time"] >= 3.0
    assert lost["workers"] == 2
    assert lost["recovery_s"] > 0  # a push landed on the rebuilt store: training went on


@pytest.mark.slow
def test_warm_start_replica_killed_and_the_others_go_on(tmp_path):
    """Worker 0 (rank 1) trains alone in a warm start longer than the run and dies: the recovery releases the
    others, which otherwise wait for its flag until the job is killed."""
    require_ulfm()
    rc, out, summary, records = _train(tmp_path, 4, ["--time-limit", "8", "--warm-start-steps", "100000",
                                                     "--kill-ranks", "1:3"])
    _check_run_through(rc, out, summary, records, [1])
    assert summary["warm_start_steps"] == 100000
    # rows: the two survivors, then the lost worker 0 (it fetched the initial model, version 0); both survivors
    # trained, from a model worker 0 had already pushed to
    versions = summary["first_fetch_versions"]
    assert len(versions) == 3 and versions[2] == 0 and min(versions[:2]) >= 1, versions


@pytest.mark.slow
def test_worker_killed_before_its_first_push(tmp_path):
    require_ulfm()
    rc, out, summary, records = _train(tmp_path, 4, ["--time-limit", "6", "--kill-ranks", "3:0"])
    _check_run_through(rc, out, summary, records, [3])


@pytest.mark.slow
def test_worker_killed_at_the_end(tmp_path):
    require_ulfm()
    rc, out, summary, records = _train(tmp_path, 4, ["--time-limit", "5", "--kill-ranks", "3:4.9"])
    _check_run_through(rc, out, summary, records, [3])


@pytest.mark.slow
def test_two_workers_killed(tmp_path):
    require_ulfm()
    ckpt = tmp_path / "ckpt.h5"  # rank 0 checkpoints every 0.5 s, so the deaths fall around checkpoints
    rc, out, summary, records = _train(tmp_path, 5, ["--time-limit", "9", "--kill-ranks", "3:2,4:5",
                                                     "--checkpoint", str(ckpt), "--checkpoint-every", "0.5"])
    _check_run_through(rc, out, summary, records, [3, 4])
    # two recoveries (3 then 2 workers), or one when both deaths were noticed together (a loaded machine)
    assert [e["workers"] for e in summary["lost_workers"]] in ([3, 2], [2, 2])
    assert ckpt.exists() and summary["checkpoints"] >= 4


@pytest.mark.slow
@STORES
def test_server_rank_1_killed(tmp_path, store):
    require_ulfm()
    rc, out, summary, records = _train(tmp_path, 5, ["--servers", "2", "--time-limit", "8", "--kill-ranks", "1:3"],
                                       env={"ASYNCSGD_STORE": store})
    assert rc == 0, out[-4000:]
    (lost,) = summary["lost_servers"]
    assert lost["rank"] == 1 and lost["now_hosted_by"] == 2, lost
    # Shard 1 comes from the freshest fetched copy, a worker's (ranks 2-4).  Each worker fetches before every step
    # and pushes after it (n_fetch = n_push = 1), so after the freshest fetch each of the 3 workers pushed at most
    # once: at most 3 pushes are lost (1 in each of 2 measured runs).
    assert lost["replica_rank"] in (2, 3, 4) and 0 <= lost["pushes_lost"] <= 3, lost
    assert re.search(rf"server 1 \(rank 1\) lost at [0-9.]+ s; shard 1 restored from rank {lost['replica_rank']}'s "
                     rf"replica \({lost['pushes_lost']} pushes lost\)", out), out[-4000:]
    assert summary["lost_workers"] == [] and summary["workers_at_end"] == 2  # rank 2 now hosts shard 1
    assert [rec["rank"] for rec in records if rec.get("event") == "lost_server"] == [1]
    assert summary["test_accuracy"] >= ACCURACY_FLOOR, summary["test_accuracy"]


def _hit_from_outside(tmp_path, sig, extra_env=None):
    """Start a 4-rank job, send ``sig`` to rank 3 once training is under way (rank 0 has logged 2 evaluations);
    return (rc, out, summary, JSONL records)."""
    run_dir = tmp_path / "run"
    argv = TRAIN + FSDD + ["--time-limit", "14", "--run-dir", str(run_dir)]
    with BackgroundJob(4, argv, timeout=JOB_TIMEOUT - 10, with_ft=True, env=extra_env) as job:
        victim = job.wait_until(lambda: jsonl_lines(run_dir / "metrics.jsonl") >= 2 and job.rank_pid(3),
                                timeout=90, what="rank 3 trains")
        os.kill(victim, sig)
        rc, out = job.communicate(JOB_TIMEOUT)
    summary, records = read_run(run_dir)
    return rc, out, summary, records


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds rank processes through /proc")
def test_worker_killed_from_outside(tmp_path):
    require_ulfm()
    rc, out, summary, records = _hit_from_outside(tmp_path, signal.SIGKILL)
    _check_run_through(rc, out, summary, records, [3])
    assert summary["lost_workers"][0]["killed_at"] is None  # no --kill-ranks: the death came from outside


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds rank processes through /proc")
def test_stopped_worker_is_killed_and_the_others_continue(tmp_path):
    """SIGSTOP is no failure to MPI: rank 0's heartbeat watch (or the watchdog) kills the silent rank, then ULFM
    reports it like any death."""
    require_ulfm()
    rc, out, summary, records = _hit_from_outside(tmp_path, signal.SIGSTOP, {"ASYNCSGD_HEARTBEAT_TIMEOUT": "6"})
    assert re.search(r"rank 3 .*(sent no heartbeat|stopped responding).*killed it", out), out[-4000:]
    _check_run_through(rc, out, summary, records, [3])


@pytest.mark.slow
def test_rank_0_killed_ends_the_job_and_says_how_to_resume(tmp_path):
    require_ulfm()
    ckpt = tmp_path / "ckpt.h5"
    start = time.monotonic()
    rc, out, summary, _ = _train(tmp_path, 4, ["--time-limit", "30", "--checkpoint", str(ckpt),
                                               "--checkpoint-every", "1", "--kill-ranks", "0:4"])
    assert rc != 0 and summary is None, out[-4000:]
    assert time.monotonic() - start < 90
    assert "rank 0 lost at" in out and f"--resume {ckpt}" in out, out[-4000:]
    if ckpt.exists():  # the last complete checkpoint stays (on a loaded machine none may be due by 4 s)
        assert "is intact" in out, out[-4000:]
    else:
        assert "no checkpoint had been written yet" in out, out[-4000:]


def _resume_from(tmp_path, ckpt, n=4):
    """Continue a run from ``ckpt`` for a few seconds; return its summary (the checkpoint is whole and usable)."""
    again = tmp_path / "resumed"
    again.mkdir()
    rc, out, summary, _ = _train(again, n, ["--time-limit", "3", "--resume", str(ckpt)])
    assert rc == 0 and summary is not None, out[-4000:]
    assert summary["resumed_samples"] > 0, summary
    return summary


@pytest.mark.slow
def test_worker_killed_during_a_checkpoint_write(tmp_path):
    """Rank 0 SIGKILLs worker rank 3 as it starts writing its 3rd checkpoint and stays 1 s inside the write: the
    run goes on, the file is whole, later checkpoints are written, and --resume from it works."""
    from asyncsgd.io.checkpoint import load_checkpoint
    require_ulfm()
    ckpt = tmp_path / "ckpt.h5"
    rc, out, summary, records = _train(tmp_path, 4, ["--time-limit", "8", "--checkpoint", str(ckpt),
                                                     "--checkpoint-every", "0.5"],
                                       env={"ASYNCSGD_FAULT": "checkpoint@0:3=kill:3"})
    assert "fires: point checkpoint, rank 0, pass 3 (SIGKILL rank 3)" in out, out[-4000:]
    _check_run_through(rc, out, summary, records, [3])
    assert summary["checkpoints"] >= 4  # the one being written when the worker died, and later ones
    load_checkpoint(ckpt)  # raises on a truncated or corrupt file
    _resume_from(tmp_path, ckpt)


@pytest.mark.slow
def test_rank_0_killed_during_a_checkpoint_write_leaves_the_last_one(tmp_path):
    """Rank 0 SIGKILLs itself with its 3rd checkpoint half-written (the parameters are in the temporary file):
    the job ends non-zero saying how to --resume, and the 2nd checkpoint is at the path, whole and resumable."""
    from asyncsgd.io.checkpoint import load_checkpoint
    require_ulfm()
    ckpt = tmp_path / "ckpt.h5"
    start = time.monotonic()
    rc, out, summary, _ = _train(tmp_path, 4, ["--time-limit", "30", "--checkpoint", str(ckpt),
                                               "--checkpoint-every", "0.5"],
                                 env={"ASYNCSGD_FAULT": "checkpoint_write@0:3=kill"})
    assert "fires: point checkpoint_write, rank 0, pass 3 (SIGKILL itself)" in out, out[-4000:]
    assert rc != 0 and summary is None, out[-4000:]
    assert time.monotonic() - start < 90
    assert "rank 0 lost at" in out and f"--resume {ckpt}" in out, out[-4000:]
    load_checkpoint(ckpt)
    _resume_from(tmp_path, ckpt)


@pytest.mark.slow
@pytest.mark.parametrize("moment", [1, 2], ids=["before-the-rebuild", "before-the-new-board"])
def test_worker_dies_during_the_recovery(tmp_path, moment):
    """Rank 3 dies at 3 s; rank 4 SIGKILLs itself inside the survivors' recovery (pass 1: after the shrink, as the
    others start the store's rebuild; pass 2: after the rebuild, as they allocate the new job board).  The
    survivors agree the attempt failed, shrink again and finish on 2 workers."""
    require_ulfm()
    start = time.monotonic()
    rc, out, summary, records = _train(tmp_path, 5, ["--time-limit", "8", "--kill-ranks", "3:3"],
                                       env={"ASYNCSGD_FAULT": f"recover@4:{moment}=kill"})
    assert f"fires: point recover, rank 4, pass {moment} (SIGKILL itself)" in out, out[-4000:]
    assert "a rank died during the recovery (attempt 1); shrinking again" in out, out[-4000:]
    _check_run_through(rc, out, summary, records, [3, 4])
    assert summary["workers_at_end"] == 2 and all(e["workers"] == 2 for e in summary["lost_workers"])
    assert time.monotonic() - start < JOB_TIMEOUT


@pytest.mark.slow
def test_worker_stopped_during_the_recovery_is_killed(tmp_path):
    """Rank 4 SIGSTOPs itself inside the recovery: alive to MPI, so the others would wait for it; the recovery timer
    (after ASYNCSGD_HEARTBEAT_TIMEOUT) kills it and the survivors shrink again."""
    require_ulfm()
    rc, out, summary, records = _train(tmp_path, 5, ["--time-limit", "10", "--kill-ranks", "3:3"],
                                       env={"ASYNCSGD_FAULT": "recover@4:1=stop", "ASYNCSGD_HEARTBEAT_TIMEOUT": "6"})
    assert "fires: point recover, rank 4, pass 1 (SIGSTOP itself)" in out, out[-4000:]
    assert "rank 4 is stopped during a recovery: killed it" in out, out[-4000:]
    _check_run_through(rc, out, summary, records, [3, 4])


@pytest.mark.slow
def test_promoted_worker_dies_during_the_recovery_of_a_server(tmp_path):
    """Server rank 1 dies; rank 2, the worker about to host its shard, dies after the first attempt rebuilt the
    store on it.  The attempt is dropped, the shard is restored again from the freshest replica and rank 3 hosts it."""
    require_ulfm()
    rc, out, summary, records = _train(tmp_path, 5, ["--servers", "2", "--time-limit", "8", "--kill-ranks", "1:3"],
                                       env={"ASYNCSGD_FAULT": "recover@2:2=kill"})
    assert "fires: point recover, rank 2, pass 2 (SIGKILL itself)" in out, out[-4000:]
    assert rc == 0, out[-4000:]
    (lost,) = summary["lost_servers"]
    assert lost["rank"] == 1 and lost["now_hosted_by"] == 3, lost
    assert _lost(summary) == [2] and summary["workers_at_end"] == 1, summary["lost_workers"]
    assert re.search(r"shard 1 restored from rank \d+'s replica \(\d+ pushes lost\), now hosted by rank 3", out), \
        out[-4000:]


# ---------------------------------------------------------------- MPICH (and fault tolerance off): the job ends

@pytest.mark.slow
def test_without_run_through_a_killed_rank_ends_the_job_naming_it(tmp_path):
    """MPICH (or Open MPI with --fault-tolerance off): today's behaviour, the job ends within 30 s naming the rank."""
    start = time.monotonic()
    rc, out, summary, _ = _train(tmp_path, 4, ["--time-limit", "60", "--kill-ranks", "3:3"], with_ft=False)
    assert rc != 0 and summary is None, out[-4000:]
    assert time.monotonic() - start < 3 + 30 + 20  # kill at 3 s, end within 30 s, plus start-up
    if mpi_flavour() == "openmpi":  # rank 0's watchdog names the dead rank when prterun signals the survivors,
        # unless prterun's kill of the survivors wins the race (seen once under load 20): prterun names it then
        assert re.search(r"rank 3 \(pid \d+[^\n]*died|process rank 3 with PID \d+", out), out[-4000:]
    else:  # MPICH's mpiexec SIGKILLs every rank itself; the rank is named by its own --kill-ranks line
        assert re.search(r"rank 3 \(pid \d+\) kills itself", out), out[-4000:]
        assert "BAD TERMINATION" in out or "Killed" in out, out[-4000:]


@pytest.mark.slow
def test_fault_tolerance_off_under_ulfm_still_ends_the_job_naming_the_rank(tmp_path):
    """`mpirun --with-ft ulfm` with --fault-tolerance off: ULFM keeps the survivors alive, so the watchdog, which
    now hears of the death from MPI, names the rank and ends the job (today's behaviour)."""
    require_ulfm()
    start = time.monotonic()
    rc, out, summary, _ = _train(tmp_path, 4, ["--time-limit", "60", "--kill-ranks", "3:3",
                                               "--fault-tolerance", "off"])
    assert rc != 0 and summary is None, out[-4000:]
    assert time.monotonic() - start < 3 + 30 + 20
    assert re.search(r"rank 3 \(pid \d+[^\n]*died", out), out[-4000:]


@pytest.mark.slow
def test_every_worker_lost_ends_the_job_saying_how_to_resume(tmp_path):
    """Every worker dies at once: no rank is left to train, so the job ends (exit 3, as after rank 0's loss, within
    the job's bound) with one message naming the lost ranks and the --resume to continue from the last checkpoint.
    (Ended by an exception instead, the job exited 0: mpirun --with-ft ulfm after MPI_Abort with ranks dead.)"""
    require_ulfm()
    ckpt = tmp_path / "ckpt.h5"
    start = time.monotonic()
    rc, out, summary, _ = _train(tmp_path, 4, ["--time-limit", "30", "--kill-ranks", "1:3,2:3,3:3",
                                               "--checkpoint", str(ckpt), "--checkpoint-every", "0.5"])
    assert rc != 0 and summary is None, out[-4000:]
    assert re.search(r"asyncsgd: error: ranks 1, 2, 3 lost: only 1 ranks survive: 1 servers need at least one "
                     r"worker; the job ends; continue with the same command plus --resume "
                     + re.escape(str(ckpt)), out), out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    assert time.monotonic() - start < 90
