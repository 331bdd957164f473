"""The exit policy of every object that owns MPI windows or communicators (a ``with`` block around a collective
resource).

Leaving the block normally frees the resource: a collective call every rank makes at the same point.  Leaving it by
an exception must not: the exception happened on this rank only, the other ranks are computing, polling a window or
waiting in another collective, and a collective ``free()`` here would wait for them for ever, so the exception would
never reach the handler that ends the job (``asyncsgd.runtime.mpi.abort_on_error``) and the job would hang in silence.
So on an exception in a multi-rank job the owner only releases what is local to this rank (``_abandon``: stop its
threads) and lets the exception propagate; the job is about to be aborted, and MPI_Abort reclaims the windows.
In a one-rank job every collective completes at once, so the owner frees as usual.
"""
from __future__ import annotations

__all__ = ["WindowOwner"]


class WindowOwner:
    """Base of every window/communicator owner: ``with`` frees on success, abandons on an exception.

    Subclasses call ``_own(comm)`` in their constructor with the communicator ``free()`` is collective over,
    implement ``free()`` (collective, idempotent), and override ``_abandon()`` when they run threads of their own.
    """

    _owner_ranks = 1

    def _own(self, comm):
        """Record the size of the communicator ``free()`` is collective over (kept: the handle dies in free)."""
        self._owner_ranks = comm.size

    def free(self):
        raise NotImplementedError

    def _abandon(self):
        """Release what is local to this rank without any MPI call (default: nothing)."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and self._owner_ranks > 1:
            self._abandon()
            return False
        self.free()
        return False
