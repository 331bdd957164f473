"""Fault injection for tests: raise an exception at a named point of a run, on one rank (like ``--slow-ranks``,
a test tool, not a training option).

``ASYNCSGD_FAULT=POINT@RANK[:N]`` (several, comma-separated) makes rank RANK of the job raise ``InjectedFault``
(an OSError, like the I/O errors real runs meet) the N-th time (default 1) it passes ``fault_point(POINT)``.
The variable is read once per process; RANK is the rank in the job's world (0 in a run without mpiexec).
``POINT@RANK[:N]=kill`` SIGKILLs that rank there instead (a vanished process, what fault tolerance runs through),
``=stop`` SIGSTOPs it (a hung process);
``=kill:VICTIM`` makes it kill world rank VICTIM (through the killer the fault-tolerant trainer registers with
``set_killer``), wait 1 s, still inside the point, and go on: a death while RANK is, say, writing a checkpoint.
VICTIM dies between two Python bytecodes of its main thread, never inside an MPI call (``victims()`` tells the
trainer which ranks prepare for it: ``asyncsgd.testing.kill``).

Points (each one line in the code it names):

- ``data``: reading training or test rows (``DataSource.train_range`` / ``test_set``);
- ``step``: a replica's gradient computation (every SGD mode);
- ``conv``: one batch part of a fused convolution + max pool's forward pass (NumpyOps; a part runs on an intra-op
  thread when the ops have several, and the C kernels run inside it where they are built);
- ``fetch``, ``push``: a Downpour worker's fetch from, and push to, the parameter store;
- ``minishard``: a Sandblaster replica computing one mini-shard; ``coordinator``: rank 0's per-iteration work;
- ``evaluate``: test-set evaluation (rank 0 in serial, sync and downpour; every rank's slice in sandblaster);
- ``checkpoint``: writing a checkpoint file (its start); ``checkpoint_write``: after each array written into the
  temporary file (the previous checkpoint is still the file at its path);
- ``recover``: a Downpour rank inside a fault-tolerant recovery (pass 1 after the shrink, before the store's
  rebuild; pass 2 after the rebuild, before the new job board);
- ``end``: the end of a mode's run, after training, before its final synchronisation;
- ``heartbeat``: the watchdog's heartbeat thread (an exception outside the main thread).

``tests/runtime/test_faults.py`` uses it to check that an exception anywhere ends the whole job with its traceback.
"""
from __future__ import annotations

import os
import signal
import sys
import time

from asyncsgd.runtime.env import FAULT_ENV, fault_spec

__all__ = ["InjectedFault", "fault_point", "parse_faults", "set_killer", "victims", "POINTS", "ENV"]

ENV = FAULT_ENV
POINTS = ("data", "step", "conv", "fetch", "push", "minishard", "coordinator", "evaluate", "checkpoint", "checkpoint_write",
          "end", "heartbeat", "recover")


class InjectedFault(OSError):
    """The exception ``ASYNCSGD_FAULT`` raises (an OSError, as a failing disk or network would)."""


def parse_faults(text: str) -> dict:
    """Parse ``POINT@RANK[:N][=kill[:VICTIM]],...`` into {(point, rank): n}; raise ValueError naming a bad entry."""
    return {key: nth for key, (nth, _) in _parse(text).items()}


def _parse(text: str) -> dict:
    """{(point, rank): (n, action)}, action None (raise), 'kill', 'stop' or ('kill', victim)."""
    faults = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        spec, _, action = entry.partition("=")
        point, _, where = spec.partition("@")
        rank, _, nth = where.partition(":")
        verb, _, victim = action.partition(":")
        if (point not in POINTS or not rank.isdigit() or not (nth == "" or (nth.isdigit() and int(nth) >= 1))
                or (action and not (action == "stop" or (verb == "kill" and (victim == "" or victim.isdigit()))))):
            raise ValueError(f"{ENV}: bad entry {entry!r}; use POINT@RANK[:N][=kill[:VICTIM]|=stop] with POINT one of "
                             f"{', '.join(POINTS)}, RANK and VICTIM world ranks and N >= 1")
        faults[(point, int(rank))] = (int(nth or 1), None if not action else action if not victim
                                      else ("kill", int(victim)))
    return faults


_killer = None  # world rank -> bool (signal sent), registered by the fault-tolerant trainer


def victims() -> set:
    """The world ranks that ``ASYNCSGD_FAULT``'s ``=kill:VICTIM`` entries name (parsed again: cheap, once per run)."""
    return {action[1] for _, action in _parse(fault_spec()).values() if isinstance(action, tuple)}


def set_killer(killer):
    """Register how ``=kill:VICTIM`` kills another rank: ``killer(world_rank) -> bool`` (None: unregister)."""
    global _killer
    _killer = killer


_faults = None   # {(point, rank): (n, action)}, parsed on the first fault_point call
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
        _faults = _parse(fault_spec())
    if not _faults:
        return
    if _rank is None:
        _rank = _world_rank()
    fault = _faults.get((point, _rank))
    if fault is None:
        return
    nth, action = fault
    _passes[point] = _passes.get(point, 0) + 1
    if _passes[point] == nth:
        # A notice apart from the traceback, so a test can time the job's end from the moment of the fault.
        what = ("" if action is None else " (SIGKILL itself)" if action == "kill" else " (SIGSTOP itself)"
                if action == "stop" else f" (SIGKILL rank {action[1]})")
        sys.stderr.write(f"asyncsgd: {ENV} fires: point {point}, rank {_rank}, pass {nth}{what}\n")
        sys.stderr.flush()
        if action in ("kill", "stop"):
            time.sleep(0.05)  # let the launcher forward the line
            os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGSTOP)
            return  # stopped, then continued: go on
        if action is not None:
            if _killer is None or not _killer(action[1]):
                raise InjectedFault(f"{ENV}: point '{point}' on rank {_rank} could not kill rank {action[1]} (no "
                                    f"fault-tolerant trainer registered a killer, or the rank is on another host)")
            time.sleep(1.0)  # the death lands while this rank is still inside the point
            return
        raise InjectedFault(f"test fault injected at point '{point}' on rank {_rank} (pass {nth})")
