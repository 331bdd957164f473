"""The trainer's command line: bad input is one error line from rank 0 and exit 2; outputs hold what they promise."""
import json
import os
import subprocess
import sys

import pytest

from asyncsgd.launch import run_mpi

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = [sys.executable, "-m", "asyncsgd.train"]


def _env():
    return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _serial(args, timeout=120):
    return subprocess.run(TRAIN + args, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=REPO)


def _one_error(output: str, needle: str):
    lines = [ln for ln in output.splitlines() if ln.startswith("asyncsgd: error:")]
    assert len(lines) == 1, f"expected exactly one error line, got {len(lines)}:\n{output}"
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("args, needle", [
    (["--mode", "serial", "--sparsity", "0"], "--sparsity must be in (0, 1]"),
    (["--mode", "serial", "--staleness-decay", "exp:2"], "--staleness-decay"),
    (["--mode", "serial", "--data", "/nonexistent/x.h5"], "/nonexistent/x.h5"),
    (["--mode", "serial", "--model", "mnist_cnn"], "mnist_cnn needs 1x28x28"),
    (["--mode", "serial", "--device", "gpu"], "--device gpu"),
    (["--mode", "serial", "--history", "0"], "--history must be >= 1"),
    (["--mode", "serial", "--summary-json", "/nonexistent/dir/s.json"], "does not exist"),
    (["--bogus-option"], "unrecognized arguments"),
    (["--mode", "sandblaster", "--checkpoint", "ck.h5"], "not sandblaster"),
    (["--mode", "serial", "--augment", "shift:x"], "--augment"),
    (["--mode", "serial", "--resume", "/nonexistent/ck.h5"], "does not exist"),
    (["--mode", "downpour"], "--mode serial"),  # one process: downpour needs mpiexec
])
def test_bad_input_is_one_clear_error(args, needle, tmp_path):
    if "--device" in args:
        from asyncsgd.backend import gpu_count
        if gpu_count() > 0:
            pytest.skip("a GPU is present")
    proc = _serial(args)
    assert proc.returncode == 2, proc.stderr
    _one_error(proc.stderr, needle)


def test_config_file_and_print_config(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('mode = "serial"\nn-push = 4\nsparsity = 0.1\n')
    proc = _serial(["--config", str(cfg), "--n-push", "8", "--print-config"])
    assert proc.returncode == 0, proc.stderr
    assert 'mode = "serial"' in proc.stdout and "n_push = 8" in proc.stdout and "sparsity = 0.1" in proc.stdout
    cfg.write_text("n_pushes = 4\n")
    proc = _serial(["--config", str(cfg)])
    assert proc.returncode == 2
    _one_error(proc.stderr, "unknown key 'n_pushes'")


def test_serial_summary_and_model_file(tmp_path):
    summary, model, log = tmp_path / "s.json", tmp_path / "m.h5", tmp_path / "log.jsonl"
    proc = _serial(["--mode", "serial", "--data", "synthetic:400", "--steps", "30", "--summary-json", str(summary),
                    "--model-out", str(model), "--log", str(log), "--progress", "lines"], timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "final test accuracy:" in proc.stdout
    s = json.loads(summary.read_text())
    for key in ("mode", "model", "data", "test_accuracy", "final_loss", "samples_per_s", "wall_s", "epochs"):
        assert key in s, key
    assert s["mode"] == "serial" and s["steps"] == 30 and s["test_accuracy"] > 0.5
    from asyncsgd.ops.modelio import read_model
    params, meta = read_model(str(model))
    assert params.size == s["n_params"] and meta["model"] == "speech_cnn"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records and records[-1]["samples"] == 30 * 32


@pytest.mark.parametrize("n, args, needle", [
    (3, ["--servers", "3"], "--servers 3 leaves no worker"),
    (2, ["--mode", "serial"], "--mode serial runs in one process"),
    (2, ["--data", "/nonexistent.h5"], "/nonexistent.h5"),
    (3, ["--slow-ranks", "7:2"], "--slow-ranks"),
])
def test_bad_layouts_fail_from_rank0(n, args, needle):
    proc = run_mpi(n, TRAIN + args, timeout=90, env=_env(), cwd=REPO)
    assert proc.returncode != 0
    _one_error(proc.stdout, needle)
