"""A Downpour worker's communication thread: its pushes (``--overlap push``) and fetches (``all``) travel while it
computes; ``asyncsgd.algorithms.downpour.worker`` says when each is submitted and waited for.

DistBelief runs a replica's fetch and push in threads weakly synchronised with its compute; this is the same with
one thread per worker, so the store object still serves one thread (``ShardedParameters``).  Calls run in the
order they were submitted: a fetch submitted after a push sees that push whole (the push is flushed and landed
before the fetch's ``Get``).  A push takes its staleness ticket when the thread starts it, as a blocking push does,
so tau keeps ``ShardedParameters.push``'s bound; errors raised in the thread are raised again by ``result()``.

Needs ``MPI_THREAD_MULTIPLE`` (the thread's RMA runs beside the worker's own MPI calls, e.g. the job board's):
``overlap_refusal`` says why overlap cannot run, and the worker then communicates inline.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from asyncsgd.options import OVERLAP  # what travels while the worker computes: nothing, its pushes, pushes and fetches

__all__ = ["CommThread", "OVERLAP", "overlap_mode", "overlap_refusal"]


def overlap_mode(value) -> str:
    """Return the overlap mode of ``value``: one of OVERLAP, or a bool (True = 'all', False = 'off')."""
    if isinstance(value, bool):
        return "all" if value else "off"
    if value not in OVERLAP:
        raise ValueError(f"overlap must be one of {', '.join(OVERLAP)}, got {value!r}")
    return value


def overlap_refusal(*, fault_tolerant: bool = False) -> str | None:
    """Return why a worker cannot overlap communication with compute here, or None when it can."""
    from mpi4py import MPI
    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        return ("MPI was initialised below MPI_THREAD_MULTIPLE (leave mpi4py.rc.thread_level at 'multiple'), so "
                "a communication thread may not call MPI beside the worker")
    if fault_tolerant:
        return ("fault tolerance replaces the store at safe points of the worker's own thread; its pushes stay "
                "inline")
    return None


class CommThread:
    """One thread running a worker's store calls in submission order; ``submit`` returns a Future.

    ``close()`` waits for what was submitted and ends the thread (idempotent).
    """

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncsgd-comm")
        self._closed = False
        self.calls_run = 0  # store calls this thread completed: the summary's proof that the overlap happened

    def _run(self, fn, args, kwargs):
        result = fn(*args, **kwargs)
        self.calls_run += 1  # only the comm thread writes it; the worker reads it after close() or for its stats
        return result

    def submit(self, fn, *args, **kwargs):
        """Run ``fn(*args, **kwargs)`` in the thread after everything submitted before; return its Future."""
        if self._closed:
            raise RuntimeError("CommThread used after close()")
        return self._pool.submit(self._run, fn, args, kwargs)

    def close(self):
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=True)
