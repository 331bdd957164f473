"""Sandblaster's load balancer: mini-shards of a batch handed out through RMA atomics, with backup copies.

DistBelief cut each batch into many more small work units than replicas and gave a unit to whichever replica asked
next, so fast replicas did more of them; near the end, idle replicas re-ran the units still outstanding and the
first result to arrive counted ("backup tasks", as in MapReduce).  Here, over one-sided MPI on rank 0:

- a *counter window* (one int64): a replica claims the next mini-shard with ``Fetch_and_op(+1)``;
- a *flag window* (int64 per mini-shard, then a backup count per mini-shard): once every mini-shard is claimed,
  idle replicas read the flags and ask for a backup copy of an unfinished one with ``Fetch_and_op(+1)`` on its
  backup count; only an asker to whom the increment returns a count below ``max_backups`` launches the copy, so
  at most ``max_backups`` copies start however many replicas race for the same mini-shard;
  finishing a copy is a ``Compare_and_swap(0 -> rank+1)`` on its flag: the first copy to finish wins and is summed,
  a loser discards its result.  So every mini-shard is summed exactly once, by exactly one replica.

A batch ends when every flag is set.  Mini-shards deal the batch's rows round-robin in class order
(``mini_shard_rows``), so each holds every class even of a file written in class order.  All windows live on
rank 0 (the coordinator, itself a replica), which runs a progress thread while they exist: under MPICH a
passive-target operation aimed at a busy rank otherwise waits until that rank next calls MPI (rma/progress_thread.py).

Run-through of a dead replica (``check``, ``fault_tolerant``; docs/FAULT_TOLERANCE.md): the backups already finish
the dead replica's unfinished mini-shards, but the gradients its winning copies summed died with it, so the batch
cannot complete; ``check()`` (a failure probe) is called between mini-shards and while waiting for the last copies,
where no collective would report the death, and raises; the trainer then shrinks, ``abandon()``s this scheduler
and builds a new one on the survivors, where the batch's mini-shards are issued again from the start.

``slow_factor`` > 1 makes this rank a simulated straggler (tests and benchmarks only): after each mini-shard it
sleeps (factor - 1) x the measured compute time, in short slices, and abandons the copy as soon as another copy of
the same mini-shard has won (a cancelled straggler task; real compute can only be abandoned between mini-shards,
which is one reason mini-shards are small).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy
from mpi4py import MPI

from asyncsgd.runtime.mpi import polled_barrier
from asyncsgd.data.partition import class_strided_order, contiguous_bounds
from asyncsgd.rma.owner import WindowOwner
from asyncsgd.rma.progress_thread import ProgressThread

__all__ = ["MiniShardScheduler", "BatchStats", "SCHEDULES", "mini_shard_bounds", "mini_shard_rows"]

SCHEDULES = ("dynamic", "static")
_POLL = 0.002        # seconds between looks at the flags while waiting for the last copies
_SLOW_SLICE = 0.002  # a straggler's sleep is cut into slices this long, checking for a winner in between


def mini_shard_bounds(batch_size: int, mini_shard_size: int) -> list[tuple[int, int]]:
    """Cut ``range(batch_size)`` into ceil(batch / size) consecutive (start, stop) mini-shards of near-equal sizes.

    Every mini-shard holds at most ``mini_shard_size`` examples, and sizes differ by at most one.
    """
    if mini_shard_size < 1 or batch_size < 1:
        raise ValueError(f"batch ({batch_size}) and mini-shard ({mini_shard_size}) sizes must be >= 1")
    if mini_shard_size > batch_size:
        raise ValueError(f"mini-shard size {mini_shard_size} is larger than the batch ({batch_size} examples); "
                         f"use --mini-shard-size <= --batch-size")
    return list(contiguous_bounds(batch_size, -(-batch_size // mini_shard_size), what="examples"))


def mini_shard_rows(rows, mini_shard_size: int, labels=None):
    """Return (rows reordered, bounds): mini-shard i is ``reordered[a:b]`` for ``(a, b) = bounds[i]``.

    ``rows`` (int [batch]) are a batch's training rows and ``labels`` (int [batch], optional) their classes.  The
    rows are dealt round-robin to the mini-shards in class order (``partition.class_strided_order``), so every
    mini-shard holds every class in proportion even when the file (and so a sorted batch) is in class order, where
    consecutive rows would give each mini-shard one class.  Without labels: mini-shard i gets ``rows[i::n]``.
    """
    rows = numpy.asarray(rows)
    bounds = mini_shard_bounds(len(rows), mini_shard_size)
    labels = numpy.zeros(len(rows), dtype=numpy.int64) if labels is None else labels
    return rows[class_strided_order(labels, len(bounds), what="examples")], bounds


@dataclass
class BatchStats:
    """What this rank did in one batch.

    ``done``: mini-shards it computed whose copy won (summed here); ``computed``: copies it finished or abandoned;
    ``launched``: backup copies it started; ``backups_discarded``: its backup copies that lost (wasted work);
    ``originals_lost``: its first copies beaten by someone's backup (stragglers that were covered).
    Over all ranks, launched == backups_discarded + originals_lost and the done counts sum to the mini-shards.
    """
    done: int = 0
    computed: int = 0
    launched: int = 0
    backups_discarded: int = 0
    originals_lost: int = 0


class MiniShardScheduler(WindowOwner):
    """Run batches of mini-shards over every rank of ``comm`` (collective constructor, ``free`` and ``run_batch``).

    ``max_mini_shards`` sizes the flag window (the most mini-shards one batch may have).  ``schedule`` 'dynamic'
    (claims and backups over RMA) or 'static' (rank r computes the r-th contiguous block, no windows, no backups:
    the baseline of the benchmark).  A ``with`` block frees it on success and leaves it alone on an exception
    (``WindowOwner``).
    """

    def __init__(self, comm, max_mini_shards: int, *, schedule: str = "dynamic", slow_factor: float = 1.0,
                 max_backups: int = 1, check=None):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if max_mini_shards < 1:
            raise ValueError(f"max_mini_shards must be >= 1, got {max_mini_shards}")
        if not slow_factor >= 1:
            raise ValueError(f"slow_factor must be >= 1, got {slow_factor}")
        if max_backups < 0:
            raise ValueError(f"max_backups must be >= 0, got {max_backups}")
        self.comm = comm.Dup()
        self._own(self.comm)
        self.schedule = schedule
        self.max_mini_shards = int(max_mini_shards)
        self.slow_factor = float(slow_factor)
        self.max_backups = int(max_backups)
        self._check = check  # None, or a callable that raises when a rank of the job died
        self._abandoned = False
        self._progress = None
        self._counter = self._flags = None
        # RMA origin and result buffers live as attributes: MPI may read an origin buffer at any time until the
        # Flush that completes the call (over a network transport, after the call has returned), so a temporary
        # passed straight into Put or Compare_and_swap could be freed and reused before it is read.
        self._one = numpy.ones(1, dtype=numpy.int64)
        self._scratch = numpy.zeros(1, dtype=numpy.int64)
        self._result = numpy.zeros(1, dtype=numpy.int64)
        self._compare = numpy.zeros(1, dtype=numpy.int64)
        self._mine = numpy.array([self.comm.rank + 1], dtype=numpy.int64)
        self._zeros = numpy.zeros(max(1, int(max_mini_shards)), dtype=numpy.int64)
        if schedule == "dynamic":
            self._open_windows()

    # -- windows ------------------------------------------------------------------------------------------------

    def _open_windows(self):
        root = self.comm.rank == 0
        item = MPI.INT64_T.Get_size()
        self._counter = MPI.Win.Allocate(item if root else 0, item, comm=self.comm)
        self._flags = MPI.Win.Allocate(2 * self.max_mini_shards * item if root else 0, item, comm=self.comm)
        if self._check is not None:  # run-through: an RMA error is reported (an exception), not fatal to the job
            self._counter.Set_errhandler(MPI.ERRORS_RETURN)
            self._flags.Set_errhandler(MPI.ERRORS_RETURN)
        self._progress_comm = self.comm.Dup()  # collective: every rank, though only rank 0 polls it
        if root:
            self._progress = ProgressThread(self._progress_comm).start()
        # One passive epoch per window for the scheduler's lifetime; ops complete with Flush.
        self._counter.Lock_all()
        self._flags.Lock_all()
        if root:
            self._reset(self.max_mini_shards)
        self._barrier()

    def _barrier(self):
        """A polled barrier; with ``check``, the failure probe runs between polls (a revoked job leaves it)."""
        if self._check is None:
            polled_barrier(self.comm)
            return
        request = self.comm.Ibarrier()
        while not request.Test():
            self._check()
            time.sleep(_POLL)

    def _reset(self, n):
        """Zero the counter and the first n flags and backup counts (rank 0, through RMA inside its epoch)."""
        zeros = self._zeros[:n]  # a view of an attribute: alive until the Flushes below, and after
        self._counter.Put(zeros[:1], 0, target=(0, 1, MPI.INT64_T))
        self._flags.Put(zeros, 0, target=(0, n, MPI.INT64_T))
        self._flags.Put(zeros, 0, target=(self.max_mini_shards, n, MPI.INT64_T))
        self._counter.Flush(0)
        self._flags.Flush(0)

    def _fetch_add(self, win, disp, value=1, op=MPI.SUM):
        self._scratch[0] = value
        win.Fetch_and_op(self._scratch, self._result, 0, disp, op=op)
        win.Flush(0)
        return int(self._result[0])

    def _read_flags(self, n):
        """Atomically read (done flags, backup counts) of the first n mini-shards."""
        out = numpy.zeros(2 * self.max_mini_shards, dtype=numpy.int64)
        dummy = numpy.zeros_like(out)
        # Get_accumulate with NO_OP: an atomic read, safe against concurrent Compare_and_swap (a Get is not).
        self._flags.Get_accumulate(dummy, out, 0, target=(0, out.size, MPI.INT64_T), op=MPI.NO_OP)
        self._flags.Flush(0)
        return out[:n], out[self.max_mini_shards:self.max_mini_shards + n]

    def _is_done(self, i):
        return self._fetch_add(self._flags, i, 0, op=MPI.NO_OP) != 0

    def _claim_finish(self, i):
        """Compare_and_swap flag i from 0 to rank+1; True when this copy is the first to finish."""
        self._flags.Compare_and_swap(self._mine, self._compare, self._result, 0, i)
        self._flags.Flush(0)
        return int(self._result[0]) == 0

    def _claim_backup(self, i) -> bool:
        """Ask for a backup copy of mini-shard i; True when this rank may launch it.

        The atomic increment returns the count before it, so exactly the first ``max_backups`` askers get a number
        below the limit, however many read the flags at the same moment (reading and then deciding would let every
        reader of a stale count launch one).  The count keeps growing past the limit; it is only compared.
        """
        return self._fetch_add(self._flags, self.max_mini_shards + i) < self.max_backups

    # -- work ---------------------------------------------------------------------------------------------------

    def _straggle(self, seconds, i, dynamic):
        """Sleep ``seconds`` (a simulated slow rank), stopping early once another copy of mini-shard i won."""
        end = time.perf_counter() + seconds
        while True:
            left = end - time.perf_counter()
            if left <= 0:
                return True
            if dynamic and self._is_done(i):
                return False
            time.sleep(min(left, _SLOW_SLICE))

    def _copy(self, i, compute, accept, stats, *, backup, dynamic=True):
        t0 = time.perf_counter()
        result = compute(i)
        stats.computed += 1
        if self.slow_factor > 1:
            alive = self._straggle((self.slow_factor - 1.0) * (time.perf_counter() - t0), i, dynamic)
        else:
            alive = True
        if alive and (not dynamic or self._claim_finish(i)):
            accept(i, result)
            stats.done += 1
        elif backup:
            stats.backups_discarded += 1
        else:
            stats.originals_lost += 1

    def run_batch(self, n_mini_shards: int, compute, accept) -> BatchStats:
        """Process mini-shards 0..n-1 over all ranks; collective.  Return this rank's BatchStats.

        ``compute(i)`` computes mini-shard i and returns a result; ``accept(i, result)`` is called on the rank whose
        copy won, right after ``compute`` and before this rank computes anything else, so ``result`` may be a view
        of a buffer the next ``compute`` overwrites.  Each i is accepted exactly once over all ranks.
        """
        if not 1 <= n_mini_shards <= self.max_mini_shards:
            raise ValueError(f"a batch needs 1..{self.max_mini_shards} mini-shards (the window size), "
                             f"got {n_mini_shards}")
        if self._abandoned:
            raise RuntimeError("MiniShardScheduler used after abandon()")
        stats = BatchStats()
        if self.schedule == "static":
            lo, hi = contiguous_bounds(n_mini_shards, self.comm.size, allow_empty=True)[self.comm.rank]
            for i in range(lo, hi):
                self._copy(i, compute, accept, stats, backup=False, dynamic=False)
            return stats
        if self._counter is None:
            raise RuntimeError("MiniShardScheduler used after free()")
        # Nobody may still be reading the previous batch's flags when rank 0 clears them, nor claim before it has.
        self._barrier()
        if self.comm.rank == 0:
            self._reset(n_mini_shards)
        self._barrier()
        while True:
            if self._check is not None:
                self._check()
            i = self._fetch_add(self._counter, 0)
            if i >= n_mini_shards:
                break
            self._copy(i, compute, accept, stats, backup=False)
        # Everything is claimed: back up unfinished mini-shards, least backed-up first, spread by rank.
        while True:
            done, backups = self._read_flags(n_mini_shards)
            unfinished = numpy.flatnonzero(done == 0)
            if unfinished.size == 0:
                break
            open_ = unfinished[backups[unfinished] < self.max_backups]
            if self._check is not None:
                self._check()
            if open_.size == 0:
                time.sleep(_POLL)
                continue
            fewest = open_[backups[open_] == backups[open_].min()]
            i = int(fewest[self.comm.rank % fewest.size])
            if not self._claim_backup(i):
                continue  # others took the last backups of i: look again
            stats.launched += 1
            self._copy(i, compute, accept, stats, backup=True)
        return stats

    # -- lifetime -----------------------------------------------------------------------------------------------

    def free(self):
        """Release the windows and stop the progress thread (collective; calling it again does nothing)."""
        if self._counter is not None:
            polled_barrier(self.comm)  # no rank may still be in an RMA call on the windows
            self._counter.Unlock_all()
            self._flags.Unlock_all()
            if self._progress is not None:
                # Stop the thread before freeing: Win.Free synchronises, and the thread's comm goes away after.
                self._progress.stop()
                self._progress = None
            self._progress_comm.Free()
            self._counter.Free()
            self._flags.Free()
            self._counter = self._flags = None
        if self.comm != MPI.COMM_NULL:
            self.comm.Free()

    def _abandon(self):
        # leaving by an exception (WindowOwner): no collective free, only rank 0's progress thread stops
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def abandon(self):
        """After a rank died: stop the progress thread and never touch the windows again (their free is
        collective over a communicator that holds a dead rank); later calls raise RuntimeError."""
        self._abandon()
        self._counter = self._flags = None
        self._abandoned = True
