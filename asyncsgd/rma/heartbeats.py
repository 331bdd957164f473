"""Heartbeats in one RMA window: one int64 per rank on ``root``; each rank bumps its own one-sidedly, ``root`` finds
the ranks whose counter stopped moving.

Fault-tolerant Downpour (``asyncsgd.algorithms.downpour.recovery``) beats at its safe points and lets rank 0 SIGKILL
a rank that stopped (a SIGSTOPped process is alive to MPI; ``asyncsgd.ulfm.processes.kill_rank``).  Unlike the
watchdog's point-to-point heartbeats (``asyncsgd.runtime.watchdog``), nothing here runs in a thread.
"""
from __future__ import annotations

import os
import socket
import time

import numpy
from mpi4py import MPI

from asyncsgd.rma.owner import WindowOwner

__all__ = ["Heartbeats"]


class Heartbeats(WindowOwner):
    """One int64 per rank on ``root`` of ``comm``: each rank bumps its own, ``root`` finds ranks that stopped.

    Collective construction (it also gathers every rank's ``(host, pid)`` into ``where``, for ``kill_rank``).  The
    caller owns ``comm`` and keeps it alive until ``free()``.  After a failure the window is not freed (a collective
    with a dead rank): ``abandon()`` it and build a new one on the shrunk communicator.
    """

    def __init__(self, comm, *, root: int = 0):
        self._own(comm)
        self.comm = comm
        self.root = root
        self.where = comm.allgather((socket.gethostname(), os.getpid()))
        size = comm.size if comm.rank == root else 0
        self._win = MPI.Win.Allocate(size * 8, 8, comm=comm)
        if comm.rank == root:
            zeros = numpy.zeros(comm.size, numpy.int64)
            self._win.Lock(root, MPI.LOCK_EXCLUSIVE)
            self._win.Put([zeros, MPI.INT64_T], root)
            self._win.Unlock(root)
        comm.Barrier()
        self._win.Lock_all(MPI.MODE_NOCHECK)
        self._count = numpy.zeros(1, numpy.int64)
        self._seen = numpy.zeros(comm.size, numpy.int64)
        self._changed = [time.monotonic()] * comm.size

    def beat(self):
        """Tell ``root`` this rank is alive: a ``Put`` of its own counter (root's own is never read).

        ``Put``, not an accumulate: each slot has one writer, so nothing needs the element-wise atomicity of an
        accumulate, and an accumulate takes the target's lock (osc/sm, osc/rdma), which a rank killed inside one
        would leave taken, hanging every later beat (measured on the multi-node cluster)."""
        if self.comm.rank == self.root:
            return
        self._count += 1
        self._win.Put([self._count, MPI.INT64_T], self.root, (self.comm.rank, 1, MPI.INT64_T))
        self._win.Flush(self.root)

    def stale(self, timeout: float) -> list:
        """On ``root``: the ranks whose counter has not moved for ``timeout`` seconds (root itself excluded).  Root
        reads its own window memory (no MPI call, no lock); an aligned int64 is read whole."""
        now = numpy.frombuffer(self._win.tomemory(), numpy.int64)[:self.comm.size].copy()
        t = time.monotonic()
        out = []
        for r in range(self.comm.size):
            if now[r] != self._seen[r]:
                self._seen[r] = now[r]
                self._changed[r] = t
            elif r != self.root and t - self._changed[r] > timeout:
                out.append(r)
        return out

    def abandon(self):
        """Stop using the window without freeing it (its communicator may hold a dead rank)."""
        self._win = None

    def free(self):
        """Close the epoch and free the window (collective over ``comm``: only when no rank of it died); calling it
        again, or after ``abandon()``, does nothing."""
        if self._win is None:
            return
        self._win.Unlock_all()
        self._win.Free()
        self._win = None
