"""The trainer's command line: bad input is one error line from rank 0 and exit 2; outputs hold what they promise."""
import json
import os
import subprocess

import pytest

from asyncsgd.testing.launch import run_mpi
from jobs import TRAIN
from paths import REPO


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
        from asyncsgd.backends import gpu_count
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
    from asyncsgd.model.files import read_model
    params, meta = read_model(str(model))
    assert params.size == s["n_params"] and meta["model"] == "speech_cnn"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records and records[-1]["samples"] == 30 * 32


@pytest.mark.parametrize("n, args, needle", [
    (3, ["--servers", "3"], "--servers 3 leaves no worker"),
    (2, ["--mode", "serial"], "--mode serial runs in one process"),
    (2, ["--data", "/nonexistent.h5"], "/nonexistent.h5"),
    (3, ["--slow-ranks", "7:2"], "--slow-ranks"),
    (3, ["--warm-start-steps", "-1"], "--warm-start-steps: must be >= 0, got -1"),
    (3, ["--warm-start-steps", "ten"], "--warm-start-steps: must be an integer >= 0, got 'ten'"),
])
def test_bad_layouts_fail_from_rank0(n, args, needle):
    proc = run_mpi(n, TRAIN + args, timeout=90, env=_env(), cwd=REPO)
    assert proc.returncode == 2, proc.stdout[-3000:]
    _one_error(proc.stdout, needle)
    assert "Traceback" not in proc.stdout


# Options of every distributed mode that only the data or the job size can refute: each must end the job with one
# error line from rank 0 and exit status 2 before any rank starts work (no traceback, no MPI_Abort).
# The store transport comes from the environment (ASYNCSGD_STORE, docs/NETWORK.md): a typo, or a combination the
# served store cannot do, is a usage error like a bad option.
@pytest.mark.parametrize("store, args, needle", [
    ("bogus", [], "ASYNCSGD_STORE='bogus' is not a store transport"),
    ("messages", ["--optimizer", "adagrad"], "--optimizer adagrad needs the RMA store"),
])
def test_store_transport_is_checked_before_work(store, args, needle, tmp_path):
    env = {**_env(), "ASYNCSGD_STORE": store}
    proc = run_mpi(3, TRAIN + args + ["--run-dir", str(tmp_path / "run")], timeout=90, env=env, cwd=REPO)
    assert proc.returncode == 2, proc.stdout[-3000:]
    _one_error(proc.stdout, needle)
    assert "Traceback" not in proc.stdout and not (tmp_path / "run").exists()


@pytest.mark.parametrize("n, mode", [(3, "downpour"), (1, "serial")])
def test_cpu_kernels_switch_is_checked_before_work(n, mode, tmp_path):
    """ASYNCSGD_CPU_KERNELS (the compiled CPU kernels on or off) with a typo: one error line from rank 0, exit 2."""
    env = {**_env(), "ASYNCSGD_CPU_KERNELS": "maybe"}
    argv = TRAIN + ["--mode", mode, "--run-dir", str(tmp_path / "run")]
    proc = run_mpi(n, argv, timeout=90, env=env, cwd=REPO) if n > 1 else \
        subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=90, env=env,
                       cwd=REPO)
    assert proc.returncode == 2, proc.stdout[-3000:]
    _one_error(proc.stdout, "ASYNCSGD_CPU_KERNELS='maybe' is not a switch: use 1")
    assert "Traceback" not in proc.stdout and not (tmp_path / "run").exists()


def test_fault_tolerance_works_with_the_served_store():
    from asyncsgd.ulfm import policy as ft
    on_ulfm = {ft.FT_ENV: "1"}
    # the same decision as with the RMA store (True under Open MPI with ULFM, False under MPICH)
    assert ft.resolve("auto", environ=on_ulfm, store="messages") == ft.resolve("auto", environ=on_ulfm, store="rma")
    assert ft.resolve("auto", environ=on_ulfm, store="messages") == ft.ulfm_enabled(on_ulfm)
    assert not ft.resolve("auto", environ={}, store="messages")
    if ft.ulfm_enabled(on_ulfm):
        assert ft.resolve("on", environ=on_ulfm, store="messages")


@pytest.mark.parametrize("args, needle", [
    (["--mode", "sandblaster", "--mini-shard-size", "100000", "--batch-size", "10"], "--mini-shard-size 100000"),
    (["--mode", "sandblaster", "--batch-size", "100000"], "--batch-size 100000 exceeds"),
    (["--mode", "sandblaster", "--history", "0"], "--history must be >= 1"),
    (["--mode", "sandblaster", "--epochs", "2"], "--epochs does not apply to sandblaster"),
    (["--mode", "sandblaster", "--servers", "2"], "--servers applies to --mode downpour only"),
    (["--mode", "sandblaster", "--slow-ranks", "5:2"], "--slow-ranks"),
    (["--mode", "downpour", "--momentum", "1.5"], "--momentum must be a number in [0, 1)"),
    (["--mode", "downpour", "--staleness-decay", "exp:2"], "--staleness-decay must be none, inverse or exp"),
    (["--mode", "downpour", "--servers", "5"], "--servers 5 leaves no worker"),
    (["--mode", "downpour", "--model", "resnet"], "unknown model 'resnet'"),
    (["--mode", "downpour", "--model", "no_such_module_xyz:net"], "cannot import 'no_such_module_xyz'"),
    (["--mode", "sync", "--model", "mnist_cnn"], "mnist_cnn needs 1x28x28"),
    (["--mode", "sync", "--augment", "shift:x"], "--augment"),
    (["--mode", "sync", "--target-accuracy", "2"], "--target-accuracy"),
    (["--mode", "sync", "--resume", "/nonexistent/ck.h5"], "does not exist"),
])
def test_every_mode_validates_before_work(args, needle, tmp_path):
    proc = run_mpi(3, TRAIN + args + ["--run-dir", str(tmp_path / "run")], timeout=90, env=_env(), cwd=REPO)
    assert proc.returncode == 2, proc.stdout[-3000:]
    _one_error(proc.stdout, needle)
    assert "Traceback" not in proc.stdout and "MPI_Abort" not in proc.stdout
    assert not (tmp_path / "run").exists()  # nothing is written before the inputs are known good


def _quick(cwd, *extra):
    return subprocess.run(TRAIN + ["--mode", "serial", "--model", "logreg", "--data", "synthetic:300", "--steps",
                                   "5", "--progress", "none", *extra],
                          capture_output=True, text=True, timeout=120, env=_env(), cwd=cwd)


def test_default_run_keeps_its_outputs_in_a_fresh_folder(tmp_path):
    first, second = _quick(tmp_path), _quick(tmp_path)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2  # the second run never reuses the first one's folder, even within the same second
    for folder, proc in zip(folders, (first, second)):
        assert {p.name for p in folder.iterdir()} == {"model.h5", "metrics.jsonl", "summary.json", "config.toml"}
        assert proc.stdout.strip().endswith(f"outputs in {os.path.join('runs', folder.name)}")
    summary = json.loads((folders[0] / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["model"] == "logreg"
    assert (folders[0] / "metrics.jsonl").read_text().strip()
    # the resolved configuration is a valid --config file that reproduces the options (outputs left out)
    again = subprocess.run(TRAIN + ["--config", str(folders[0] / "config.toml"), "--print-config"],
                           capture_output=True, text=True, timeout=60, env=_env(), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert 'model = "logreg"' in again.stdout and "steps = 5" in again.stdout and "run_dir" not in again.stdout


def test_run_dir_is_never_overwritten_and_explicit_outputs_win(tmp_path):
    run_dir, summary = tmp_path / "mine", tmp_path / "elsewhere.json"
    proc = _quick(tmp_path, "--run-dir", str(run_dir), "--summary-json", str(summary))
    assert proc.returncode == 0, proc.stderr
    assert summary.exists() and not (run_dir / "summary.json").exists()
    assert (run_dir / "model.h5").exists() and (run_dir / "metrics.jsonl").exists()
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    again = _quick(tmp_path, "--run-dir", str(run_dir))
    assert again.returncode == 2
    _one_error(again.stderr, "already exists")
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before
    none = _quick(tmp_path / "mine", "--run-dir", "none")  # writes nothing it was not asked for
    assert none.returncode == 0 and not (run_dir / "runs").exists()
    named = tmp_path / "named"
    named.mkdir()
    every = _quick(named, "--log", "l.jsonl", "--summary-json", "s.json", "--model-out", "m.h5")
    assert every.returncode == 0, every.stderr
    assert sorted(p.name for p in named.iterdir()) == ["l.jsonl", "m.h5", "s.json"]  # no runs/ folder beside them


def test_user_model_from_the_command_line_under_mpiexec(tmp_path):
    """--model PACKAGE.MODULE:FUNCTION imports a factory from the working directory on every rank."""
    (tmp_path / "my_nets.py").write_text(
        "from asyncsgd.model import Dense, Flatten, Network, ReLU\n"
        "def mlp(input_shape, n_classes, *, ops, seed=0):\n"
        "    layers = [Flatten(), Dense(32), ReLU(), Dense(n_classes)]\n"
        "    return Network('mlp', layers, input_shape, n_classes, ops=ops, seed=seed)\n")
    proc = run_mpi(3, TRAIN + ["--model", "my_nets:mlp", "--data", "synthetic:300", "--steps", "10",
                               "--progress", "none", "--run-dir", "out"], timeout=120, env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    from asyncsgd.model.files import read_model
    params, meta = read_model(str(tmp_path / "out" / "model.h5"))
    assert meta["model"] == "my_nets:mlp"
    assert params.size == 40 * 64 * 32 + 32 + 32 * 10 + 10  # synthetic:N holds (1, 40, 64) inputs, 10 classes
    assert "final test accuracy:" in proc.stdout


# ---- issue 15: learning-rate schedules, the validation split, the selected model ----------------------------------
@pytest.mark.parametrize("args, needle", [
    (["--mode", "serial", "--lr-schedule", "step:2@0.5"], "--lr-schedule 'step:2@0.5': step gamma"),
    (["--mode", "serial", "--lr-schedule", "wobble"], "unknown schedule 'wobble'"),
    (["--mode", "sandblaster", "--lr-schedule", "cosine"], "L-BFGS has no learning rate"),
    (["--mode", "serial", "--validation", "1"], "--validation is the fraction of the training set held out"),
    (["--mode", "serial", "--validation", "0", "--patience", "2"], "--patience needs a validation split"),
    (["--mode", "serial", "--data", "synthetic:400", "--validation", "0.1", "--target-accuracy", "0.9",
      "--lr-schedule", "cosine"], "--lr-schedule cosine needs the run's length"),
])
def test_bad_schedule_and_validation_options_are_one_clear_error(args, needle, tmp_path):
    proc = _serial(args + ["--run-dir", str(tmp_path / "run")])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    _one_error(proc.stderr, needle)
    assert not (tmp_path / "run").exists()


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _validation_accuracy_of(model_file, seed, fraction=0.1, data="synthetic:400"):
    """Re-evaluate a saved model on the run's validation rows (the split every rank computes from the seed)."""
    from asyncsgd.algorithms.common import TrainingSplit
    from asyncsgd.api import build_network
    from asyncsgd.backends import select_ops
    from asyncsgd.data import open_source
    from asyncsgd.model.files import read_model
    src = open_source(data)
    params, meta = read_model(str(model_file))
    net = build_network(meta["model"], src.input_shape, src.n_classes, select_ops("cpu"), seed=0)
    net.params[...] = params
    x, y = TrainingSplit(src, fraction, seed).validation_set()
    return float(net.evaluate(x, y)[1])


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_serial_logs_the_rate_and_holds_out_validation_rows(schedule, tmp_path):
    """The JSONL log records the rate (falling with cosine, fixed with constant) and both sets' figures; the
    summary counts the held-out rows and the epochs over the rows left for training."""
    run = tmp_path / "run"
    proc = _serial(["--mode", "serial", "--model", "logreg", "--data", "synthetic:400", "--epochs", "6",
                    "--lr", "0.05", "--lr-schedule", schedule, "--run-dir", str(run), "--progress", "none"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = json.loads((run / "summary.json").read_text())
    assert s["validation_rows"] == 40 and s["lr_schedule"] == schedule
    assert s["samples"] >= 6 * 360 and s["samples"] < 6 * 360 + 32 and s["epochs"] == pytest.approx(s["samples"] / 360)
    recs = _records(run / "metrics.jsonl")
    assert len(recs) >= 6
    assert all({"lr", "validation_accuracy", "test_accuracy", "best_validation_accuracy"} <= r.keys() for r in recs)
    rates = [r["lr"] for r in recs]
    if schedule == "constant":
        assert rates == [0.05] * len(rates)
    else:
        assert all(b < a for a, b in zip(rates, rates[1:])) and rates[-1] < 0.01 * 0.05
    assert "selected model:" in proc.stdout


def test_kept_model_has_the_best_logged_validation_accuracy(tmp_path):
    """The model file is the selected model: its validation accuracy, re-evaluated from the file on the validation
    rows, equals the best logged one and the summary's; the last model sits beside it when it differs; the test
    figure reported is the selected model's (chosen without looking at it)."""
    run = tmp_path / "run"
    # a constant, high rate on logreg oscillates, so the best evaluation is usually not the last; margin 0 selects
    # the best whenever it is better (the default margin's choice is tested in test_best_model.py)
    proc = _serial(["--mode", "serial", "--model", "logreg", "--data", "synthetic:400", "--epochs", "12",
                    "--lr", "0.5", "--lr-schedule", "constant", "--seed", "4", "--run-dir", str(run),
                    "--progress", "none", "--selection-margin", "0"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = json.loads((run / "summary.json").read_text())
    recs = _records(run / "metrics.jsonl")
    best = max(r["validation_accuracy"] for r in recs)
    assert s["best_validation_accuracy"] == best == s["selected_validation_accuracy"]
    assert _validation_accuracy_of(run / "model.h5", seed=4) == pytest.approx(best, abs=1e-9)
    kept = [r for r in recs if r["validation_accuracy"] == best][-1]     # a tie keeps the later model
    assert s["test_accuracy"] == s["selected_test_accuracy"] == kept["test_accuracy"]
    if s["selected_model"] == "best":
        assert _validation_accuracy_of(run / "model-last.h5", seed=4) == pytest.approx(
            s["last_validation_accuracy"], abs=1e-9)
        assert recs[-1]["validation_accuracy"] < best
    else:
        assert recs[-1]["validation_accuracy"] == best and not (run / "model-last.h5").exists()


def test_patience_stops_early_on_validation_accuracy(tmp_path):
    run = tmp_path / "run"
    proc = _serial(["--mode", "serial", "--model", "logreg", "--data", "synthetic:400", "--epochs", "60",
                    "--lr-schedule", "constant", "--patience", "1", "--run-dir", str(run), "--progress", "none"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = json.loads((run / "summary.json").read_text())
    assert s["stop_reason"] == "patience" and s["early_stopped"] is True and s["evaluations_since_best"] == 1
    assert s["epochs"] < 59


@pytest.mark.parametrize("mode", ["downpour", "sync"])
def test_distributed_modes_hold_out_validation_and_log_a_falling_rate(mode, tmp_path):
    """Under mpiexec: the summary counts the held-out rows and says which model was selected; the logged rate
    falls (Downpour: from the store's global version)."""
    run = tmp_path / "run"
    proc = run_mpi(3, TRAIN + ["--mode", mode, "--model", "logreg", "--data", "synthetic:400", "--epochs", "40",
                               "--eval-every", "0.05", "--run-dir", str(run), "--progress", "none"],
                   timeout=180, env=_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["validation_rows"] == 40 and s["selected_model"] in ("best", "last")
    assert s["lr_schedule"] == "warmup:0.05+cosine"
    recs = _records(run / "metrics.jsonl")
    # the run's peak is logreg's 0.01 (Downpour: x 2/W = 1 for 2 workers; sync: x sqrt(3)); cosine ends it near 0
    peak = 0.01 * (3 ** 0.5 if mode == "sync" else 1)
    assert 0 <= s["final_lr"] < 0.01 * peak and recs[-1]["lr"] == s["final_lr"]
    assert all(0 <= r["lr"] <= peak + 1e-12 for r in recs)
    assert s["best_validation_accuracy"] == max(r["validation_accuracy"] for r in recs)
    assert _validation_accuracy_of(run / "model.h5", seed=0) == pytest.approx(s["selected_validation_accuracy"],
                                                                               abs=1e-9)


def test_schedule_validation_and_patience_from_a_config_file(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('mode = "serial"\nlr-schedule = "step:0.1@0.5"\nvalidation = 0.2\npatience = 3\n')
    proc = _serial(["--config", str(cfg), "--print-config"])
    assert proc.returncode == 0, proc.stderr
    for line in ('lr_schedule = "step:0.1@0.5"', "validation = 0.2", "patience = 3"):
        assert line in proc.stdout
    cfg.write_text('mode = "serial"\nlr_schedule = "cosine:2"\n')
    proc = _serial(["--config", str(cfg)])
    assert proc.returncode == 2
    _one_error(proc.stderr, "cosine floor must be in [0, 1]")
