"""A Downpour job warned of its time limit checkpoints, exits cleanly and requeues itself; the requeued job
finishes the run, as accurate as one that was never cut; no checkpoint is ever torn.

On the 3-node SLURM cluster of tests/support/slurm_multinode.py (root, namespaces, SLURM packages; skipped with the
reason otherwise, a failure with ASYNCSGD_REQUIRE_SLURM=1), ``jobs/multinode.sh`` runs FSDD logreg on one rank per
node twice at once: an uninterrupted job, and one that receives SLURM's time-limit warning mid-run.

The warning is what ``#SBATCH --signal=B:USR1@60`` makes slurmctld send to the batch shell before the limit; the
test sends it at a chosen moment with ``scancel --batch --signal=USR1`` (the same delivery: the batch shell only),
because slurmctld checks time limits only every 30 s, so a real limit would land anywhere in a 30 s window.  SLURM
holds a requeued job for about 2 minutes before it may start again; the test releases it as soon as the first run's
steps are gone from the nodes (``scontrol update JobId=N StartTime=now``).
"""
import json
import os
import signal
import threading
import time

import pytest

from asyncsgd.io.checkpoint import load_checkpoint
from paths import REPO

SCRIPT = os.path.join(REPO, "jobs", "multinode.sh")
N_HOSTS = 3
EPOCHS = 150  # FSDD logreg, 1 server + 2 workers on 3 hosts: ~40 s beside the other job on 2 cores (MPICH)
ARGS = ["--data", "fsdd", "--model", "logreg", "--epochs", str(EPOCHS), "--eval-every", "0.5", "--progress", "lines",
        "--checkpoint-every", "1"]
SBATCH = [f"--chdir={REPO}", f"--nodes={N_HOSTS}", "--ntasks-per-node=1", "--requeue", "--open-mode=append"]
WAIT_S = 240  # each job after the warning, the requeued one included (~40 s alone under MPICH; Open MPI's served
#              store across the hosts trains several times slower)


def _cluster(root):
    """The cluster the test runs on, or pytest.skip with the reason (the one place that names the fixture)."""
    from slurm_multinode import MultiNodeSlurm, multinode_skip_reason
    reason = multinode_skip_reason(install=True)
    if reason is not None:
        pytest.skip(reason)
    return MultiNodeSlurm(root, n_hosts=N_HOSTS)


def _records(run_dir):
    try:
        return [json.loads(line) for line in open(run_dir / "metrics.jsonl") if line.strip()]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _summary(run_dir):
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class TornWatch:
    """Load each checkpoint over and over while the jobs run: every version a reader can find must be whole."""

    def __init__(self, paths):
        self.paths, self.loads, self.torn = paths, 0, []
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._halt.wait(0.1):
            for path in self.paths:
                try:
                    load_checkpoint(str(path))
                    self.loads += 1
                except ValueError as exc:
                    if "does not exist" not in str(exc):
                        self.torn.append(str(exc))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._halt.set()
        self._thread.join(10)


def _step_daemons(job) -> list:
    """The pids of the slurmstepd processes still serving ``job`` on any of the hosts (they share /proc)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f"slurmstepd: [{job}.".encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


def _until(condition, timeout, what, cluster, *jobs):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"not {what} within {timeout:g} s\n" + "\n".join(cluster.output(j)[-3000:] for j in jobs)
                + cluster.logs())


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_time_limit_requeue_multinode_cluster(tmp_path):
    base_dir, cut_dir = tmp_path / "uninterrupted", tmp_path / "cut"
    # a SIGTERM (a CI step's timeout) still stops the cluster: an exception while it runs
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        with _cluster(tmp_path / "cluster") as cluster, \
                TornWatch([base_dir / "checkpoint.h5", cut_dir / "checkpoint.h5"]) as watch:
            def submit(run_dir):
                env = cluster.job_env(extra={"ASYNCSGD_RUN_DIR": str(run_dir), "ASYNCSGD_SERVERS": "1"})
                return cluster.submit(SCRIPT, ARGS, env=env, sbatch_options=SBATCH)
            t0 = time.monotonic()
            base, cut = submit(base_dir), submit(cut_dir)
            # the warning, once the cut job is a fifth of the way through its epochs
            _until(lambda: any((r.get("fraction_done") or 0) >= 0.2 for r in _records(cut_dir)), 150,
                   "the job to be under way", cluster, cut)
            warned = cluster.run_client(["scancel", "--batch", "--signal=USR1", str(cut)])
            assert warned.returncode == 0, warned.stderr
            t_warned = time.monotonic() - t0
            # the first job's own outputs, before its successor replaces them: a clean stop into a whole checkpoint
            first = _until(lambda: (_summary(cut_dir) or {}).get("stop_reason") == "preempted" and _summary(cut_dir),
                           60, "the warned job to stop", cluster, cut)
            ck = load_checkpoint(str(cut_dir / "checkpoint.h5"))
            n_train = first["samples"] / first["epochs"]
            assert first["samples"] < EPOCHS * n_train, "the job ended before the warning: nothing was cut"
            assert sum(ck.data_position["worker_samples"]) >= first["samples"]  # (or a later one of the next job)
            # SLURM holds a requeued job for ~2 minutes (its BeginTime; the test's only change to what a user
            # sees): release it at once, as `scontrol update JobId=N StartTime=now` lets a user do
            seen = []  # the job's (state, reason) from the warning on, for a failure's message

            def requeued():
                info = cluster.job_info(cut)
                seen.append((info.get("JobState"), info.get("Reason"), info.get("Restarts")))
                if info.get("Restarts") != "1" or info["JobState"] not in ("PENDING", "RUNNING"):
                    return None  # not requeued yet, or REQUEUED / COMPLETING on the way back to the queue
                if info["JobState"] == "PENDING" and info.get("Reason") != "BeginTime":
                    return None  # the hold shows a moment later
                return info
            held = _until(requeued, 60, "the job to be requeued", cluster, cut)
            t_requeued = time.monotonic() - t0
            if held["JobState"] == "PENDING":
                # not before the first job's steps are gone from every node: a job started while its previous run
                # is still cleaned up fails at once (what SLURM's hold is for)
                _until(lambda: not _step_daemons(cut), 60, "the first job's steps to end", cluster, cut)
                released = cluster.run_client(["scontrol", "update", f"JobId={cut}", "StartTime=now"])
                assert released.returncode == 0, released.stderr
            states = {name: cluster.wait(job, WAIT_S) for name, job in (("cut", cut), ("uninterrupted", base))}
            out = cluster.output(cut)
            t_done = time.monotonic() - t0
            assert states == {"cut": "COMPLETED", "uninterrupted": "COMPLETED"}, \
                f"{states} {cluster.job_info(cut)} {sorted(set(seen))}\n{out[-4000:]}\n{cluster.output(base)[-2000:]}" \
                f"\n{cluster.logs()}"
            info = cluster.job_info(cut)
        assert watch.loads > 10 and not watch.torn, (watch.loads, watch.torn[:3])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert info.get("Restarts") == "1", info  # requeued once, by the job script
    assert "requeueing job" in out and out.count("final test accuracy") == 2, out[-4000:]
    second, whole = _summary(cut_dir), _summary(base_dir)
    assert second["stop_reason"] == "epochs" and second["resumed_samples"] == first["samples"], second
    # one epoch budget across both jobs: the pair trained on as many samples as the uninterrupted job
    assert abs(second["samples"] - whole["samples"]) <= 2 * 2 * 64, (second["samples"], whole["samples"])
    load_checkpoint(str(cut_dir / "checkpoint.h5"))
    print(f"test accuracy: uninterrupted {whole['test_accuracy']:.4f}, cut at {first['samples']} samples and "
          f"requeued {second['test_accuracy']:.4f}; warned at {t_warned:.0f} s, requeued at {t_requeued:.0f} s, "
          f"both jobs done at {t_done:.0f} s")
    assert whole["test_accuracy"] >= 0.93, whole
    # within 1 point (3 of the 300 test examples)
    assert abs(second["test_accuracy"] - whole["test_accuracy"]) <= 0.01 + 1e-9, (second["test_accuracy"],
                                                                                  whole["test_accuracy"])
