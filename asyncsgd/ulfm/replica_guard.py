"""Sync's and Sandblaster's run-through of a dead rank (Open MPI's ULFM, ``mpirun --with-ft ulfm``).

In both modes every rank is a replica and every step ends in collectives over all of them, so a death is noticed
the same way everywhere: a collective on the working communicator raises (``ERR_PROC_FAILED``, ``ERR_REVOKED`` or
an aborted schedule's ``ERR_OTHER``; ``fault_tolerance.is_failure`` tells them from program errors), or a rank
polling one-sided windows finds the failure with ``check()`` (one ``Iprobe`` on a private communicator).

``ReplicaGuard.recover(state)`` (every survivor, collective over them) revokes the working communicator, shrinks
to the survivors (``fault_tolerance.survivors``) and broadcasts **new rank 0's** ``state``: ULFM does not make a
collective fail on every rank alike, so when the death struck, some survivors may have finished the step (or the
whole run) and others not.  Rank 0 is the same process before and after (a dead rank 0 ends the job), so its state
is one consistent point that all survivors adopt; the caller then rebuilds what lives on the communicator.

The end of the run is a safe point too (``final_meet``): a survivor that left the loop while others still ran it
meets them in the recovery and re-enters the loop if rank 0 had not finished.  With fault tolerance off every
method is a no-op or a plain call, so a dead rank ends the job as before (the watchdog names it).
"""
from __future__ import annotations

import os
import socket
import sys
import time

from mpi4py import MPI

from asyncsgd.ulfm import primitives as ft
from asyncsgd.runtime.mpi import polled_bcast

__all__ = ["ReplicaGuard", "WAIT_S"]

WAIT_S = 120.0  # bound on every wait of a recovery or of the final meeting (s)


class ReplicaGuard:
    """The communicator of an all-replica run (sync, sandblaster) and its recovery; see the module docstring.

    ``comm`` is the run's working communicator (the caller's own Dup: replaced by a recovery, freed by ``free``).
    ``start`` is the ``time.monotonic()`` at which training started (``--kill-ranks`` and the log count from it).
    ``mode_name`` and ``root_lost_hint`` word rank 0's message when rank 0 itself dies.
    """

    def __init__(self, comm, *, enabled: bool, start: float, reporter=None, kill_ranks=None,
                 root_lost_hint: str = ""):
        self.enabled = enabled
        self.start = start
        self.reporter = reporter
        self.kill_ranks = dict(kill_ranks or {})
        self.root_lost_hint = root_lost_hint
        self.world_ranks = list(range(comm.size))  # current rank -> rank at the start of the run
        self.lost_workers = []  # rank 0: the summary's entries
        self.recoveries = 0
        self._awaiting_step = None  # rank 0: entries waiting for the first completed step after a rebuild
        self._where = comm.allgather((os.getpid(), socket.gethostname()))  # to name a dead rank
        if enabled:
            self.comm = ft.manage(comm)
            self._probe = ft.manage(comm.Dup())  # private: nothing but the failure probe and safe points use it
        else:
            self.comm, self._probe = comm, None

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    # ---------------------------------------------------------------- noticing

    def is_failure(self, exc) -> bool:
        """Whether ``exc`` (raised by an MPI call of this run) means a dead rank to recover from."""
        if not self.enabled:
            return False
        if isinstance(exc, ft.RankFailure):
            return True
        return isinstance(exc, MPI.Exception) and (ft.is_failure(self.comm, exc) or ft.is_failure(self._probe, exc))

    def end_if_failure(self, exc):
        """Fault tolerance off under ULFM (MPI reports a dead rank as an error instead of ending the job): name the
        dead rank and end the job, as the watchdog does; return for any other exception (the caller raises it)."""
        if self.enabled or not isinstance(exc, MPI.Exception) or not ft.is_failure(self.comm, exc):
            return
        dead = ", ".join(f"rank {r} (pid {self._where[r][0]} on {self._where[r][1]})"
                         for r in ft.failed_ranks(self.comm)) or "a rank"
        sys.stderr.write(f"asyncsgd: error: {dead} died; fault tolerance is off (--fault-tolerance), so rank "
                         f"{self.comm.rank} is ending the job\n")
        sys.stderr.flush()
        self.comm.Abort(1)

    def check(self):
        """Raise RankFailure if this rank knows of a dead rank (or a peer revoked); cheap, no synchronisation.

        Called where a rank waits on one-sided windows only (no collective would report the death there)."""
        if self.enabled:
            ft.check_failures(self._probe)

    def final_meet(self):
        """The end of the run: every rank meets; raises RankFailure when one died (the caller recovers)."""
        if self.enabled:
            ft.safe_point(self._probe, timeout=WAIT_S)

    # ---------------------------------------------------------------- recovery

    def recover(self, state):
        """Shrink to the survivors and return new rank 0's ``state`` (any picklable object) on every survivor.

        Collective over the survivors.  Afterwards ``self.comm`` is a new working communicator of the survivors
        (the old one is abandoned, never freed: a collective with a dead rank).  A further death during the
        recovery is recovered from too.  Rank 0 dead: rank 0's successor says so and every survivor exits (3).
        """
        noticed = self.elapsed()
        while True:
            try:
                return self._recover_once(state, noticed)
            except MPI.Exception as exc:  # another rank died during the recovery: shrink again
                if not self.is_failure(exc):
                    raise

    def _recover_once(self, state, noticed):
        try:
            if not self.comm.Is_revoked():
                self.comm.Revoke()  # ranks still waiting in a collective of the old working communicator leave it
        except MPI.Exception:
            pass
        old = self._probe
        new, failed = ft.survivors(old)
        failed_world = [self.world_ranks[r] for r in failed]
        if 0 in failed:
            self._root_lost(new, noticed)
        self.world_ranks = [w for r, w in enumerate(self.world_ranks) if r not in failed]
        self._probe = new  # from here a further death is recovered from on the shrunk communicators
        self.comm = ft.manage(new.Dup())
        self.recoveries += 1
        if new.rank == 0:
            self._log_loss(failed_world, noticed, new.size)
        return polled_bcast(new, state, root=0, timeout=WAIT_S)

    def _log_loss(self, failed_world, noticed, n_left):
        entries = []
        for rank in failed_world:
            entry = {"event": "lost_worker", "worker": rank, "rank": rank, "time": round(noticed, 3),
                     "workers": n_left, "killed_at": self.kill_ranks.get(rank),
                     "recovered_at": round(self.elapsed(), 3)}
            self.lost_workers.append(entry)
            self._say(f"worker {rank} (rank {rank}) lost at {noticed:.1f} s; {n_left} workers continue")
            if self.reporter is not None and hasattr(self.reporter, "event"):
                self.reporter.event(entry)
            entries.append(entry)
        self._say(f"recovered in {self.elapsed() - noticed:.2f} s (shrunk to {n_left} ranks)")
        self._awaiting_step = entries

    def stepped(self):
        """Rank 0, after each completed step: the first one after a rebuild times the recovery (the figures)."""
        if self._awaiting_step is None:
            return
        t = self.elapsed()
        for e in self._awaiting_step:
            e["first_step_after_s"] = round(t, 3)
            e["recovery_s"] = round(t - e["time"], 3)
            if e.get("killed_at") is not None:
                e["recovery_from_death_s"] = round(t - e["killed_at"], 3)
        self._awaiting_step = None

    def _root_lost(self, new, noticed):
        """Rank 0 died: it held the log and the outputs (and sandblaster's mini-shard windows).  End the job (3)."""
        ft.end_after_root_loss(new, f"asyncsgd: error: rank 0 lost at {noticed:.1f} s: it wrote the log and the "
                                    f"outputs, so the job ends; {self.root_lost_hint}\n")

    def _say(self, text: str):
        if self.reporter is not None:
            self.reporter.message(f"asyncsgd: {text}")
        else:
            sys.stdout.write(f"asyncsgd: {text}\n")
            sys.stdout.flush()

    # ---------------------------------------------------------------- summary, test tool, lifetime

    def summary(self) -> dict:
        """Rank 0: the summary's fault-tolerance keys (none with fault tolerance off: the summary as before)."""
        if not self.enabled:
            return {}
        return {"fault_tolerance": True, "lost_workers": self.lost_workers, "workers_at_end": self.comm.size}

    def arm_kill(self, seconds):
        """``--kill-ranks``: SIGKILL this process ``seconds`` after training started (a test tool)."""
        ft.arm_self_kill(seconds, self.elapsed)

    def free(self):
        """End of a successful run: free the working and probe communicators (collective over the survivors)."""
        self.comm.Free()
        if self._probe is not None:
            self._probe.Free()
            self._probe = None
