"""A stop request (``--stop-file``, or a SIGTERM to the ranks of a run that has one) ends a Downpour run cleanly:
exit 0, a checkpoint that loads, ``"stop_reason": "preempted"`` in the summary; ``--resume auto`` then finishes the
run's epoch budget.  Without a stop file a SIGTERM still means what the launcher meant (asyncsgd.runtime.watchdog).
"""
import json
import os
import signal
import subprocess

import pytest

from asyncsgd.io.checkpoint import load_checkpoint
from asyncsgd.options import CheckpointOptions, DownpourOptions, OptionError, SGDOptions, Stop
from asyncsgd.plan import check_inputs
from asyncsgd.runtime import stop_request
from asyncsgd.runtime.stop_request import PREEMPTED, StopRequest, activated, stop_file_problem
from asyncsgd.testing.launch import mpi_env, run_mpi
from jobs import TRAIN, BackgroundJob
from paths import REPO, repo_env

EPOCHS = 150  # FSDD logreg, 1 server + 2 workers: ~5 s alone on 2 cores, long enough to be stopped mid-run
BASE = ["--data", "fsdd", "--model", "logreg", "--epochs", str(EPOCHS), "--eval-every", "0.5",
        "--progress", "lines", "--checkpoint-every", "1"]


# ---- the request itself ------------------------------------------------------------------------------------------
def test_request_is_the_file_or_a_signal(tmp_path):
    path = tmp_path / "stop"
    request = StopRequest(str(path), poll_s=0.0)
    assert not request.requested()
    path.touch()
    assert request.requested() and "appeared" in request.describe()
    request.clear()
    assert not path.exists() and request.requested(), "a request is not withdrawn by clearing its file"
    request.clear()  # nothing to remove: no error
    signalled = StopRequest(str(tmp_path / "never"))
    signalled.signalled("SIGTERM")
    assert signalled.requested() and signalled.describe() == "SIGTERM received"


def test_active_request_is_scoped(tmp_path):
    assert stop_request.active() is None
    outer, inner = StopRequest(str(tmp_path / "a")), StopRequest(str(tmp_path / "b"))
    with activated(outer):
        with activated(inner):
            assert stop_request.active() is inner
        with activated(None):
            assert stop_request.active() is outer
    assert stop_request.active() is None


def test_bad_stop_files_are_named(tmp_path):
    assert stop_file_problem(str(tmp_path / "stop")) is None
    assert "is a folder" in stop_file_problem(str(tmp_path))
    assert "does not exist" in stop_file_problem(str(tmp_path / "missing" / "stop"))
    assert stop_file_problem("") == "must be a file path"
    with pytest.raises(OptionError, match="stop_file"):
        Stop(stop_file="")
    ck = CheckpointOptions(path=str(tmp_path / "ck.h5"))
    with pytest.raises(OptionError, match="downpour only"):
        check_inputs("sync", SGDOptions(), Stop(stop_file="stop"), ck)
    with pytest.raises(OptionError, match="needs a checkpoint"):
        check_inputs("downpour", DownpourOptions(), Stop(stop_file="stop"), None)
    check_inputs("downpour", DownpourOptions(), Stop(stop_file="stop"), ck)


@pytest.mark.parametrize("args, needle", [
    (["--stop-file", "/nonexistent/dir/stop", "--checkpoint", "ck.h5"], "--stop-file: folder /nonexistent/dir"),
    (["--stop-file", "stop"], "--stop-file needs a checkpoint"),
    (["--mode", "sync", "--stop-file", "stop", "--checkpoint", "ck.h5"], "--stop-file applies to --mode downpour"),
])
def test_bad_stop_file_is_one_error_from_rank0(args, needle, tmp_path):
    proc = run_mpi(2, TRAIN + ["--data", "synthetic:200", "--run-dir", "none"] + args, timeout=90,
                   env=mpi_env(repo_env()), cwd=str(tmp_path))
    assert proc.returncode == 2, proc.stdout[-3000:]
    errors = [line for line in proc.stdout.splitlines() if line.startswith("asyncsgd: error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stdout[-3000:]
    assert not os.path.exists(tmp_path / "ck.h5")


# ---- through mpiexec ---------------------------------------------------------------------------------------------
def _records(log):
    try:
        return [json.loads(line) for line in open(log) if line.strip()]
    except FileNotFoundError:
        return []


def _under_way(log, fraction=0.15):
    """True once rank 0 has logged an evaluation past ``fraction`` of the run (a checkpoint exists by then)."""
    return any((r.get("fraction_done") or 0) >= fraction for r in _records(log))


def _run(tmp_path, name, extra, stop, *, n=3):
    """Start a run in ``tmp_path/name``, call ``stop(job, paths)`` once it is under way; return (rc, out, paths)."""
    paths = {"run": tmp_path / name, "ck": tmp_path / "ck.h5", "stop": tmp_path / f"{name}.stop"}
    argv = TRAIN + BASE + ["--run-dir", str(paths["run"]), "--checkpoint", str(paths["ck"]), "--resume", "auto",
                           *extra]
    with BackgroundJob(n, argv, timeout=150) as job:
        job.wait_until(lambda: _under_way(paths["run"] / "metrics.jsonl"), timeout=100, what="training under way")
        stop(job, paths)
        rc, out = job.communicate(100)
    return rc, out, paths


def _summary(paths):
    return json.loads((paths["run"] / "summary.json").read_text())


def _assert_preempted(rc, out, paths):
    assert rc == 0, out[-3000:]
    assert "asyncsgd: stop requested" in out and "final test accuracy" in out, out[-3000:]
    s = _summary(paths)
    assert s["stop_reason"] == PREEMPTED, s["stop_reason"]
    ck = load_checkpoint(str(paths["ck"]))  # whole: it loads and passes its checksums
    done = sum(ck.data_position["worker_samples"])
    assert done == s["samples"], (done, s["samples"])  # the final checkpoint holds what the workers did
    n_train = s["samples"] / s["epochs"]
    assert 0 < done < EPOCHS * n_train, "the stop came after the epoch budget was spent: no cut to test"
    return s, done, n_train


@pytest.mark.slow
def test_stop_file_checkpoints_and_resume_finishes(tmp_path):
    def touch(job, paths):
        paths["stop"].touch()
    rc, out, paths = _run(tmp_path, "first", ["--stop-file", str(tmp_path / "first.stop")], touch)
    first, done, n_train = _assert_preempted(rc, out, paths)
    assert not paths["stop"].exists(), "an honoured request is cleared: it would stop the next run at once"
    # the next run, with the same stop file, continues from the checkpoint and spends what is left of the budget
    out2 = run_mpi(3, TRAIN + BASE + ["--run-dir", str(tmp_path / "second"), "--checkpoint", str(paths["ck"]),
                                      "--resume", "auto", "--stop-file", str(paths["stop"])],
                   timeout=150, env=mpi_env(repo_env()), cwd=REPO)
    assert out2.returncode == 0, out2.stdout[-3000:]
    second = json.loads((tmp_path / "second" / "summary.json").read_text())
    assert second["stop_reason"] == "epochs" and second["resumed_samples"] == done
    assert EPOCHS * n_train <= second["samples"] < EPOCHS * n_train + 2 * 2 * 64, second["samples"]
    assert second["test_accuracy"] >= 0.93, second["test_accuracy"]
    load_checkpoint(str(paths["ck"]))


@pytest.mark.slow
def test_sigterm_to_rank0_is_a_stop_request_with_a_stop_file(tmp_path):
    def term_rank0(job, paths):
        os.kill(job.rank_pid(0), signal.SIGTERM)
    rc, out, paths = _run(tmp_path, "run", ["--stop-file", str(tmp_path / "run.stop")], term_rank0)
    _assert_preempted(rc, out, paths)
    assert "SIGTERM taken as a stop request" in out and "stop requested (SIGTERM received)" in out, out[-3000:]


@pytest.mark.slow
def test_sigterm_without_stop_file_still_ends_the_job(tmp_path):
    """No --stop-file: a SIGTERM at rank 0 is the launcher ending the job, as before (exit 128 + 15, no summary)."""
    def term_rank0(job, paths):
        os.kill(job.rank_pid(0), signal.SIGTERM)
    rc, out, paths = _run(tmp_path, "run", [], term_rank0)
    assert rc != 0 and "terminated by the launcher (SIGTERM)" in out, out[-3000:]
    assert not (paths["run"] / "summary.json").exists()


@pytest.mark.slow
def test_sigterm_to_every_rank_is_a_stop_request_with_a_stop_file(tmp_path):
    """scancel and SLURM's time limit SIGTERM every task (SIGKILL follows KillWait seconds later): with a stop file
    every rank outlives it and the run stops as on the file."""
    def term_all(job, paths):
        for rank in range(3):
            os.kill(job.rank_pid(rank), signal.SIGTERM)
    rc, out, paths = _run(tmp_path, "run", ["--stop-file", str(tmp_path / "run.stop")], term_all)
    _assert_preempted(rc, out, paths)
