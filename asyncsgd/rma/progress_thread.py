"""Keep passive-target RMA moving on a rank that hosts windows while it computes.

Measured on the project's machines (docs/MPI.md): with MPICH 5 from PyPI a passive-target operation
aimed at a rank that is busy outside MPI waits until that rank next enters the library (1.8 s in a 2 s busy test).
A thread that calls ``Iprobe`` on a private communicator and sleeps 1 ms in between gives every such operation a
progress engine within 1-2 ms, at no measurable cost to the rank's own work.  Open MPI 5 progresses allocated
windows by itself; the thread is harmless there.  Within one node both PyPI MPIs carry ``Get`` / ``Accumulate`` /
``Get_accumulate`` on allocated windows through shared memory without the target (``benchmarks/bench_rma.py``
times them with the host's thread stopped and sees no stall); the thread is for targets reached over a network.
``MPICH_ASYNC_PROGRESS=1`` is no substitute: it spins a thread per rank and made everything 7x slower when ranks
outnumber cores.
"""
from __future__ import annotations

import atexit
import threading

from mpi4py import MPI

__all__ = ["ProgressThread"]


class ProgressThread:
    """Poll ``comm`` with ``Iprobe`` every ``interval`` seconds from a daemon thread until ``stop()``.

    ``comm`` must be private to this thread's owner (a ``Dup``): the probe never receives, so it cannot steal a
    message, but a private communicator keeps the poll out of the owner's matching queues altogether.
    Needs ``MPI_THREAD_MULTIPLE``, which mpi4py asks for by default and both PyPI MPIs grant.
    """

    def __init__(self, comm, *, interval: float = 0.001):
        if not interval > 0:
            raise ValueError(f"interval must be a positive number of seconds, got {interval!r}")
        self._comm = comm
        self._interval = float(interval)
        self._stopping = threading.Event()
        self._thread = None
        self.polls = 0
        self.failed = False  # the thread stopped because a rank of its communicator died (ULFM)

    def start(self) -> "ProgressThread":
        """Start polling; raise RuntimeError when MPI was not initialised with MPI_THREAD_MULTIPLE."""
        if self._thread is not None:
            raise RuntimeError("ProgressThread already started")
        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            raise RuntimeError("the RMA progress thread needs MPI_THREAD_MULTIPLE; leave mpi4py.rc.thread_level "
                               "at its default ('multiple')")
        self._thread = threading.Thread(target=self._run, name="asyncsgd-rma-progress", daemon=True)
        self._thread.start()
        # Stop before mpi4py's own exit hook finalizes MPI (atexit runs hooks last-registered first), so a store
        # that was never freed does not leave a thread calling MPI after MPI_Finalize.
        atexit.register(self.stop)
        return self

    def _run(self):
        comm, stopping, interval = self._comm, self._stopping, self._interval
        while not stopping.is_set():
            try:
                comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)
            except MPI.Exception as exc:
                from asyncsgd.ulfm.primitives import is_failure
                if not is_failure(comm, exc):
                    raise
                # A rank of the job died (ULFM reports it to every probe from now on): the store is about to be
                # abandoned and rebuilt on the survivors (asyncsgd.store.rebuild); stop quietly.
                self.failed = True
                return
            self.polls += 1
            stopping.wait(interval)

    @property
    def running(self) -> bool:
        """True while the polling thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self):
        """Stop polling and join the thread; calling it again does nothing."""
        if self._thread is None:
            return
        self._stopping.set()
        self._thread.join()
        self._thread = None
        atexit.unregister(self.stop)
