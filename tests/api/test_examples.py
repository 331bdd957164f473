"""The examples in examples/ run as their docstrings say: a user network trained with Downpour from Python and from
the command line (3 ranks, small synthetic data), and the saved model loaded again for predictions."""
import os
import re
import signal
import subprocess
import sys

from asyncsgd.testing.launch import mpi_env, mpi_flavour, mpiexec_path, run_mpi
from paths import REPO

EXAMPLES = os.path.join(REPO, "examples")
QUICK = ["--data", "synthetic:300", "--steps", "15"]


def _env():
    return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _accuracy(text: str) -> str:
    found = re.findall(r"test accuracy (\d\.\d{4})", text)
    assert found, text[-3000:]
    return found[-1]


def test_python_example_trains_saves_and_predicts(tmp_path):
    model = tmp_path / "small_cnn.h5"
    proc = run_mpi(3, [sys.executable, os.path.join(EXAMPLES, "train_downpour.py"), *QUICK, "--out", str(model)],
                   timeout=240, env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert model.exists()
    trained = _accuracy(proc.stdout)
    pred = subprocess.run([sys.executable, os.path.join(EXAMPLES, "predict.py"), str(model), "--data",
                           "synthetic:300", "--show", "3"], capture_output=True, text=True, timeout=120, env=_env(),
                          cwd=tmp_path)
    assert pred.returncode == 0, pred.stderr
    assert _accuracy(pred.stdout) == trained  # the loaded model is the trained one, to the last digit printed
    assert len(re.findall(r"example \d+: predicted \d, label \d", pred.stdout)) == 3

    from asyncsgd.model.files import read_model
    _, meta = read_model(str(model))
    assert meta["model"] == "my_cnn:small_cnn"  # a user factory, recorded by its import path


def test_command_line_example_trains_the_same_network(tmp_path):
    env = mpi_env(_env())
    env.update(MPIEXEC=mpiexec_path(), PYTHON=sys.executable, NP="3")
    if mpi_flavour() == "mpich":
        env["MPIEXEC_TIMEOUT"] = "200"
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(["sh", os.path.join(EXAMPLES, "train_cli.sh"), *QUICK, "--run-dir", str(run_dir),
                             "--progress", "none"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, out[-3000:]
    assert f"outputs in {run_dir}" in out
    from asyncsgd.model.files import read_model
    params, meta = read_model(str(run_dir / "model.h5"))
    assert meta["model"] == "my_cnn:small_cnn"
    assert params.size == 497_386
