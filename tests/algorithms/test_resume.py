"""Checkpoints in real runs: a job killed with SIGKILL resumes and finishes; bad checkpoints are clear errors."""
import json
import os
import signal
import subprocess

import pytest

from asyncsgd.testing.launch import mpi_env, run_mpi
from jobs import TRAIN, BackgroundJob
from paths import REPO, repo_env

COMMON = ["--data", "synthetic:600", "--batch-size", "16", "--progress", "lines", "--eval-every", "1"]


def _env():
    return mpi_env(repo_env())


@pytest.mark.slow
def test_downpour_killed_with_sigkill_resumes_and_finishes(tmp_path):
    ckpt, summary = tmp_path / "ck.h5", tmp_path / "s.json"
    args = TRAIN + COMMON + ["--epochs", "30", "--checkpoint", str(ckpt), "--checkpoint-every", "1",
                             "--summary-json", str(summary)]
    from asyncsgd.io.checkpoint import load_checkpoint

    def one_epoch_checkpointed():
        try:
            return sum(load_checkpoint(str(ckpt)).data_position["worker_samples"]) >= 540  # mid-run
        except (FileNotFoundError, ValueError):
            return False

    with BackgroundJob(3, args, timeout=200) as job:
        job.wait_until(one_epoch_checkpointed, timeout=150, what="a checkpoint one epoch in", poll=0.5)
        os.killpg(job.proc.pid, signal.SIGKILL)
        job.communicate(60)
    assert not summary.exists()
    out = run_mpi(3, args + ["--resume", "auto"], timeout=200, env=_env(), cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:]
    s = json.loads(summary.read_text())
    assert s["resumed_samples"] >= 540
    # the epoch budget continues: 30 epochs of the 600 training examples in all, not 30 more (a long enough run
    # to be killed mid-way on a quiet machine)
    # 540 = 600 less the default validation split's 60 rows (the same split after the resume: same seed)
    assert s["validation_rows"] == 60
    assert 30 * 540 <= s["samples"] < 30 * 540 + 2 * 16 * 2
    assert s["test_accuracy"] >= 0.85, s["test_accuracy"]


def test_serial_resume_continues_the_budget(tmp_path):
    ckpt, summary = tmp_path / "ck.h5", tmp_path / "s.json"
    base = TRAIN + COMMON + ["--mode", "serial", "--model", "logreg", "--checkpoint", str(ckpt),
                             "--summary-json", str(summary)]
    first = subprocess.run(base + ["--steps", "20"], capture_output=True, text=True, env=_env(), cwd=REPO,
                           timeout=120)
    assert first.returncode == 0, first.stderr
    from asyncsgd.io.checkpoint import load_checkpoint
    ck = load_checkpoint(str(ckpt))
    assert ck.data_position == {"samples": 320, "steps": 20} and "momentum" in ck.state
    second = subprocess.run(base + ["--steps", "30", "--resume", str(ckpt)], capture_output=True, text=True,
                            env=_env(), cwd=REPO, timeout=120)
    assert second.returncode == 0, second.stderr
    s = json.loads(summary.read_text())
    assert s["steps"] == 30 and s["samples"] == 30 * 16


def test_mismatched_and_corrupt_checkpoints_are_clear_errors(tmp_path):
    ckpt = tmp_path / "ck.h5"
    base = TRAIN + COMMON + ["--mode", "serial", "--checkpoint", str(ckpt)]
    first = subprocess.run(base + ["--model", "logreg", "--steps", "5"], capture_output=True, text=True,
                           env=_env(), cwd=REPO, timeout=120)
    assert first.returncode == 0, first.stderr
    other = subprocess.run(base + ["--model", "speech_cnn", "--steps", "5", "--resume", str(ckpt)],
                           capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    assert other.returncode == 2
    assert other.stderr.count("asyncsgd: error:") == 1 and "logreg" in other.stderr, other.stderr
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    cut = subprocess.run(base + ["--model", "logreg", "--steps", "5", "--resume", str(ckpt)],
                         capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    assert cut.returncode == 2 and cut.stderr.count("asyncsgd: error:") == 1, cut.stderr
    assert str(ckpt) in cut.stderr
