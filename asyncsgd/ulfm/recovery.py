"""What every mode's run-through of a dead rank shares (Open MPI's ULFM, ``mpirun --with-ft ulfm``;
docs/FAULT_TOLERANCE.md): ``RecoveryBase``, with one subclass per kind of state a failure replaces (the State
pattern of Horovod's elastic training):

- Downpour's ``asyncsgd.algorithms.downpour.recovery.Recovery``: the parameter store, the job board, the heartbeats
  and this rank's role, rebuilt on the survivors at the loops' safe points;
- sync's and Sandblaster's ``asyncsgd.ulfm.replica_guard.ReplicaGuard``: every rank a replica, new rank 0's state
  broadcast to the survivors.

The base holds the private communicator the failure probe runs on (a ``Dup`` of the caller's, managed:
MPI errors come back as exceptions; the caller's own communicator when fault tolerance is off), tells a dead rank
from a program error, shrinks to the survivors and maps them to the ranks the run started with, ends the job (exit
3) when rank 0 died, logs each lost worker and times the recovery; ``RecoveryTimer`` bounds a whole recovery and
kills ranks that stop inside one.  Every wait of a recovery is bounded by ``WAIT_S``.
"""
from __future__ import annotations

import os
import sys
import threading
import time

from mpi4py import MPI

from asyncsgd.testing.kill import arm_self_kill
from asyncsgd.ulfm.primitives import RankFailure, end_after_root_loss, is_failure, manage, survivors
from asyncsgd.ulfm.processes import kill_local_process, stopped_local_ranks
from asyncsgd.ulfm.roles import rank_map

__all__ = ["RecoveryBase", "RecoveryTimer", "WAIT_S", "RECOVERY_LIMIT_S"]

WAIT_S = 120.0  # bound on every wait of a recovery or of the final meeting (s)
RECOVERY_LIMIT_S = 2 * WAIT_S + 60.0  # a whole recovery, retries included; past it the rank ends (exit 4)


class RecoveryTimer:
    """While a recovery runs: every ``timeout`` s (at most 5 s), SIGKILL the ranks of ``where`` (``(host, pid)`` per
    rank of the communicator being shrunk) on this host that are stopped (a SIGSTOPped rank is alive to MPI, so the
    shrink would wait for it for ever; killed, it is one more death the shrink runs through); past
    ``RECOVERY_LIMIT_S``, end this rank (exit 4).  Nobody beats or watches heartbeats during a recovery, hence this
    thread.  ``world_ranks`` names the ranks in messages; ``resume_hint()`` ends the exit message."""

    def __init__(self, where, world_ranks, rank: int, timeout: float, resume_hint):
        self._where = list(where)
        self._world = list(world_ranks)
        self._rank = rank
        self._timeout = timeout
        self._resume_hint = resume_hint
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="asyncsgd-recovery-timer", daemon=True)
        self._thread.start()

    def _run(self):
        killed = set()
        start = time.monotonic()
        while not self._done.wait(min(self._timeout, 5.0)):
            for r in stopped_local_ranks(self._where):
                if r not in killed and kill_local_process(*self._where[r]):
                    killed.add(r)
                    sys.stderr.write(f"asyncsgd: rank {self._world[r]} is stopped during a recovery: killed it\n")
                    sys.stderr.flush()
            if time.monotonic() - start > RECOVERY_LIMIT_S and not self._done.is_set():
                # Measured once under load 50: three survivors stayed in Shrink's agreement for minutes after two
                # ranks vanished.  Never hang: end this rank (every survivor's timer does the same), non-zero.
                sys.stderr.write(f"asyncsgd: error: rank {self._world[self._rank]}: the recovery did not complete "
                                 f"within {RECOVERY_LIMIT_S:.0f} s (stuck in MPI's shrink or a window allocation); "
                                 f"ending the job{self._resume_hint()}\n")
                sys.stderr.flush()
                sys.stdout.flush()
                os._exit(4)

    def cancel(self):
        self._done.set()


class RecoveryBase:
    """One run's fault-tolerance state and the recovery steps every mode shares (see the module docstring).

    ``comm`` is the run's communicator; ``start`` the ``time.monotonic()`` at which training started (``--kill-ranks``
    and the log count from it); ``kill_ranks`` the ``--kill-ranks`` table (world rank -> seconds), for the log.
    Subclasses word rank 0's message when rank 0 dies (``_root_lost_message``) and add their summary keys
    (``_summary_keys``).
    """

    def __init__(self, comm, *, enabled: bool, start: float, reporter=None, kill_ranks=None):
        self.enabled = enabled
        self.start = start
        self.reporter = reporter
        self.kill_ranks = dict(kill_ranks or {})
        self.world_ranks = list(range(comm.size))  # current rank -> rank at the start of the run
        self.lost_workers = []  # rank 0: the summary's entries
        self.recoveries = 0
        # private: nothing but the failure probe, the safe points and the recoveries run on it
        self._probe = manage(comm.Dup()) if enabled else comm

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    # ---------------------------------------------------------------- noticing

    def is_failure(self, exc) -> bool:
        """Whether ``exc`` (raised by an MPI call of this run) means a dead rank to recover from."""
        if not self.enabled:
            return False
        if isinstance(exc, RankFailure):
            return True
        return isinstance(exc, MPI.Exception) and is_failure(self._probe, exc)

    # ---------------------------------------------------------------- recovery steps

    def _shrink(self, old, comm, noticed):
        """Shrink ``comm`` to the survivors; return ``(new, failed)``, ``failed`` the dead ranks of ``old`` (the
        communicator at the start of this recovery: a retried shrink counts every death so far).  Rank 0 dead: its
        successor says so and every survivor exits (3)."""
        new, _ = survivors(comm)
        failed = sorted(r for r, now in rank_map(old, new).items() if now is None)
        if 0 in failed:
            self._root_lost(new, noticed)
        return new, failed

    def _forget(self, failed) -> list:
        """Drop the ``failed`` ranks (of the communicator before the shrink) from ``world_ranks``; return their
        ranks at the start of the run."""
        failed_world = [self.world_ranks[r] for r in failed]
        self.world_ranks = [w for r, w in enumerate(self.world_ranks) if r not in failed]
        return failed_world

    def _root_lost(self, new, noticed):
        """Rank 0 died: it held the log and the outputs.  End the job (exit 3); never returns."""
        end_after_root_loss(new, self._root_lost_message(noticed) if new.rank == 0 else None)

    def _root_lost_message(self, noticed) -> str:
        raise NotImplementedError

    def resume_hint(self) -> str:
        """What the exit message of a recovery past its limit adds (Downpour: '; continue with --resume PATH')."""
        return ""

    # ---------------------------------------------------------------- reporting

    def _lost_worker(self, worker: int, rank: int, noticed: float, n_left: int, **extra) -> dict:
        """Rank 0: log worker ``worker`` (world rank ``rank``) lost; return its summary entry."""
        entry = {"event": "lost_worker", "worker": worker, "rank": rank, "time": round(noticed, 3),
                 "workers": n_left, "killed_at": self.kill_ranks.get(rank), **extra}
        self.lost_workers.append(entry)
        self._say(f"worker {worker} (rank {rank}) lost at {noticed:.1f} s; {n_left} workers continue")
        self._event(entry)
        return entry

    def _recovered(self, noticed: float, how: str):
        self._say(f"recovered in {self.elapsed() - noticed:.2f} s ({how})")

    def _time_recovery(self, entries, first_key: str) -> float:
        """Rank 0, at the first step (or push) after a rebuild: complete the loss entries (the figures); return the
        time."""
        t = self.elapsed()
        for e in entries:
            e[first_key] = round(t, 3)
            e["recovery_s"] = round(t - e["time"], 3)
            if e.get("killed_at") is not None:
                e["recovery_from_death_s"] = round(t - e["killed_at"], 3)
        return t

    def _say(self, text: str):
        if self.reporter is not None:
            self.reporter.message(f"asyncsgd: {text}")
        else:
            sys.stdout.write(f"asyncsgd: {text}\n")
            sys.stdout.flush()

    def _event(self, entry: dict):
        if self.reporter is not None and hasattr(self.reporter, "event"):
            self.reporter.event(entry)

    def summary(self) -> dict:
        """Rank 0: the summary's fault-tolerance keys (none with fault tolerance off: the summary as before)."""
        if not self.enabled:
            return {}
        return {"fault_tolerance": True, "lost_workers": self.lost_workers, **self._summary_keys()}

    def _summary_keys(self) -> dict:
        raise NotImplementedError

    # ---------------------------------------------------------------- test tool

    def arm_kill(self, seconds):
        """``--kill-ranks``: SIGKILL this process ``seconds`` after training started (a test tool)."""
        arm_self_kill(seconds, self.elapsed)
