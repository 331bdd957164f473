"""MPI helpers shared by every role: waiting without spinning, failing as one job, errors from rank 0.

Facts that shaped this module (../DESIGN.md, measured on 2-core machines): a rank blocked in an MPICH call spins and
slows a computing neighbour 3-4x when ranks outnumber cores, so long waits poll a non-blocking operation with a short
sleep; and one rank failing before a collective hangs all others, so an uncaught exception aborts the whole job.
"""
from __future__ import annotations

import os
import sys
import time
import traceback

__all__ = ["UsageError", "wait", "polled_barrier", "polled_bcast", "install_abort_hook", "check_on_root",
           "local_rank", "EXIT_USAGE"]

EXIT_USAGE = 2
_POLL_SLEEP = 0.001


class UsageError(ValueError):
    """Bad input found before work starts: printed as one line by rank 0, exit status 2."""


def wait(request, *, timeout: float | None = None, sleep: float = _POLL_SLEEP, what: str = "MPI request"):
    """Complete ``request`` by polling ``Test`` with a short sleep; return its status flag result.

    Raises TimeoutError after ``timeout`` seconds (None waits for ever, but never spins).
    """
    start = time.monotonic()
    while True:
        done = request.Test()
        if done:
            return done
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"{what} did not complete within {timeout:.0f} s")
        time.sleep(sleep)


def polled_barrier(comm, *, timeout: float | None = None, sleep: float = _POLL_SLEEP):
    """A barrier that sleeps while it waits (``Ibarrier`` + ``Test``), so waiting ranks leave the cores to others."""
    wait(comm.Ibarrier(), timeout=timeout, sleep=sleep, what="barrier")


def polled_bcast(comm, obj, root: int = 0, *, timeout: float | None = None, sleep: float = _POLL_SLEEP):
    """Broadcast a picklable object from ``root`` while sleeping between polls; return it on every rank.

    Two buffer broadcasts (length, then pickled bytes), each completed by polling: mpi4py's lowercase
    object broadcast has no non-blocking form.
    """
    import pickle

    import numpy
    from mpi4py import MPI

    data = pickle.dumps(obj) if comm.rank == root else b""
    length = numpy.array([len(data)], dtype=numpy.int64)
    wait(comm.Ibcast([length, MPI.INT64_T], root=root), timeout=timeout, sleep=sleep, what="broadcast")
    buf = numpy.frombuffer(bytearray(data), dtype=numpy.uint8) if comm.rank == root else \
        numpy.empty(int(length[0]), dtype=numpy.uint8)
    wait(comm.Ibcast([buf, MPI.BYTE], root=root), timeout=timeout, sleep=sleep, what="broadcast")
    return obj if comm.rank == root else pickle.loads(buf.tobytes())


def check_on_root(comm, check, *, root: int = 0):
    """Run ``check()`` on ``root`` only and share its verdict: ``root`` gets the return value, every rank
    raises the same UsageError if it failed.

    Use it for validation that reads files or costs time: one rank does it, and either all ranks go on or all raise
    the same UsageError (rank 0 prints it; see ``asyncsgd.train``).
    """
    result = error = None
    if comm.rank == root:
        try:
            result = check()
        except (UsageError, ValueError, OSError) as exc:
            error = str(exc)
    error = polled_bcast(comm, error, root=root)
    if error is not None:
        raise UsageError(error)
    return result


def local_rank(comm) -> int:
    """Return this rank's index among the ranks of its node (for binding GPUs)."""
    from mpi4py import MPI
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.rank
    finally:
        node.Free()


def install_abort_hook(comm):
    """Make an uncaught exception on any rank print its traceback, rank-tagged, and abort the whole job.

    Without it one failing rank leaves the others blocked in their next collective or RMA epoch for ever.
    """
    def hook(exc_type, exc, tb):
        msg = "".join(traceback.format_exception(exc_type, exc, tb))
        sys.stderr.write(f"[asyncsgd rank {comm.rank}] fatal error, aborting the job:\n{msg}")
        sys.stderr.flush()
        if comm.size > 1:
            comm.Abort(1)
        os._exit(1)

    sys.excepthook = hook
    return hook
