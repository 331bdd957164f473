"""End a rank whose main thread is stuck inside one MPI one-sided call after a peer died, so the job never hangs.

Under Open MPI's ``osc/sm`` (ranks of one host) an ``MPI_Accumulate``, ``Get_accumulate`` or ``Fetch_and_op`` takes
a spin lock on its target in shared memory.  A rank killed while it holds the lock never releases it, and every
later accumulate to that target spins inside MPI for ever: no safe point is reached, so no recovery starts
(docs/FAULT_TOLERANCE.md, "Limits").  Nothing can release the lock from outside, but the stuck rank can leave:
then it is one more dead rank, which the others run through (a worker) or which ends the job with the resume hint
(rank 0, exit 3 on the survivors).

``StuckCallGuard`` is a daemon thread that samples where the main thread is (``sys._current_frames``) every second.
When the innermost frame of the main thread is one of the RMA modules' (``RMA_FILES``) and has not moved for
``limit`` seconds, it asks MPI whether a rank of the communicator has died (an ``Iprobe`` from this thread lets
Open MPI's failure detector report it while the main thread spins; then ``Get_failed``) and, if one has, prints one
error line and SIGKILLs this process: a vanished process is what ULFM runs through (a non-zero exit would make
Open MPI's launcher end the whole job).  A long call with every rank alive (a large fetch over a slow
network) is never ended.  ``pause()``/``resume()`` bracket a recovery, which has its own timer.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

from mpi4py import MPI

__all__ = ["StuckCallGuard", "RMA_FILES"]

# The modules whose functions make the store's calls: the one-sided ones that take osc/sm's lock, and the served
# store's waits for a reply (path endings).
RMA_FILES = (os.path.join("store", "sharded.py"), os.path.join("store", "served.py"), os.path.join("rma", "counter.py"),
             os.path.join("rma", "board.py"), os.path.join("rma", "heartbeats.py"))
_SAMPLE_S = 1.0


def _where(frame, files):
    """(file, line, function, frame id) of ``frame`` when its code is in one of ``files``, else None."""
    if frame is None or not frame.f_code.co_filename.endswith(files):
        return None
    return frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name, id(frame), frame.f_lasti


class StuckCallGuard:
    """See the module docstring.  ``comm()`` returns the communicator whose dead ranks count (it changes with each
    recovery); ``world_ranks()`` maps its ranks to the ranks the run started with; ``resume_hint()`` ends the
    message.  Start it from the main thread."""

    def __init__(self, comm, world_ranks, *, limit: float, resume_hint=lambda: "", files=RMA_FILES):
        self._comm = comm
        self._world_ranks = world_ranks
        self._limit = float(limit)
        self._resume_hint = resume_hint
        self._files = tuple(files)
        self._main = threading.main_thread().ident
        self._paused = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="asyncsgd-stuck-call-guard", daemon=True)
        self._thread.start()

    def pause(self):
        self._paused.set()

    def resume(self):
        self._paused.clear()

    def stop(self):
        self._done.set()

    def _run(self):
        seen, since = None, time.monotonic()
        while not self._done.wait(_SAMPLE_S):
            now = time.monotonic()
            where = None if self._paused.is_set() else _where(sys._current_frames().get(self._main), self._files)
            if where is None or where != seen:
                seen, since = where, now
                continue
            stuck = now - since
            if stuck < min(5.0, self._limit):
                continue
            dead = self._dead_ranks()  # probed from the second 5 on, so the detector has reported by the limit
            if stuck >= self._limit and dead and not self._paused.is_set() and not self._done.is_set():
                self._end(where, stuck, dead)

    def _dead_ranks(self) -> list:
        comm = self._comm()
        try:
            comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)  # progress: the failure detector reports from here
        except MPI.Exception:
            pass  # a pending failure raises here; Get_failed below says which rank
        try:
            failed = comm.Get_failed()
        except MPI.Exception:
            return []
        group = comm.Get_group()
        try:
            ranks = MPI.Group.Translate_ranks(failed, list(range(failed.Get_size())), group)
        finally:
            failed.Free()
            group.Free()
        world = self._world_ranks()
        return sorted(world[r] for r in ranks if r != MPI.UNDEFINED and r < len(world))

    def _end(self, where, stuck, dead):
        path, line, func = where[:3]
        me = self._world_ranks()[self._comm().rank]
        sys.stderr.write(
            f"asyncsgd: error: rank {me} has been inside one MPI one-sided call ({os.path.basename(path)}:{line}, "
            f"{func}) for {stuck:.0f} s while rank(s) {', '.join(map(str, dead))} are dead: a rank killed inside an "
            f"MPI_Accumulate leaves its target's lock taken (Open MPI's osc/sm and osc/rdma; docs/FAULT_TOLERANCE.md); this "
            f"rank SIGKILLs itself so the others can go on{self._resume_hint()}\n")
        sys.stderr.flush()
        sys.stdout.flush()
        time.sleep(0.05)  # let the launcher forward the line
        os.kill(os.getpid(), signal.SIGKILL)
