"""A request to end a training run early and cleanly: the job's time limit is near, or it is being cancelled.

``--stop-file PATH`` (Downpour) names a file whose appearance is the request.  Rank 0 polls for it in its monitor
loop (``asyncsgd.algorithms.downpour.monitor``); on the request it raises the job board's stop flag, every worker
ends its step and reports, rank 0 writes the final checkpoint (atomically: ``asyncsgd.io.checkpoint``) and the
summary records ``"stop_reason": "preempted"``; the trainer exits 0.  A later run with ``--resume auto`` continues
from that checkpoint, with the epoch budget counted across both runs.

Why a file and not a signal: a signal reaching a rank already means something else.  Open MPI's ``mpiexec`` sends
SIGTERM to the survivors when a rank dies, MPICH's ``mpiexec -disable-auto-cleanup`` sends SIGUSR1
(``asyncsgd.runtime.watchdog``).  SLURM's warning before the time limit (``#SBATCH --signal=B:USR1@60``) goes to the
batch shell only, and the job scripts in ``jobs/`` turn it into the stop file, which means one thing.

A SIGTERM that reaches the ranks themselves (``scancel``, the time limit without a warning, preemption; SLURM sends
SIGKILL ``KillWait`` seconds later) is a stop request too when the run has a stop file and no rank on this host has
died: the watchdog's handler calls ``signalled`` on the request made ``active`` by rank 0's monitor loop.  (Under
Open MPI's ``mpiexec`` a rank dead on another host also arrives as SIGTERM; taken as a stop request, the job still
ends: the launcher kills the ranks, or the heartbeats name the dead rank.)
"""
from __future__ import annotations

import contextlib
import os
import time

__all__ = ["PREEMPTED", "StopRequest", "active", "activated", "stop_file_problem"]

PREEMPTED = "preempted"  # the summary's stop_reason of a run ended by a stop request
POLL_S = 0.5  # how often rank 0 looks for the file (an os.stat; the monitor loop runs every 0.05 s)

_active = None  # the StopRequest of the run in progress in this process (rank 0's monitor loop), or None


def stop_file_problem(path) -> str | None:
    """Why ``path`` cannot be a stop file (None when it can): empty, a folder, or in a folder that does not exist."""
    if not isinstance(path, str) or not path:
        return "must be a file path"
    if os.path.isdir(path):
        return f"{path} is a folder; name a file in it (e.g. {os.path.join(path, 'stop-request')})"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"folder {folder} does not exist"
    return None


class StopRequest:
    """The stop request of one run: ``requested()`` is True once ``path`` exists or ``signalled`` was called."""

    def __init__(self, path: str, *, poll_s: float = POLL_S):
        self.path = os.fspath(path)
        self.poll_s = poll_s
        self.signal_name = None  # the signal that asked (None: the file, or nothing yet)
        self._seen = False
        self._next_poll = 0.0

    def requested(self) -> bool:
        """True once the stop file exists (looked for at most every ``poll_s`` seconds) or a signal asked."""
        if self._seen:
            return True
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + self.poll_s
            self._seen = os.path.exists(self.path)
        return self._seen

    def signalled(self, name: str) -> None:
        """Record a stop request by a signal (called from a signal handler: sets two attributes, nothing else)."""
        self.signal_name = name
        self._seen = True

    def clear(self) -> None:
        """Remove the stop file once the request is honoured, so that it does not stop the next run at once."""
        try:
            os.remove(self.path)
        except OSError:
            pass

    def describe(self) -> str:
        return f"{self.signal_name} received" if self.signal_name else f"{self.path} appeared"


def active() -> StopRequest | None:
    """The stop request of the run in progress in this process, or None."""
    return _active


@contextlib.contextmanager
def activated(request: StopRequest | None):
    """Make ``request`` the process's active stop request for the ``with`` block (None: leave it as it is)."""
    global _active
    if request is None:
        yield None
        return
    previous, _active = _active, request
    try:
        yield request
    finally:
        _active = previous
