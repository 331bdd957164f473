"""Downpour SGD end to end (whole jobs under mpiexec) and a replica's handling of non-finite gradients."""
import json

import numpy
import pytest

from asyncsgd.testing.launch import run_mpi
from jobs import TRAIN
from paths import REPO, repo_env


def _train(n, args, tmp_path, timeout=240, batch=16):
    summary = tmp_path / "summary.json"
    batch_args = ["--batch-size", str(batch)] if batch else []
    proc = run_mpi(n, TRAIN + ["--data", "synthetic:600", *batch_args, "--progress", "none",
                               "--eval-every", "1", "--summary-json", str(summary)] + args,
                   timeout=timeout, env=repo_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return json.loads(summary.read_text()), proc.stdout


def _check_staleness(s):
    """The summary's staleness figures are those of its histogram of every push's staleness (bin 63: 63 or more)."""
    hist = numpy.array(s["staleness_hist"])
    assert hist.sum() == s["pushes"]
    cum = numpy.cumsum(hist)
    assert s["staleness_p95"] == int(numpy.searchsorted(cum, 0.95 * cum[-1])), (s["staleness_p95"], s["staleness_hist"])
    from_hist = float(hist @ numpy.arange(hist.size)) / s["pushes"]
    if hist[-1] == 0:   # no staleness clipped into the last bin: the mean is the histogram's, exactly
        assert s["staleness_mean"] == pytest.approx(from_hist, rel=1e-12), (s["staleness_mean"], from_hist)
    else:
        assert s["staleness_mean"] >= from_hist, (s["staleness_mean"], from_hist)


@pytest.mark.slow
@pytest.mark.parametrize("n", [3, 6])
def test_downpour_reaches_accuracy(n, tmp_path):
    s, out = _train(n, ["--steps", "80"], tmp_path)
    assert "final test accuracy:" in out
    assert s["workers"] == n - 1 and s["servers"] == 1
    assert s["test_accuracy"] >= 0.85, s["test_accuracy"]
    assert s["pushes"] == 80 * (n - 1)
    assert s["push_bytes"] == s["pushes"] * s["n_params"] * 4
    _check_staleness(s)
    assert len(s["per_worker_samples_per_s"]) == n - 1


@pytest.mark.slow
def test_downpour_sparse_decay_two_servers(tmp_path):
    s, _ = _train(4, ["--steps", "80", "--servers", "2", "--sparsity", "0.05", "--staleness-decay", "exp:0.9",
                      "--n-push", "2"], tmp_path)
    assert s["servers"] == 2 and s["workers"] == 2
    assert s["pushes"] == 2 * (40 + 1)  # 40 sparse pushes, then a dense last one carrying the residual
    # a sparse push moves an int64 index and a float32 value per chosen entry: 5% of the parameters
    k = int(numpy.ceil(0.05 * s["n_params"]))
    assert s["push_bytes"] == 2 * 40 * k * 12 + 2 * s["n_params"] * 4
    assert s["test_accuracy"] >= 0.8, s["test_accuracy"]


@pytest.mark.slow
def test_downpour_adagrad_warm_start_and_sync(tmp_path):
    s, _ = _train(3, ["--steps", "40", "--optimizer", "adagrad", "--warm-start-steps", "10"], tmp_path)
    assert s["test_accuracy"] >= 0.8, s["test_accuracy"]
    # the warm start happened: worker 0 fetched the initial model, worker 1 only after worker 0's 10 pushes
    assert s["warm_start_steps"] == 10 and s["first_fetch_versions"][0] == 0, s["first_fetch_versions"]
    assert s["first_fetch_versions"][1] >= 10, s["first_fetch_versions"]
    assert s["overlap"] == "off" and s["per_worker_overlapped_calls"] == [0, 0]  # every call inline, as asked
    s, _ = _train(3, ["--steps", "40", "--mode", "sync"], tmp_path)
    assert s["mode"] == "sync" and s["workers"] == 3 and s["test_accuracy"] >= 0.8


@pytest.mark.slow
def test_default_warm_start_is_9_percent_of_the_run_and_off_on_request(tmp_path):
    # 540 training rows (600 less the 10% validation split) x 3 epochs at batch 16: 9% is 9.1 steps
    s, _ = _train(4, ["--epochs", "3"], tmp_path)
    assert s["warm_start_steps"] == 9
    assert s["first_fetch_versions"][0] == 0 and min(s["first_fetch_versions"][1:]) >= 9, s["first_fetch_versions"]
    s, _ = _train(4, ["--epochs", "3", "--warm-start-steps", "0"], tmp_path)
    # no warm start: nobody waits, and the first fetch of all comes before any push (each worker pushes only after
    # its own first fetch)
    assert s["warm_start_steps"] == 0 and min(s["first_fetch_versions"]) == 0, s["first_fetch_versions"]


@pytest.mark.slow
def test_five_workers_default_to_half_the_batch_and_rate_and_a_given_batch_keeps_the_rate(tmp_path):
    """More than 3 Downpour workers halve speech_cnn's batch (32) and default rate (0.01 x 3/5) with it; the summary
    records the options as trained."""
    s, _ = _train(6, ["--epochs", "1"], tmp_path, batch=None)
    assert (s["workers"], s["batch_size"], s["momentum"]) == (5, 16, 0.9)
    assert s["peak_lr"] == pytest.approx(0.003)
    # 540 training rows x 1 epoch: 9% is 3.04 steps of 16 (it would be 2 of 32)
    assert s["warm_start_steps"] == 3
    s, _ = _train(6, ["--epochs", "1"], tmp_path, batch=32)
    assert (s["batch_size"], s["peak_lr"]) == (32, pytest.approx(0.006))
    s, _ = _train(4, ["--epochs", "1"], tmp_path, batch=None)
    assert (s["workers"], s["batch_size"], s["peak_lr"]) == (3, 32, pytest.approx(0.01))


def test_warm_start_steps_rule():
    from asyncsgd.plan import warm_start_steps
    from asyncsgd.options import DownpourOptions, Stop
    auto = DownpourOptions(batch_size=32)
    # the default FSDD run: 2,430 training rows x 30 epochs, 5 workers -> 205 steps of 32
    assert warm_start_steps(auto, Stop(epochs=30), n_train=2430, workers=5, resumed=False) == 205
    assert warm_start_steps(auto, Stop(steps=100), n_train=2430, workers=5, resumed=False) == 45  # 9% of 5 x 100
    assert warm_start_steps(auto, Stop(time_limit=60), n_train=2430, workers=5, resumed=False) == 0  # length unknown
    assert warm_start_steps(auto, Stop(epochs=30), n_train=2430, workers=1, resumed=False) == 0  # nobody to wait
    assert warm_start_steps(auto, Stop(epochs=30), n_train=2430, workers=5, resumed=True) == 0  # a trained start
    given = DownpourOptions(batch_size=32, warm_start_steps=7)
    assert warm_start_steps(given, Stop(epochs=30), n_train=2430, workers=5, resumed=False) == 7
    assert warm_start_steps(given, Stop(epochs=30), n_train=2430, workers=5, resumed=True) == 0


@pytest.mark.slow
def test_downpour_adagrad_runs_to_the_end_of_the_default_cosine(tmp_path):
    """Epochs with partial last batches: 3 workers x 180 rows at batch 32 count 18 pushes for 16.9 pushes of budget,
    so late fetches see a global progress of 1 and the cosine's rate 0.  The store refused lr 0 and the job died on
    its last pushes (one run in three here; every FSDD run with 5 workers)."""
    s, out = _train(4, ["--epochs", "1", "--batch-size", "32", "--optimizer", "adagrad"], tmp_path)
    assert "final test accuracy:" in out
    assert s["pushes"] == 3 * 6 and s["final_lr"] == 0.0, (s["pushes"], s["final_lr"])


@pytest.mark.mpi(min_size=2)
@pytest.mark.ranks(2, 3)
def test_nonfinite_gradient_is_never_pushed():
    """A replica that meets a NaN batch skips it, counts it, warns once, and the store stays unchanged."""
    from mpi4py import MPI

    from asyncsgd.algorithms.downpour.worker import DownpourWorker
    from asyncsgd.backends import select_ops
    from asyncsgd.model import build_model
    from asyncsgd.options import DownpourOptions
    from asyncsgd.store import ShardedParameters

    comm = MPI.COMM_WORLD.Dup()
    net = build_model("logreg", (1, 4, 4), 3, seed=0)
    cfg = DownpourOptions(optimizer="sgd", sparsity=1.0, momentum=0.9, lr=0.1, adagrad_eps=1e-6)
    with ShardedParameters(comm, net.n_params, n_servers=1, initial=net.params) as store:
        before = store.read_all()
        comm.Barrier()
        if comm.rank == 1:
            worker = DownpourWorker(cfg, net, store, select_ops("cpu"), seed=0)
            worker.fetch()
            x = numpy.ones((4, 1, 4, 4), numpy.float32)
            x[0, 0, 0, 0] = numpy.nan
            with pytest.warns(RuntimeWarning, match="non-finite gradient"):
                assert worker.step(x, numpy.array([0, 1, 2, 0])) is False
            assert worker.step(x, numpy.array([0, 1, 2, 0])) is False  # no second warning needed
            assert worker.skipped_nonfinite == 2
            worker.push()  # nothing accrued: an all-zero update
            assert worker.step(numpy.ones((4, 1, 4, 4), numpy.float32), numpy.array([0, 1, 2, 0])) is True
        comm.Barrier()
        after_nan = store.read_all()
        comm.Barrier()
    comm.Free()
    numpy.testing.assert_array_equal(before, after_nan)
