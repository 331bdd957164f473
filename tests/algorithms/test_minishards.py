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
    lost = 0
    with MiniShardScheduler(comm, len(bounds), slow_factor=factor) as sched:
        # Up to 5 batches (the windows are reset between them): on a loaded machine the straggler's copies can
        # still win a batch (seen once in CI, at load ~8 on 2 cores); every batch must be exact whoever wins.
        for _ in range(5):
            total, seen, stats = _batch_gradient(comm, sched, x, w, bounds, delay=0.005)
            assert numpy.all(seen == 1)
            numpy.testing.assert_allclose(total, expected, rtol=1e-12, atol=1e-12)
            counts = _reduce_stats(comm, stats)  # the same on every rank, so every rank leaves the loop together
            assert counts["done"] == len(bounds)
            assert counts["launched"] > 0
            assert counts["launched"] == counts["backups_discarded"] + counts["originals_lost"]
            lost = counts["originals_lost"]
            if lost > 0:
                break
    assert lost > 0  # the straggler's copies were beaten by backups
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
    """Makes every idle rank read a backup count of 0 before any asks for a backup, and the original copy finish only
    after every idle rank has asked: the race for one mini-shard's backups, forced by waiting on the scheduler's own
    state instead of sleeping.

    Each rank that reads the flags for the first time counts itself in a window of its own (``looked``) and waits
    until the comm.size - 1 idle ranks all have; the original's ``compute`` waits until the mini-shard's backup count
    reaches comm.size - 1.  With the landed code (read the count, then increment it regardless) every idle rank
    launched a backup.
    """

    def __init__(self, comm, *args, **kwargs):
        super().__init__(comm, *args, **kwargs)
        item = MPI.INT64_T.Get_size()
        self.looked = MPI.Win.Allocate(item if self.comm.rank == 0 else 0, item, comm=self.comm)
        if self.comm.rank == 0:
            numpy.frombuffer(self.looked.tomemory(), dtype=numpy.int64)[:] = 0
        self.comm.Barrier()
        self.looked.Lock_all()
        self.lingered = False
        self.in_backup = False

    def _wait_for(self, read, value):
        while read() < value:
            time.sleep(0.001)

    def _read_flags(self, n):
        flags = super()._read_flags(n)
        if not self.lingered:
            self.lingered = True
            self._fetch_add(self.looked, 0)
            self._wait_for(lambda: self._fetch_add(self.looked, 0, 0, op=MPI.NO_OP), self.comm.size - 1)
        return flags

    def backups_asked(self, i):
        return int(MiniShardScheduler._read_flags(self, i + 1)[1][i])

    def _claim_backup(self, i):
        self.in_backup = True
        return super()._claim_backup(i)

    def free(self):
        if self.looked is not None:
            self.comm.Barrier()
            self.looked.Unlock_all()
            self.looked.Free()
            self.looked = None
        super().free()


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize("max_backups", [1, 2])
def test_idle_ranks_racing_for_one_mini_shard_launch_at_most_max_backups(comm, max_backups):
    """One mini-shard, held by an original copy that ends only after every other rank asked for a backup at the same
    moment: exactly min(max_backups, idle ranks) backups launch, and the mini-shard is summed once."""
    with _RacingScheduler(comm, 1, max_backups=max_backups) as sched:
        def compute(i):
            if not sched.in_backup:  # the original copy: slow until every idle rank asked for a backup
                sched._wait_for(lambda: sched.backups_asked(i), comm.size - 1)
            return comm.rank

        won = []
        stats = sched.run_batch(1, compute, lambda i, r: won.append(r))
    counts = _reduce_stats(comm, stats)
    assert comm.allreduce(len(won)) == 1                  # summed exactly once
    assert counts["launched"] == min(max_backups, comm.size - 1), counts
    assert counts["launched"] == counts["backups_discarded"] + counts["originals_lost"]
