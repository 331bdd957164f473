"""Sync's and Sandblaster's run-through of a dead rank (Open MPI's ULFM, ``mpirun --with-ft ulfm``).

In both modes every rank is a replica and every step ends in collectives over all of them, so a death is noticed
the same way everywhere: a collective on the working communicator raises (``ERR_PROC_FAILED``, ``ERR_REVOKED`` or
an aborted schedule's ``ERR_OTHER``; ``asyncsgd.ulfm.primitives.is_failure`` tells them from program errors), or
a rank polling one-sided windows finds the failure with ``check()`` (one ``Iprobe`` on a private communicator).

``ReplicaGuard.recover(state)`` (every survivor, collective over them) revokes the working communicator, shrinks
to the survivors (``RecoveryBase._shrink``) and broadcasts **new rank 0's** ``state``: ULFM does not make a
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

from mpi4py import MPI

from asyncsgd.runtime.mpi import abort_job, polled_bcast
from asyncsgd.ulfm.primitives import check_failures, failed_ranks, is_failure, manage, revoke, safe_point
from asyncsgd.ulfm.recovery import WAIT_S, RecoveryBase

__all__ = ["ReplicaGuard"]


class ReplicaGuard(RecoveryBase):
    """The communicator of an all-replica run (sync, sandblaster) and its recovery; see the module docstring.

    ``comm`` is the run's working communicator (the caller's own Dup: replaced by a recovery, freed by ``free``).
    ``start`` is the ``time.monotonic()`` at which training started (``--kill-ranks`` and the log count from it).
    ``root_lost_hint`` ends rank 0's successor's message when rank 0 itself dies.
    """

    def __init__(self, comm, *, enabled: bool, start: float, reporter=None, kill_ranks=None,
                 root_lost_hint: str = ""):
        super().__init__(comm, enabled=enabled, start=start, reporter=reporter, kill_ranks=kill_ranks)
        self.root_lost_hint = root_lost_hint
        self._awaiting_step = None  # rank 0: entries waiting for the first completed step after a rebuild
        self._where = comm.allgather((os.getpid(), socket.gethostname()))  # to name a dead rank
        self.comm = manage(comm) if enabled else comm

    # ---------------------------------------------------------------- noticing

    def is_failure(self, exc) -> bool:
        """Whether ``exc`` (raised by an MPI call of this run) means a dead rank to recover from."""
        return super().is_failure(exc) or (self.enabled and isinstance(exc, MPI.Exception)
                                           and is_failure(self.comm, exc))

    def end_if_failure(self, exc):
        """Fault tolerance off under ULFM (MPI reports a dead rank as an error instead of ending the job): name the
        dead rank and end the job, as the watchdog does; return for any other exception (the caller raises it)."""
        if self.enabled or not isinstance(exc, MPI.Exception) or not is_failure(self.comm, exc):
            return
        dead = ", ".join(f"rank {r} (pid {self._where[r][0]} on {self._where[r][1]})"
                         for r in failed_ranks(self.comm)) or "a rank"
        sys.stderr.write(f"asyncsgd: error: {dead} died; fault tolerance is off (--fault-tolerance), so rank "
                         f"{self.comm.rank} is ending the job\n")
        sys.stderr.flush()
        abort_job(self.comm, 1)

    def check(self):
        """Raise RankFailure if this rank knows of a dead rank (or a peer revoked); cheap, no synchronisation.

        Called where a rank waits on one-sided windows only (no collective would report the death there)."""
        if self.enabled:
            check_failures(self._probe)

    def final_meet(self):
        """The end of the run: every rank meets; raises RankFailure when one died (the caller recovers)."""
        if self.enabled:
            safe_point(self._probe, timeout=WAIT_S)

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
        revoke(self.comm)  # ranks still waiting in a collective of the old working communicator leave it
        new, failed = self._shrink(self._probe, self._probe, noticed)
        failed_world = self._forget(failed)
        self._probe = new  # from here a further death is recovered from on the shrunk communicators
        self.comm = manage(new.Dup())
        self.recoveries += 1
        if new.rank == 0:
            self._log_loss(failed_world, noticed, new.size)
        return polled_bcast(new, state, root=0, timeout=WAIT_S)

    def _log_loss(self, failed_world, noticed, n_left):
        self._awaiting_step = [self._lost_worker(rank, rank, noticed, n_left, recovered_at=round(self.elapsed(), 3))
                               for rank in failed_world]
        self._recovered(noticed, f"shrunk to {n_left} ranks")

    def stepped(self):
        """Rank 0, after each completed step: the first one after a rebuild times the recovery (the figures)."""
        if self._awaiting_step is None:
            return
        self._time_recovery(self._awaiting_step, "first_step_after_s")
        self._awaiting_step = None

    def _root_lost_message(self, noticed) -> str:
        """Rank 0 died: it held the log and the outputs (and sandblaster's mini-shard windows)."""
        return (f"asyncsgd: error: rank 0 lost at {noticed:.1f} s: it wrote the log and the outputs, so the job "
                f"ends; {self.root_lost_hint}\n")

    # ---------------------------------------------------------------- summary, lifetime

    def _summary_keys(self) -> dict:
        return {"workers_at_end": self.comm.size}

    def free(self):
        """End of a successful run: free the working and probe communicators (collective over the survivors)."""
        self.comm.Free()
        if self.enabled and self._probe is not None:
            self._probe.Free()
            self._probe = None
