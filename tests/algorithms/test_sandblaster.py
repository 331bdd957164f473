"""Sandblaster L-BFGS: same optimum as serial L-BFGS, mini-shard gradients counted once, run() and its options."""
import json
import sys
import time

import numpy
import pytest

from asyncsgd.algorithms.sandblaster import coordinator as sandblaster
from asyncsgd.plan import check_sandblaster
from asyncsgd.algorithms.sandblaster.lbfgs import ShardedLBFGS
from lbfgs_reference import lbfgs_serial
from asyncsgd.algorithms.sandblaster.minishards import MiniShardScheduler, mini_shard_bounds
from asyncsgd.backends import select_ops
from asyncsgd.data import DataSource
from asyncsgd.testing.launch import run_mpi
from asyncsgd.model import build_model
from asyncsgd.options import OptionError, SandblasterOptions, Stop

CPU = select_ops("cpu")


class Blobs(DataSource):
    """A small in-memory data set of Gaussian class blobs, (1, 4, 5) inputs (fast enough for every rank count)."""

    def __init__(self, n_train=240, n_test=60, n_classes=3, seed=0):
        rng = numpy.random.default_rng(seed)
        self.name, self.input_shape, self.n_classes = "blobs", (1, 4, 5), n_classes
        self.n_train, self.n_test, self.attrs = n_train, n_test, {}
        centres = rng.normal(0, 1.0, size=(n_classes, 20))
        y = rng.integers(0, n_classes, n_train + n_test)
        x = (centres[y] + rng.normal(0, 1.0, size=(len(y), 20))).astype(numpy.float32).reshape(-1, 1, 4, 5)
        self._x, self._y = x, y.astype(numpy.int64)

    def _read_train(self, start, stop):
        return self._x[start:stop], self._y[start:stop]

    def _read_test(self):
        return self._x[self.n_train:], self._y[self.n_train:]


class SlowReplica(sandblaster.Replica):
    """A replica whose mini-shards take at least 2 ms, so a slowed rank is reliably the last to finish."""

    def compute(self, i):
        time.sleep(0.002)
        return super().compute(i)


def _serial_objective(src, l2):
    net = build_model("logreg", src.input_shape, src.n_classes, dtype=numpy.float64)
    x, y = src.train_range(0, src.n_train)

    def f_and_g(w):
        net.params[...] = w
        loss = net.loss_and_grad(x, y)
        return loss + 0.5 * l2 * w @ w, net.grads + l2 * w

    return net, f_and_g


@pytest.mark.mpi(min_size=1)
def test_same_optimum_as_serial_lbfgs(comm):
    src, l2, history = Blobs(), 1e-3, 5
    net64, f_and_g = _serial_objective(src, l2)
    x0 = net64.params.copy()
    ref = lbfgs_serial(f_and_g, x0, history, 200, grad_tol=1e-7, loss_tol=0.0)
    x, y = src.train_range(0, src.n_train)
    replica = sandblaster.Replica(build_model("logreg", src.input_shape, src.n_classes, dtype=numpy.float64),
                                  CPU, x, y, seed=0)
    bounds = mini_shard_bounds(src.n_train, 7)
    replica.set_batch(1, numpy.arange(src.n_train), bounds)
    with MiniShardScheduler(comm, len(bounds)) as sched:
        ev = sandblaster.build_evaluator(comm, replica, sched, l2=l2)
        opt = ShardedLBFGS(ev, x0[ev.lo:ev.hi], history)
        reason = opt.minimize(200, grad_tol=1e-7, loss_tol=0.0)
    assert reason == ref.reason == "grad_tol"
    assert abs(opt.f - ref.f) / abs(ref.f) < 1e-6
    assert abs(opt.iterations - ref.iterations) <= max(1, 0.1 * ref.iterations)


@pytest.mark.mpi(min_size=2)
def test_gradient_with_backups_and_a_slow_rank_equals_serial(comm):
    src, l2 = Blobs(), 1e-3
    net64, f_and_g = _serial_objective(src, l2)
    rng = numpy.random.default_rng(5)
    x, y = src.train_range(0, src.n_train)
    replica = SlowReplica(build_model("logreg", src.input_shape, src.n_classes, dtype=numpy.float64), CPU, x, y, 0)
    bounds = mini_shard_bounds(src.n_train, 10)
    replica.set_batch(1, numpy.arange(src.n_train), bounds)
    factor = 4.0 if comm.rank == comm.size - 1 else 1.0
    launched = []
    with MiniShardScheduler(comm, len(bounds), slow_factor=factor) as sched:
        ev = sandblaster.build_evaluator(comm, replica, sched, l2=l2,
                                         on_batch=lambda stats, n: launched.append(stats.launched))
        for _ in range(3):
            w = rng.normal(size=net64.n_params)
            f_ref, g_ref = f_and_g(w)
            f, g_shard, gg, _ = ev(w[ev.lo:ev.hi])
            assert f == pytest.approx(f_ref, rel=1e-12)
            numpy.testing.assert_allclose(g_shard, g_ref[ev.lo:ev.hi], rtol=1e-10, atol=1e-13)
            assert gg == pytest.approx(g_ref @ g_ref, rel=1e-10)
    assert comm.allreduce(sum(launched)) > 0


class Records:
    """Collects what run() reports (stands in for asyncsgd.io.metrics.Reporter)."""

    def __init__(self):
        self.records = []

    def record(self, rec):
        self.records.append(rec)
        return rec


def _run(comm, src, reporter, **options):
    net = build_model("logreg", src.input_shape, src.n_classes, dtype=numpy.float64)
    return sandblaster.run(comm, net, src, SandblasterOptions(**options), Stop(), CPU, reporter, model_name="logreg")


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("schedule", ["dynamic", "static"])
def test_run_trains_and_reports(comm, schedule):
    src = Blobs()
    slow = {comm.size - 1: 3.0} if comm.size > 1 else {}
    reporter = Records() if comm.rank == 0 else None
    summary = _run(comm, src, reporter, max_iter=6, schedule=schedule, slow_ranks=slow, mini_shard_size=20)
    if comm.rank != 0:
        assert summary is None
        return
    for key in ("iterations", "final_loss", "grad_norm", "function_evaluations", "backups_launched",
                "backups_discarded", "test_accuracy", "wall_s", "samples_per_s", "mode", "model", "data"):
        assert key in summary
    assert summary["mode"] == "sandblaster" and summary["data"] == "blobs"
    assert 1 <= summary["iterations"] <= 6
    assert summary["function_evaluations"] > summary["iterations"]
    assert summary["test_accuracy"] > 0.6  # 3 separable-ish classes: chance is 1/3
    recs = reporter.records
    assert len(recs) == summary["iterations"]
    losses = [r["loss"] for r in recs]
    assert losses == sorted(losses, reverse=True)  # a fixed full batch: L-BFGS decreases it every iteration
    for r in recs:
        assert {"time", "iteration", "loss", "grad_norm", "test_accuracy", "minishards_per_rank",
                "backups_launched", "backups_discarded"} <= set(r)
        assert len(r["minishards_per_rank"]) == comm.size
        # 240 examples in mini-shards of 20: 12 per evaluation, each summed by exactly one rank
        assert sum(r["minishards_per_rank"]) >= 12 and sum(r["minishards_per_rank"]) % 12 == 0
    assert sum(sum(r["minishards_per_rank"]) for r in recs) == 12 * summary["function_evaluations"]
    if schedule == "static":
        assert summary["backups_launched"] == 0


@pytest.mark.mpi(min_size=1)
def test_run_with_redrawn_batches(comm):
    src = Blobs()
    reporter = Records() if comm.rank == 0 else None
    summary = _run(comm, src, reporter, max_iter=5, batch_size=60, mini_shard_size=7)
    if comm.rank == 0:
        assert summary["batch_size"] == 60 and summary["iterations"] == 5
        # a new batch every iteration: the gradient is re-evaluated there, then at least one line-search point
        assert summary["function_evaluations"] >= 2 * summary["iterations"]
        assert summary["samples"] == 60 * summary["function_evaluations"]  # each mini-shard summed once
        assert numpy.isfinite(summary["final_loss"]) and summary["test_accuracy"] > 0.5


def test_dropout_masks_are_fixed_per_batch_and_mini_shard():
    """Every copy of a mini-shard (and every line-search point) sees the same masks; a new batch draws new ones."""
    src = Blobs()
    x = numpy.repeat(numpy.repeat(src.train_range(0, 40)[0], 2, axis=2), 2, axis=3)[:, :, :8, :8]
    y = src.train_range(0, 40)[1]
    net = build_model("mnist_cnn", (1, 8, 8), src.n_classes, dtype=numpy.float64)
    replica = sandblaster.Replica(net, CPU, x, y, seed=0)
    assert replica.stochastic_masks
    replica.set_batch(1, numpy.arange(40), mini_shard_bounds(40, 10))
    grads = []
    for batch_no in (1, 1, 2):
        replica.batch_no = batch_no
        loss, n = replica.compute(2)
        grads.append((loss, net.grads.copy()))
    assert grads[0][0] == grads[1][0]
    numpy.testing.assert_array_equal(grads[0][1], grads[1][1])
    assert not numpy.array_equal(grads[0][1], grads[2][1])


@pytest.mark.parametrize("options, field, match", [
    (dict(mini_shard_size=500, batch_size=100), "mini_shard_size", "larger than the batch"),
    (dict(batch_size=5000), "batch_size", "exceeds"),
    (dict(slow_ranks={7: 2.0}), "slow_ranks", "rank 7")])
def test_options_checked_against_data_and_job(options, field, match):
    """check_options (called by asyncsgd.api.prepare before any work) names the field of a bad value."""
    with pytest.raises(OptionError, match=match) as err:
        check_sandblaster(SandblasterOptions(**options), 240, 3, "logreg")
    assert err.value.field == field


@pytest.mark.parametrize("options, match", [(dict(history=0), "history"), (dict(schedule="fast"), "schedule"),
                                            (dict(grad_tol=-1.0), "grad_tol"), (dict(max_iter=0), "max_iter")])
def test_options_checked_when_made(options, match):
    with pytest.raises(OptionError, match=match):
        SandblasterOptions(**options)


def test_epochs_do_not_apply_to_sandblaster():
    with pytest.raises(OptionError, match="does not apply to sandblaster"):
        check_sandblaster(SandblasterOptions(), 240, 3, "logreg", Stop(epochs=2))


def test_train_entry_point_runs_sandblaster(tmp_path):
    out = tmp_path / "summary.json"
    proc = run_mpi(3, [sys.executable, "-m", "asyncsgd.train", "--mode", "sandblaster", "--model", "logreg",
                       "--data", "synthetic:300", "--max-iter", "4", "--progress", "none",
                       "--slow-ranks", "2:4", "--summary-json", str(out)], timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    summary = json.loads(out.read_text())
    assert summary["mode"] == "sandblaster" and summary["iterations"] >= 1
    assert summary["final_loss"] < numpy.log(10)  # below the loss of a uniform guess over 10 classes
