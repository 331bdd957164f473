"""The processes behind ranks on this host: their state from ``/proc`` and SIGKILL for one that stopped.

A SIGSTOPped rank is not a failure to MPI (its daemon sees no exit), so a safe point or a shrink would wait for it
for ever: rank 0's heartbeat watch (``asyncsgd.rma.heartbeats``), the watchdog and a recovery's timer find a rank
that stopped and ``kill_rank`` / ``kill_local_process`` turn it into a real failure.  Ranks are given as
``(host, pid)`` pairs, as ``Heartbeats.where`` lists them.
"""
from __future__ import annotations

import os
import signal
import socket

__all__ = ["process_state", "starved", "stopped_local_ranks", "kill_local_process", "kill_rank", "STARVED_FACTOR"]

STARVED_FACTOR = 4  # a silent rank whose process is runnable gets this many heartbeat timeouts before a kill


def process_state(host: str, pid: int):
    """The state letter of process ``pid`` (``/proc/PID/stat``: R running, S sleeping, T stopped, Z zombie...) when
    it runs on this host; None elsewhere or when it is gone."""
    if host != socket.gethostname():
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def starved(host: str, pid: int, silent: float, timeout: float) -> bool:
    """Whether a rank silent for ``silent`` s should be given longer: its process on this host exists and is not
    stopped (state R or S: starved of CPU or of the GIL on an overloaded host, or hung) and it has been silent for
    less than ``STARVED_FACTOR * timeout``.  A stopped process (T) is killed at the first timeout.  Measured: at
    load average 50 on 2 cores, healthy ranks went 3 s and 15 s without a beat (in states R and S) and were killed."""
    if silent >= STARVED_FACTOR * timeout:
        return False
    return process_state(host, pid) not in (None, "T", "t", "Z", "X")


def stopped_local_ranks(where) -> list:
    """Ranks (indices of ``where``, ``Heartbeats.where``) whose process on this host is stopped (state T/t)."""
    return [rank for rank, (host, pid) in enumerate(where) if process_state(host, pid) in ("T", "t")]


def kill_local_process(host: str, pid: int, sig=signal.SIGKILL) -> bool:
    """SIGKILL (or send ``sig`` to) process ``pid`` if ``host`` is this host; return whether a signal was sent
    (False: elsewhere, or already gone)."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def kill_rank(heartbeats, rank: int) -> bool:
    """SIGKILL ``rank`` (of ``heartbeats.where``) if it runs on this host, so ULFM reports it dead; return whether a
    signal was sent.

    A stopped process cannot be shrunk away (it is alive to MPI); killing it is how it is excluded.  On another
    host this returns False (the job then relies on its safe-point timeout).
    """
    return kill_local_process(*heartbeats.where[rank])
