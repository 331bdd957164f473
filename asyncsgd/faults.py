"""Fault injection for tests: raise an exception at a named point of a run, on one rank (like ``--slow-ranks``,
a test tool, not a training option).

``ASYNCSGD_FAULT=POINT@RANK[:N]`` (several, comma-separated) makes rank RANK of the job raise ``InjectedFault``
(an OSError, like the I/O errors real runs meet) the N-th time (default 1) it passes ``fault_point(POINT)``.
The variable is read once per process; RANK is the rank in the job's world (0 in a run without mpiexec).

Points (each one line in the code it names):

- ``data``: reading training or test rows (``DataSource.train_range`` / ``test_set``);
- ``step``: a replica's gradient computation (every SGD mode);
- ``fetch``, ``push``: a Downpour worker's fetch from, and push to, the parameter store;
- ``minishard``: a Sandblaster replica computing one mini-shard; ``coordinator``: rank 0's per-iteration work;
- ``evaluate``: test-set evaluation (rank 0 in serial, sync and downpour; every rank's slice in sandblaster);
- ``checkpoint``: writing a checkpoint file;
- ``end``: the end of a mode's run, after training, before its final synchronisation;
- ``heartbeat``: the watchdog's heartbeat thread (an exception outside the main thread).

``tests/test_failures.py`` uses it to check that an exception anywhere ends the whole job with its traceback.
"""
from __future__ import annotations

import os
import sys

__all__ = ["InjectedFault", "fault_point", "parse_faults", "POINTS", "ENV"]

ENV = "ASYNCSGD_FAULT"
POINTS = ("data", "step", "fetch", "push", "minishard", "coordinator", "evaluate", "checkpoint", "end", "heartbeat")


class InjectedFault(OSError):
    """The exception ``ASYNCSGD_FAULT`` raises (an OSError, as a failing disk or network would)."""


def parse_faults(text: str) -> dict:
    """Parse ``POINT@RANK[:N],...`` into {(point, rank): n}; raise ValueError naming a bad entry."""
    faults = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        point, _, where = entry.partition("@")
        rank, _, nth = where.partition(":")
        if point not in POINTS or not rank.isdigit() or not (nth == "" or (nth.isdigit() and int(nth) >= 1)):
            raise ValueError(f"{ENV}: bad entry {entry!r}; use POINT@RANK[:N] with POINT one of "
                             f"{', '.join(POINTS)}, RANK a world rank and N >= 1")
        faults[(point, int(rank))] = int(nth or 1)
    return faults


_faults = None   # {(point, rank): n}, parsed on the first fault_point call
_passes = {}     # point -> how often this process passed it
_rank = None


def _world_rank() -> int:
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        return mpi.COMM_WORLD.Get_rank()
    return 0


def fault_point(point: str):
    """Count one pass of ``point`` on this rank; raise InjectedFault if ``ASYNCSGD_FAULT`` names this pass."""
    global _faults, _rank
    if _faults is None:
        _faults = parse_faults(os.environ.get(ENV, ""))
    if not _faults:
        return
    if _rank is None:
        _rank = _world_rank()
    nth = _faults.get((point, _rank))
    if nth is None:
        return
    _passes[point] = _passes.get(point, 0) + 1
    if _passes[point] == nth:
        # A notice apart from the traceback, so a test can time the job's end from the moment of the fault.
        sys.stderr.write(f"asyncsgd: {ENV} fires: point {point}, rank {_rank}, pass {nth}\n")
        sys.stderr.flush()
        raise InjectedFault(f"test fault injected at point '{point}' on rank {_rank} (pass {nth})")
