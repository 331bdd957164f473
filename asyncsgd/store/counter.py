"""The store's global version counter: one int64 on one rank, bumped and read with atomic ``Fetch_and_op``.

Every push takes a ticket (``Fetch_and_op(+1, SUM)``) before it moves data, and every fetch reads the counter
(``Fetch_and_op(NO_OP)``) before it reads data, so ``ticket - version_at_fetch`` counts exactly the pushes that
started after the fetch began: the staleness tau of DistBelief / Chan & Lane (an over-count never an under-count
when a push is still landing while a fetch reads).
"""
from __future__ import annotations

import numpy
from mpi4py import MPI

from ..mpiutil import polled_barrier
from .owner import WindowOwner

__all__ = ["VersionCounter"]


class VersionCounter(WindowOwner):
    """One int64 hosted on ``root`` of ``comm``; any rank takes a ticket or reads it without the host's CPU.

    Collective over ``comm`` (construction and ``free()``); the caller owns ``comm`` and keeps it alive until
    ``free()``.  Every rank holds a shared passive epoch (``Lock_all``) on the window for the counter's lifetime.
    """

    def __init__(self, comm, *, root: int = 0):
        if not 0 <= root < comm.size:
            raise ValueError(f"root={root} is not a rank of a communicator of size {comm.size}")
        self._own(comm)
        self._root = root
        self._one = numpy.ones(1, dtype=numpy.int64)
        self._result = numpy.zeros(1, dtype=numpy.int64)
        itemsize = self._one.itemsize
        self._win = MPI.Win.Allocate(itemsize if comm.rank == root else 0, itemsize, comm=comm)
        if comm.rank == root:
            # Window memory starts undefined: zero it through RMA, then let nobody in before the barrier.
            zero = numpy.zeros(1, dtype=numpy.int64)  # named: the origin buffer must live until Unlock
            self._win.Lock(root, MPI.LOCK_EXCLUSIVE)
            self._win.Put([zero, MPI.INT64_T], root, (0, 1, MPI.INT64_T))
            self._win.Unlock(root)
        polled_barrier(comm)
        self._win.Lock_all(MPI.MODE_NOCHECK)

    def take(self) -> int:
        """Add one atomically; return the value before the increment."""
        self._win.Fetch_and_op([self._one, MPI.INT64_T], [self._result, MPI.INT64_T], self._root, 0, MPI.SUM)
        self._win.Flush(self._root)
        return int(self._result[0])

    def read(self) -> int:
        """Return the current value (an atomic read)."""
        self._win.Fetch_and_op([self._one, MPI.INT64_T], [self._result, MPI.INT64_T], self._root, 0, MPI.NO_OP)
        self._win.Flush(self._root)
        return int(self._result[0])

    def free(self):
        """Close the epoch and free the window (collective); calling it again does nothing."""
        if self._win == MPI.WIN_NULL:
            return
        self._win.Unlock_all()
        self._win.Free()
