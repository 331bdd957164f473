"""Downpour's run-through of a dead rank (Open MPI's ULFM, ``mpirun --with-ft ulfm``; docs/FAULT_TOLERANCE.md).

``Recovery`` holds what a failure replaces (the communicator, the parameter store, the job board, the heartbeats,
this rank's role and the worker count) and runs the recovery at the loops' safe points:

- ``check()``: one ``Iprobe`` on a private communicator (``fault_tolerance.check_failures``) plus a heartbeat every
  0.25 s; on rank 0 also the heartbeat watch, which SIGKILLs a rank that stopped beating (a SIGSTOPped process is
  alive to MPI) so that it becomes an ordinary failure.  Returns True when a recovery just happened: the caller then
  takes ``store``, ``board``, ``role`` and ``n_workers`` again.
- ``recover()`` (every survivor, collective over them): Revoke + Shrink, the store rebuilt on the survivors
  (``asyncsgd.store.rebuild``: surviving shards copied, a dead server's shard from the freshest replica), a new job
  board (rank 0 copies the survivors' rows to their new indices, keeps the dead workers' rows for the totals, copies
  the flags), new heartbeats; rank 0 logs the loss (progress line, JSONL event, summary).
- ``final_meet()``: the end-of-run barrier, rerun after a recovery.
- ``free()``: frees the current objects on success (collective over the survivors); the abandoned ones are never
  freed (their communicator holds a dead rank), which Open MPI's finalize tolerates.

With fault tolerance off every method is a no-op or today's call (``polled_barrier``, the ``with`` exit of the store
and board), so the job ends as it always did when a rank dies.  ``arm_kill`` serves ``--kill-ranks`` in both cases.
Exceptions are not failures: only a vanished process is run through (docs/FAILURES.md keeps its exit policy).
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time

from mpi4py import MPI

from asyncsgd.ulfm import primitives as ft
from asyncsgd.runtime.env import heartbeat_timeout
from asyncsgd.runtime.faults import fault_point, set_killer
from asyncsgd.runtime.mpi import polled_barrier
from asyncsgd.store.rebuild import rebuild
from asyncsgd.rma.board import FLAG_STOP, FLAG_WARM_DONE, JobBoard

__all__ = ["Recovery"]

_BEAT_S = 0.25
_WAIT_S = 120.0  # bound on every wait of a recovery or of the final meeting (s)
_RECOVERY_LIMIT_S = 2 * _WAIT_S + 60.0  # a whole recovery, retries included; past it the rank ends (exit 4)



class _RecoveryTimer:
    """While a recovery runs: after the heartbeat timeout, SIGKILL the ranks of ``comm`` on this host that are
    stopped (a SIGSTOPped rank is alive to MPI, so the shrink would wait for it for ever; killed, it is one more
    death the shrink runs through).  Nobody beats or watches heartbeats during a recovery, hence this thread."""

    def __init__(self, recovery, comm):
        self._recovery = recovery
        self._where = list(recovery._heartbeats.where)
        self._world = list(recovery.world_ranks)
        self._rank = comm.rank
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="asyncsgd-recovery-timer", daemon=True)
        self._thread.start()

    def _run(self):
        killed = set()
        start = time.monotonic()
        while not self._done.wait(min(self._recovery.timeout, 5.0)):
            for r in ft.stopped_local_ranks(self._where):
                if r not in killed and ft.kill_local_process(*self._where[r]):
                    killed.add(r)
                    sys.stderr.write(f"asyncsgd: rank {self._world[r]} is stopped during a recovery: killed it\n")
                    sys.stderr.flush()
            if time.monotonic() - start > _RECOVERY_LIMIT_S and not self._done.is_set():
                # Measured once under load 50: three survivors stayed in Shrink's agreement for minutes after two
                # ranks vanished.  Never hang: end this rank (every survivor's timer does the same), non-zero.
                sys.stderr.write(f"asyncsgd: error: rank {self._world[self._rank]}: the recovery did not complete "
                                 f"within {_RECOVERY_LIMIT_S:.0f} s (stuck in MPI's shrink or a window allocation); "
                                 f"ending the job{self._recovery.resume_hint()}\n")
                sys.stderr.flush()
                sys.stdout.flush()
                os._exit(4)

    def cancel(self):
        self._done.set()


class Recovery:
    """The replaceable state of one Downpour run and its recovery (see the module docstring)."""

    def __init__(self, comm, *, enabled: bool, store, board, n_servers: int, start: float, reporter=None,
                 checkpoint_path=None, kill_ranks=None):
        self.enabled = enabled
        self.store, self.board = store, board
        self.n_servers = n_servers
        self.n_workers = comm.size - n_servers
        self.start = start
        self.reporter = reporter
        self.checkpoint_path = checkpoint_path
        self.kill_ranks = dict(kill_ranks or {})
        self.world_ranks = list(range(comm.size))  # current rank -> rank at the start of the run
        rank = comm.rank
        self.role = ft.Role("server", rank) if rank < n_servers else ft.Role("worker", rank - n_servers)
        self.recoveries = 0
        self.lost_workers, self.lost_servers = [], []  # rank 0: what the summary reports
        self.retired = []  # rank 0: (stats, hist) rows of workers that died or now host a shard
        self.replica = None  # workers: a callable -> (float32 vector, version of its last fetch)
        self._awaiting_push = None  # rank 0: (version at the rebuild, entries to complete) until a push lands
        self._comm = self._heartbeats = None
        self._last_beat = 0.0
        self._killed = set()
        self.timeout = heartbeat_timeout()
        if enabled:
            self._comm = ft.manage(comm.Dup())  # private: nothing but the failure probe runs on it
            self._heartbeats = ft.Heartbeats(self._comm)
            set_killer(self._kill_world_rank)  # ASYNCSGD_FAULT's =kill:VICTIM (a test tool)
        else:
            self._comm = comm

    # ---------------------------------------------------------------- safe points

    @property
    def rank(self) -> int:
        return self._comm.rank

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def check(self) -> bool:
        """A safe point: return True when a failure was found and recovered from here (state replaced)."""
        if not self.enabled:
            return False
        try:
            if self._beat_and_watch() and self._comm.rank == 0:
                self._first_push()
            ft.check_failures(self._comm)
        except ft.RankFailure:
            self.recover()
            return True
        except MPI.Exception as exc:  # a heartbeat to a dead rank over a network transport
            if not ft.is_failure(self._comm, exc):
                raise
            self.recover()
            return True
        return False

    def call(self, fn, *args, **kwargs):
        """Run a store operation; turn an MPI error that means a dead rank into a recovery (then return None)."""
        try:
            return fn(*args, **kwargs)
        except MPI.Exception as exc:
            if not self.enabled or not ft.is_failure(self._comm, exc):
                raise
            self.recover()
            return None

    def _kill_world_rank(self, world_rank: int) -> bool:
        """SIGKILL the rank that was ``world_rank`` at the start of the run (same host only)."""
        if world_rank not in self.world_ranks:
            return False
        return ft.kill_rank(self._heartbeats, self.world_ranks.index(world_rank))

    def _watch(self):
        stale = self._heartbeats.stale(self.timeout)
        if not stale:
            return
        long_silent = set(self._heartbeats.stale(ft.STARVED_FACTOR * self.timeout))
        for r in stale:
            if r in self._killed:
                continue
            if r not in long_silent and ft.starved(*self._heartbeats.where[r], 0.0, self.timeout):
                continue  # not stopped: starved on an overloaded host, or hung; give it longer (ft.starved)
            self._killed.add(r)
            killed = ft.kill_rank(self._heartbeats, r)
            self._say(f"rank {self.world_ranks[r]} sent no heartbeat for {self.timeout:g} s (stopped or hung): "
                      + ("killed it; the others continue" if killed else "it runs on another host and cannot be "
                         "killed from here"))

    def _first_push(self):
        """Rank 0: time the first push that lands after a rebuild (the recovery time of the figures)."""
        if self._awaiting_push is None:
            return
        base, entries = self._awaiting_push
        if self.store.version() > base:
            t = self.elapsed()
            for e in entries:
                e["first_push_after_s"] = round(t, 3)
                e["recovery_s"] = round(t - e["time"], 3)
                if e.get("killed_at") is not None:
                    e["recovery_from_death_s"] = round(t - e["killed_at"], 3)
            self._say(f"first push after the rebuild at {t:.1f} s ({t - entries[0]['time']:.2f} s after the "
                      f"failure was noticed)")
            self._awaiting_push = None

    def final_meet(self):
        """The end of the run: every rank meets (today's barrier); a failure here is recovered and the meeting rerun."""
        if not self.enabled:
            polled_barrier(self._comm)
            return
        while True:
            try:
                # No timeout here: servers other than rank 0 (and a worker promoted to host a shard) wait in this
                # meeting for the rest of the run, which may last hours.  With _WAIT_S (120 s) a promoted host
                # raised TimeoutError mid-run and its exit stranded the survivors in a later shrink (the benchmark's
                # server case).  Liveness is watched meanwhile: heartbeats (rank 0 kills a silent rank), the
                # failure probe of the polled Ibarrier, and the launcher's --timeout.
                ft.safe_point(self._comm, timeout=math.inf, on_wait=self._beat_and_watch)
                return
            except ft.RankFailure:
                self.recover()

    def _beat_and_watch(self) -> bool:
        """Beat this rank's heartbeat and (rank 0) watch the others, at most every _BEAT_S; return whether it did."""
        now = time.monotonic()
        if now - self._last_beat < _BEAT_S:
            return False
        self._last_beat = now
        self._heartbeats.beat()
        if self._comm.rank == 0:
            self._watch()
        return True

    # ---------------------------------------------------------------- recovery

    def recover(self):
        """Shrink to the survivors and rebuild the store, the board and the heartbeats (collective over them).

        A second death while the survivors are inside the recovery (in the shrink, the store's rebuild, a window
        allocation) is run through too: every attempt ends with ``ft.commit`` (ULFM's uniform agreement), so the
        survivors either all keep the rebuilt state or all drop it, shrink again and rebuild from what each held
        when the recovery began (rank 0: the version and the board; a server: its shard; a worker: its replica),
        with every rank lost so far.  A rank that stops (SIGSTOP) inside a recovery is killed by the recovery timer
        of a rank on its host, which turns it into one more death.
        """
        noticed = self.elapsed()
        old = self._comm
        timer = _RecoveryTimer(self, old) if self._heartbeats is not None else None
        try:
            self._recover(old, noticed)
        finally:
            if timer is not None:
                timer.cancel()

    def _recover(self, old, noticed):
        comm, held, failed, attempts = old, None, [], 0
        while True:
            new, _ = ft.survivors(comm)
            mapping = ft.rank_map(old, new)  # groups translate across shrinks: ranks of ``old`` that died so far
            failed = sorted(r for r, now in mapping.items() if now is None)
            if 0 in failed:
                self._root_lost(new, noticed)
            try:
                roles = ft.roles(old.size, failed, self.n_servers)
            except ValueError as exc:  # no worker is left: the job ends (an exception ends every rank)
                lost = ", ".join(str(self.world_ranks[r]) for r in failed)
                raise ValueError(f"ranks {lost} lost: {exc}") from None
            if held is None:
                # Read once, after the first shrink: every survivor's pushes had completed when it entered it.
                held = self._hold(old)
                self._heartbeats.abandon()
            attempts += 1
            rb = board = heartbeats = retired = None
            ok = True
            try:
                fault_point("recover")
                rb = rebuild(self.store, old.rank, new, failed, version=held["version"], replica=held["replica"],
                             timeout=_WAIT_S, local=held["shard"])
                fault_point("recover")
                n_workers = sum(1 for _, _, r in roles.values() if r.kind == "worker")
                board = JobBoard(new, n_workers)  # the old board is dropped, never freed (a dead rank's collective)
                if new.rank == 0:
                    retired = self._move_rows(board, held["rows"], held["flags"], roles, failed)
                ft.safe_point(new, timeout=_WAIT_S)  # rows and flags are in place before anyone reads them
                heartbeats = ft.Heartbeats(new)
            except (ft.RankFailure, MPI.Exception) as exc:
                if isinstance(exc, MPI.Exception) and not ft.is_failure(new, exc):
                    raise
                ok = False
            if not ft.commit(new, ok):
                # another rank died during this attempt: drop what it built (never freed) and shrink again
                for part in (rb.store if rb is not None else None, board, heartbeats):
                    if part is not None:
                        (part.abandon if hasattr(part, "abandon") else part._abandon)()
                if new.rank == 0:
                    self._say(f"a rank died during the recovery (attempt {attempts}); shrinking again")
                comm = new
                continue
            break
        self._heartbeats = heartbeats
        failed_world = [self.world_ranks[r] for r in failed]
        _, _, role = roles[old.rank]
        old_n_workers = self.n_workers
        if retired:
            self.retired.extend(retired)
        self.world_ranks = [w for r, w in enumerate(self.world_ranks) if r not in failed]
        self._comm, self.store, self.board, self.role, self.n_workers = new, rb.store, board, role, n_workers
        self.recoveries += 1
        if new.rank == 0:
            self._log_loss(failed_world, roles, failed, rb, noticed, old_n_workers)

    def _hold(self, old) -> dict:
        """What this rank contributes to every attempt of one recovery, read out of the abandoned objects once."""
        held = {"version": None, "replica": None, "shard": None, "rows": None, "flags": None}
        if old.rank == 0:
            held["version"] = self.store.version()
            held["rows"] = self.board.rows()
            held["flags"] = (self.board.flag(FLAG_STOP), self.board.flag(FLAG_WARM_DONE))
        if self.replica is not None and self.role.kind == "worker":
            held["replica"] = self.replica()
        if self.store.is_server:
            held["shard"] = self.store.local_shard()
        return held

    def _move_rows(self, board, rows, flags, roles, failed) -> list:
        """Rank 0: copy the survivors' rows and the flags to the new board; return the retired rows."""
        stats, hist = rows
        retired = []
        for i, (s, h) in enumerate(zip(stats, hist)):
            old_rank = self.n_servers + i
            if old_rank in failed or roles[old_rank][2].kind == "server":
                s = dict(s, done=1.0)  # its samples stay counted; nobody waits for it
                retired.append((s, h))
            else:
                board.publish(roles[old_rank][2].index, s, h)
        board.set_flag(FLAG_STOP, flags[0])
        # a recovery ends a warm start still running: the replica warming up may be the one lost (the others would
        # wait for its flag forever), and after a renumbering no row says which survivor it was
        board.set_flag(FLAG_WARM_DONE, 1.0)
        return retired

    def _log_loss(self, failed_world, roles, failed, rb, noticed, old_n_workers):
        entries = []
        promoted = {old: after for old, (_, before, after) in roles.items()
                    if before.kind == "worker" and after.kind == "server"}
        for old_rank, rank in zip(failed, failed_world):
            killed_at = self.kill_ranks.get(rank)
            if rank >= self.n_servers:
                entry = {"event": "lost_worker", "worker": rank - self.n_servers, "rank": rank,
                         "time": round(noticed, 3), "workers": self.n_workers, "killed_at": killed_at}
                self.lost_workers.append(entry)
                self._say(f"worker {rank - self.n_servers} (rank {rank}) lost at {noticed:.1f} s; "
                          f"{self.n_workers} workers continue")
            else:
                host = next((self.world_ranks[roles[o][0]] for o, a in promoted.items() if a.index == rank), rank)
                entry = {"event": "lost_server", "server": rank, "rank": rank, "time": round(noticed, 3),
                         "workers": self.n_workers, "killed_at": killed_at, "pushes_lost": rb.lost_pushes,
                         "replica_rank": (self.world_ranks[rb.replica_rank] if rb.replica_rank is not None
                                          else None),
                         "now_hosted_by": host}
                self.lost_servers.append(entry)
                self._say(f"server {rank} (rank {rank}) lost at {noticed:.1f} s; shard {rank} restored from rank "
                          f"{entry['replica_rank']}'s replica ({rb.lost_pushes} pushes lost), now hosted by rank "
                          f"{host}; {self.n_workers} workers continue")
            self._event(entry)
            entries.append(entry)
        self._say(f"recovered in {self.elapsed() - noticed:.2f} s (shrink, store and board rebuilt on "
                  f"{self._comm.size} ranks)")
        self._awaiting_push = (rb.version_base, entries)

    def resume_hint(self) -> str:
        """'; continue with --resume PATH' when a checkpoint file exists, else ''."""
        if self.checkpoint_path and os.path.exists(self.checkpoint_path):
            return f"; continue with the same command plus --resume {self.checkpoint_path}"
        return ""

    def _root_lost(self, new, noticed):
        """Rank 0 died: it held the monitor, the version counter and the checkpoints.  End the job (exit 3)."""
        message = None
        if new.rank == 0:
            if self.checkpoint_path and os.path.exists(self.checkpoint_path):
                where = (f"the last checkpoint, {self.checkpoint_path}, is intact: continue with the same command "
                         f"plus --resume {self.checkpoint_path}")
            elif self.checkpoint_path:
                where = (f"no checkpoint had been written yet to {self.checkpoint_path} (checked from this host): "
                         f"restart the run; with the file in place, --resume {self.checkpoint_path} continues it")
            else:
                where = "no checkpoint was being written (add --checkpoint-every SECONDS to be able to --resume)"
            message = (f"asyncsgd: error: rank 0 lost at {noticed:.1f} s: it held the monitor and the store's "
                       f"version counter, so the job ends; {where}\n")
        ft.end_after_root_loss(new, message)

    # ---------------------------------------------------------------- reporting

    def _say(self, text: str):
        if self.reporter is not None:
            self.reporter.message(f"asyncsgd: {text}")
        else:
            sys.stdout.write(f"asyncsgd: {text}\n")
            sys.stdout.flush()

    def _event(self, entry: dict):
        if self.reporter is not None and hasattr(self.reporter, "event"):
            self.reporter.event(entry)

    def rows(self):
        """Rank 0: the board's rows plus the retired rows (dead or promoted workers), for the totals."""
        import numpy
        stats, hist = self.board.rows()
        if not self.retired:
            return stats, hist
        return (stats + [s for s, _ in self.retired],
                numpy.concatenate([hist, numpy.array([h for _, h in self.retired])]))

    def summary(self) -> dict:
        """Rank 0: the summary's fault-tolerance keys (none with fault tolerance off: today's summary)."""
        if not self.enabled:
            return {}
        return {"fault_tolerance": True, "lost_workers": self.lost_workers, "lost_servers": self.lost_servers,
                "workers_at_end": self.n_workers}

    # ---------------------------------------------------------------- test tool and lifetime

    def arm_kill(self, seconds):
        """``--kill-ranks``: SIGKILL this process ``seconds`` after training started (a test tool)."""
        ft.arm_self_kill(seconds, self.elapsed)

    def free(self, exc_type=None):
        """End of the run: free the current objects (collective) or, on an exception, abandon them (no MPI)."""
        for owner in (self.board, self.store):
            owner.__exit__(exc_type, None, None)
        if self.enabled and exc_type is None:
            self._heartbeats.free()
            self._comm.Free()
