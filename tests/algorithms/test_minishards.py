"""The mini-shard scheduler: every mini-shard is summed exactly once, backups cover a slow rank, bad sizes fail."""
import time

import numpy
import pytest
from mpi4py import MPI

from asyncsgd.algorithms.sandblaster.minishards import MiniShardScheduler, mini_shard_bounds


def _problem(n_examples=240, dim=7, seed=3):
    rng = numpy.random.default_rng(seed)
    return rng.normal(size=(n_examples, dim)), rng.normal(size=dim)


def _batch_gradient(comm, sched, x, w, bounds, delay=0.0):
    """Sum over mini-shards of the least-squares gradient, each mini-shard's sum accepted on its winning rank."""
    total = numpy.zeros_like(w)
    seen = numpy.zeros(len(bounds), dtype=numpy.int64)

    def compute(i):
        a, b = bounds[i]
        if delay:
            time.sleep(delay)
        r = x[a:b] @ w - 1.0
        return x[a:b].T @ r

    def accept(i, g):
        total[...] += g
        seen[i] += 1

    stats = sched.run_batch(len(bounds), compute, accept)
    comm.Allreduce(MPI.IN_PLACE, total, op=MPI.SUM)
    comm.Allreduce(MPI.IN_PLACE, seen, op=MPI.SUM)
    return total, seen, stats


def _reduce_stats(comm, stats):
    fields = ("done", "computed", "launched", "backups_discarded", "originals_lost")
    v = numpy.array([getattr(stats, f) for f in fields], dtype=numpy.int64)
    comm.Allreduce(MPI.IN_PLACE, v, op=MPI.SUM)
    return dict(zip(fields, v.tolist()))


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("schedule", ["dynamic", "static"])
def test_batch_gradient_equals_serial(comm, schedule):
    x, w = _problem()
    bounds = mini_shard_bounds(len(x), 13)
    expected = x.T @ (x @ w - 1.0)
    with MiniShardScheduler(comm, len(bounds), schedule=schedule) as sched:
        for _ in range(3):  # the windows are reset between batches
            total, seen, stats = _batch_gradient(comm, sched, x, w, bounds)
            assert numpy.all(seen == 1)
            numpy.testing.assert_allclose(total, expected, rtol=1e-12, atol=1e-12)
            counts = _reduce_stats(comm, stats)
            assert counts["done"] == len(bounds)
            assert counts["launched"] == counts["backups_discarded"] + counts["originals_lost"]
            if schedule == "static":
                assert counts["launched"] == 0


@pytest.mark.mpi(min_size=2)
def test_slow_rank_is_backed_up_and_counted_once(comm):
    x, w = _problem()
    bounds = mini_shard_bounds(len(x), 20)
    expected = x.T @ (x @ w - 1.0)
    slow = comm.size - 1
    factor = 8.0 if comm.rank == slow else 1.0
    with MiniShardScheduler(comm, len(bounds), slow_factor=factor) as sched:
        total, seen, stats = _batch_gradient(comm, sched, x, w, bounds, delay=0.005)
    assert numpy.all(seen == 1)
    numpy.testing.assert_allclose(total, expected, rtol=1e-12, atol=1e-12)
    counts = _reduce_stats(comm, stats)
    assert counts["done"] == len(bounds)
    assert counts["launched"] > 0
    assert counts["originals_lost"] > 0  # the straggler's copies were beaten by backups
    assert counts["launched"] == counts["backups_discarded"] + counts["originals_lost"]
    done_here = comm.allgather(stats.done)
    assert done_here[slow] < max(done_here)  # fast ranks did more of the work


@pytest.mark.mpi(min_size=1)
def test_bad_sizes_are_errors(comm):
    with pytest.raises(ValueError, match="larger than the batch"):
        mini_shard_bounds(10, 11)
    with pytest.raises(ValueError, match="schedule"):
        MiniShardScheduler(comm, 4, schedule="random")
    with MiniShardScheduler(comm, 4) as sched:
        with pytest.raises(ValueError, match="mini-shards"):
            sched.run_batch(5, lambda i: None, lambda i, r: None)


class _RacingScheduler(MiniShardScheduler):
    """Lingers after its first look at the flags, so every idle rank reads a backup count of 0 before any asks.

    With the landed code (read the count, then increment it regardless) every such rank launched a backup.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lingered = False
        self.in_backup = False

    def _read_flags(self, n):
        flags = super()._read_flags(n)
        if not self.lingered:
            self.lingered = True
            time.sleep(0.3)
        return flags

    def _claim_backup(self, i):
        self.in_backup = True
        return super()._claim_backup(i)


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize("max_backups", [1, 2])
def test_idle_ranks_racing_for_one_mini_shard_launch_at_most_max_backups(comm, max_backups):
    """One mini-shard, held by a slow original; every other rank races for its backups at the same moment."""
    with _RacingScheduler(comm, 1, max_backups=max_backups) as sched:
        def compute(i):
            if not sched.in_backup:
                time.sleep(1.5)  # the original copy: slow, so the idle ranks go for backups
            return comm.rank

        won = []
        stats = sched.run_batch(1, compute, lambda i, r: won.append(r))
    counts = _reduce_stats(comm, stats)
    assert comm.allreduce(len(won)) == 1                  # summed exactly once
    assert 1 <= counts["launched"] <= max_backups, counts
    assert counts["launched"] == counts["backups_discarded"] + counts["originals_lost"]
