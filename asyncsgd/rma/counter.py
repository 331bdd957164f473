"""The store's push counters: two int64 on one rank, bumped and read with atomic ``Fetch_and_op``.

``started`` counts pushes that have taken a ticket (before their data moves); ``landed`` counts pushes whose data
is complete at every target (bumped only after the push's ``Flush``).  The store measures staleness with them:

- a fetch reads ``landed`` before its ``Get``s (every push counted there is wholly inside the fetched parameters) and
  ``started`` after them (every push that can be even partly inside them is counted there);
- a push takes its ticket from ``started`` before moving data, so its weight is known before the data moves.

``tau = ticket - landed_at_fetch - (own pushes since the fetch)``: the other workers' pushes that started before this
push and had not landed when the fetch began.  Never an under-count; an over-count only by pushes that landed
while the fetch was reading (``started_after_fetch - landed_at_fetch``, zero when no push overlapped the fetch).
See ``ShardedParameters.push`` for the full statement.
"""
from __future__ import annotations

import numpy
from mpi4py import MPI

from asyncsgd.runtime.mpi import polled_barrier
from asyncsgd.rma.owner import WindowOwner

__all__ = ["VersionCounter", "STARTED", "LANDED"]

STARTED, LANDED = 0, 1  # displacements of the two counters in the window


class VersionCounter(WindowOwner):
    """Two int64 (``started``, ``landed``) hosted on ``root`` of ``comm``; any rank bumps or reads them one-sidedly.

    Both start at ``initial`` (0; a rebuilt store continues its predecessor's count).
    Collective over ``comm`` (construction and ``free()``); the caller owns ``comm`` and keeps it alive until
    ``free()``.  Every rank holds a shared passive epoch (``Lock_all``) on the window for the counter's lifetime.
    Origin buffers are attributes: an RMA origin buffer must stay alive until the ``Flush`` that completes the call.
    """

    def __init__(self, comm, *, root: int = 0, initial: int = 0):
        if not 0 <= root < comm.size:
            raise ValueError(f"root={root} is not a rank of a communicator of size {comm.size}")
        if isinstance(initial, bool) or not isinstance(initial, (int, numpy.integer)) or initial < 0:
            raise ValueError(f"initial must be a non-negative int (the version to start from), got {initial!r}")
        self._own(comm)
        self._root = root
        self._one = numpy.ones(1, dtype=numpy.int64)
        self._result = numpy.zeros(1, dtype=numpy.int64)
        itemsize = self._one.itemsize
        self._win = MPI.Win.Allocate(2 * itemsize if comm.rank == root else 0, itemsize, comm=comm)
        if comm.rank == root:
            # Window memory starts undefined: zero it through RMA, then let nobody in before the barrier.
            zero = numpy.full(2, int(initial), dtype=numpy.int64)  # named: the origin buffer must live until Unlock
            self._win.Lock(root, MPI.LOCK_EXCLUSIVE)
            self._win.Put([zero, MPI.INT64_T], root, (0, 2, MPI.INT64_T))
            self._win.Unlock(root)
        polled_barrier(comm)
        self._win.Lock_all(MPI.MODE_NOCHECK)

    def _op(self, slot: int, op) -> int:
        self._win.Fetch_and_op([self._one, MPI.INT64_T], [self._result, MPI.INT64_T], self._root, slot, op)
        self._win.Flush(self._root)
        return int(self._result[0])

    def start(self) -> int:
        """Count a push as started; return how many had started before it (its ticket)."""
        return self._op(STARTED, MPI.SUM)

    def land(self) -> int:
        """Count a push as landed (call after its data is flushed); return how many had landed before it."""
        return self._op(LANDED, MPI.SUM)

    def started(self) -> int:
        """Return the number of pushes started so far (an atomic read)."""
        return self._op(STARTED, MPI.NO_OP)

    def landed(self) -> int:
        """Return the number of pushes landed so far (an atomic read)."""
        return self._op(LANDED, MPI.NO_OP)

    def read(self) -> int:
        """Return the number of pushes landed so far (the store's version)."""
        return self.landed()

    def free(self):
        """Close the epoch and free the window (collective); calling it again does nothing."""
        if self._win == MPI.WIN_NULL:
            return
        self._win.Unlock_all()
        self._win.Free()
