"""Downpour's run-through of a dead rank (Open MPI's ULFM, ``mpirun --with-ft ulfm``; docs/FAULT_TOLERANCE.md).

``Recovery`` (a ``asyncsgd.ulfm.recovery.RecoveryBase``) holds what a failure replaces (the communicator, the
parameter store, the job board, the heartbeats, this rank's role and the worker count) and runs the recovery at the
loops' safe points:

- ``check()``: one ``Iprobe`` on a private communicator (``asyncsgd.ulfm.primitives.check_failures``) plus a
  heartbeat every 0.25 s; on rank 0 also the heartbeat watch, which SIGKILLs a rank that stopped beating (a
  SIGSTOPped process is alive to MPI) so that it becomes an ordinary failure.  Returns True when a recovery just
  happened: the caller then takes ``store``, ``board``, ``role`` and ``n_workers`` again.
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
import time

import numpy
from mpi4py import MPI

from asyncsgd.rma.board import FLAG_STOP, FLAG_WARM_DONE, JobBoard
from asyncsgd.rma.heartbeats import Heartbeats
from asyncsgd.runtime.env import heartbeat_timeout
from asyncsgd.runtime.faults import fault_point, set_killer, victims
from asyncsgd.testing.kill import DIE_SIGNAL, die_on_signal
from asyncsgd.runtime.mpi import polled_barrier
from asyncsgd.store.rebuild import rebuild
from asyncsgd.ulfm.primitives import RankFailure, check_failures, commit, end_after_root_loss, is_failure, safe_point
from asyncsgd.ulfm.processes import STARVED_FACTOR, kill_local_process, kill_rank, starved
from asyncsgd.ulfm.recovery import WAIT_S, RecoveryBase, RecoveryTimer
from asyncsgd.ulfm.roles import Role, reassign_roles
from asyncsgd.ulfm.stuck import StuckCallGuard

__all__ = ["Recovery"]

_BEAT_S = 0.25


class Recovery(RecoveryBase):
    """The replaceable state of one Downpour run and its recovery (see the module docstring)."""

    def __init__(self, comm, *, enabled: bool, store, board, n_servers: int, start: float, reporter=None,
                 checkpoint_path=None, kill_ranks=None):
        super().__init__(comm, enabled=enabled, start=start, reporter=reporter, kill_ranks=kill_ranks)
        self.store, self.board = store, board
        self.n_servers = n_servers
        self.n_workers = comm.size - n_servers
        self.checkpoint_path = checkpoint_path
        self.role = Role.of(comm.rank, n_servers)
        self.lost_servers = []  # rank 0: what the summary reports, with the base's lost_workers
        self.retired = []  # rank 0: (stats, hist) rows of workers that died or now host a shard
        self.replica = None  # workers: a callable -> (float32 vector, version of its last fetch)
        self._awaiting_push = None  # rank 0: (version at the rebuild, entries to complete) until a push lands
        self._heartbeats = None
        self._stuck = None
        self._last_beat = 0.0
        self._killed = set()
        self.timeout = heartbeat_timeout()
        if enabled:
            self._heartbeats = Heartbeats(self._probe)
            set_killer(self._kill_world_rank)  # ASYNCSGD_FAULT's =kill:VICTIM (a test tool)
            if comm.rank in victims():
                die_on_signal()
            # a death inside an Accumulate strands the ranks accumulating to its target: end them, never hang
            self._stuck = StuckCallGuard(lambda: self._probe, lambda: self.world_ranks,
                                         limit=max(30.0, 2 * self.timeout), resume_hint=self.resume_hint)

    # ---------------------------------------------------------------- safe points

    @property
    def rank(self) -> int:
        return self._probe.rank

    def check(self) -> bool:
        """A safe point: return True when a failure was found and recovered from here (state replaced)."""
        if not self.enabled:
            return False
        try:
            if self._beat_and_watch() and self._probe.rank == 0:
                self._first_push()
            check_failures(self._probe)
        except RankFailure:
            self.recover()
            return True
        except MPI.Exception as exc:  # a heartbeat to a dead rank over a network transport
            if not self.is_failure(exc):
                raise
            self.recover()
            return True
        return False

    def call(self, fn, *args, **kwargs):
        """Run a store operation; turn an MPI error that means a dead rank into a recovery (then return None)."""
        try:
            return fn(*args, **kwargs)
        except MPI.Exception as exc:
            if not self.is_failure(exc):
                raise
            self.recover()
            return None

    def _kill_world_rank(self, world_rank: int) -> bool:
        """Kill the rank that was ``world_rank`` at the start of the run (same host only), at its main thread's next
        Python bytecode (``asyncsgd.testing.kill``: never inside an MPI call)."""
        if world_rank not in self.world_ranks:
            return False
        return kill_local_process(*self._heartbeats.where[self.world_ranks.index(world_rank)], sig=DIE_SIGNAL)

    def _watch(self):
        stale = self._heartbeats.stale(self.timeout)
        if not stale:
            return
        long_silent = set(self._heartbeats.stale(STARVED_FACTOR * self.timeout))
        for r in stale:
            if r in self._killed:
                continue
            if r not in long_silent and starved(*self._heartbeats.where[r], 0.0, self.timeout):
                continue  # not stopped: starved on an overloaded host, or hung; give it longer (starved)
            self._killed.add(r)
            killed = kill_rank(self._heartbeats, r)
            self._say(f"rank {self.world_ranks[r]} sent no heartbeat for {self.timeout:g} s (stopped or hung): "
                      + ("killed it; the others continue" if killed else "it runs on another host and cannot be "
                         "killed from here"))

    def _first_push(self):
        """Rank 0: time the first push that lands after a rebuild (the recovery time of the figures)."""
        if self._awaiting_push is None:
            return
        base, entries = self._awaiting_push
        if self.store.version() > base:
            t = self._time_recovery(entries, "first_push_after_s")
            self._say(f"first push after the rebuild at {t:.1f} s ({t - entries[0]['time']:.2f} s after the "
                      f"failure was noticed)")
            self._awaiting_push = None

    def final_meet(self):
        """The end of the run: every rank meets (today's barrier); a failure here is recovered and the meeting rerun."""
        if not self.enabled:
            polled_barrier(self._probe)
            return
        while True:
            try:
                # No timeout here: servers other than rank 0 (and a worker promoted to host a shard) wait in this
                # meeting for the rest of the run, which may last hours.  With WAIT_S (120 s) a promoted host
                # raised TimeoutError mid-run and its exit stranded the survivors in a later shrink (the benchmark's
                # server case).  Liveness is watched meanwhile: heartbeats (rank 0 kills a silent rank), the
                # failure probe of the polled Ibarrier, and the launcher's --timeout.
                safe_point(self._probe, timeout=math.inf, on_wait=self._beat_and_watch)
                return
            except RankFailure:
                self.recover()

    def _beat_and_watch(self) -> bool:
        """Beat this rank's heartbeat and (rank 0) watch the others, at most every _BEAT_S; return whether it did."""
        now = time.monotonic()
        if now - self._last_beat < _BEAT_S:
            return False
        self._last_beat = now
        self._heartbeats.beat()
        if self._probe.rank == 0:
            self._watch()
        return True

    # ---------------------------------------------------------------- recovery

    def recover(self):
        """Shrink to the survivors and rebuild the store, the board and the heartbeats (collective over them).

        A second death while the survivors are inside the recovery (in the shrink, the store's rebuild, a window
        allocation) is run through too: every attempt ends with ``commit`` (ULFM's uniform agreement), so the
        survivors either all keep the rebuilt state or all drop it, shrink again and rebuild from what each held
        when the recovery began (rank 0: the version and the board; a server: its shard; a worker: its replica),
        with every rank lost so far.  A rank that stops (SIGSTOP) inside a recovery is killed by the recovery timer
        of a rank on its host, which turns it into one more death.
        """
        noticed = self.elapsed()
        old = self._probe
        timer = (RecoveryTimer(self._heartbeats.where, self.world_ranks, old.rank, self.timeout, self.resume_hint)
                 if self._heartbeats is not None else None)
        if self._stuck is not None:
            self._stuck.pause()  # the recovery timer bounds the recovery
        try:
            self._recover(old, noticed)
        finally:
            if timer is not None:
                timer.cancel()
            if self._stuck is not None:
                self._stuck.resume()

    def _recover(self, old, noticed):
        comm, held, failed, attempts = old, None, [], 0
        while True:
            new, failed = self._shrink(old, comm, noticed)  # ``failed``: ranks of ``old`` that died so far
            try:
                roles = reassign_roles(old.size, failed, self.n_servers)
            except ValueError as exc:
                # No worker is left: the job ends as after rank 0's loss (exit 3, the new rank 0 says why), not by
                # an exception: mpirun --with-ft ulfm was seen to exit 0 after MPI_Abort with ranks already dead.
                lost = ", ".join(str(self.world_ranks[r]) for r in failed)
                end_after_root_loss(new, f"asyncsgd: error: ranks {lost} lost: {exc}; the job ends"
                                         f"{self.resume_hint()}\n" if new.rank == 0 else None)
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
                             timeout=WAIT_S, local=held["shard"])
                fault_point("recover")
                n_workers = sum(1 for _, _, r in roles.values() if r.kind == "worker")
                # the old board is dropped, never freed (a dead rank's collective)
                board = JobBoard(new, n_workers, lockless=True)
                if new.rank == 0:
                    retired = self._move_rows(board, held["rows"], held["flags"], roles, failed)
                safe_point(new, timeout=WAIT_S)  # rows and flags are in place before anyone reads them
                heartbeats = Heartbeats(new)
            except (RankFailure, MPI.Exception) as exc:
                if isinstance(exc, MPI.Exception) and not is_failure(new, exc):
                    raise
                ok = False
            if not commit(new, ok):
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
        _, _, role = roles[old.rank]
        old_n_workers = self.n_workers
        if retired:
            self.retired.extend(retired)
        failed_world = self._forget(failed)
        self._probe, self.store, self.board, self.role, self.n_workers = new, rb.store, board, role, n_workers
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
                s = dict(s, done=1.0, retired=1.0)  # its samples stay counted; nobody waits for it
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
            if rank >= self.n_servers:
                entries.append(self._lost_worker(rank - self.n_servers, rank, noticed, self.n_workers))
            else:
                host = next((self.world_ranks[roles[o][0]] for o, a in promoted.items() if a.index == rank), rank)
                entry = {"event": "lost_server", "server": rank, "rank": rank, "time": round(noticed, 3),
                         "workers": self.n_workers, "killed_at": self.kill_ranks.get(rank),
                         "pushes_lost": rb.lost_pushes,
                         "replica_rank": (self.world_ranks[rb.replica_rank] if rb.replica_rank is not None
                                          else None),
                         "now_hosted_by": host}
                self.lost_servers.append(entry)
                self._say(f"server {rank} (rank {rank}) lost at {noticed:.1f} s; shard {rank} restored from rank "
                          f"{entry['replica_rank']}'s replica ({rb.lost_pushes} pushes lost), now hosted by rank "
                          f"{host}; {self.n_workers} workers continue")
                self._event(entry)
                entries.append(entry)
        self._recovered(noticed, f"shrink, store and board rebuilt on {self._probe.size} ranks")
        self._awaiting_push = (rb.version_base, entries)

    def resume_hint(self) -> str:
        """'; continue with --resume PATH' when a checkpoint file exists, else ''."""
        if self.checkpoint_path and os.path.exists(self.checkpoint_path):
            return f"; continue with the same command plus --resume {self.checkpoint_path}"
        return ""

    def _root_lost_message(self, noticed) -> str:
        """Rank 0 died: it held the monitor, the version counter and the checkpoints."""
        if self.checkpoint_path and os.path.exists(self.checkpoint_path):
            where = (f"the last checkpoint, {self.checkpoint_path}, is intact: continue with the same command "
                     f"plus --resume {self.checkpoint_path}")
        elif self.checkpoint_path:
            where = (f"no checkpoint had been written yet to {self.checkpoint_path} (checked from this host): "
                     f"restart the run; with the file in place, --resume {self.checkpoint_path} continues it")
        else:
            where = "no checkpoint was being written (add --checkpoint-every SECONDS to be able to --resume)"
        return (f"asyncsgd: error: rank 0 lost at {noticed:.1f} s: it held the monitor and the store's "
                f"version counter, so the job ends; {where}\n")

    # ---------------------------------------------------------------- reporting

    def rows(self):
        """Rank 0: the board's rows plus the retired rows (dead or promoted workers), for the totals."""
        stats, hist = self.board.rows()
        if not self.retired:
            return stats, hist
        return (stats + [s for s, _ in self.retired],
                numpy.concatenate([hist, numpy.array([h for _, h in self.retired])]))

    def _summary_keys(self) -> dict:
        return {"lost_servers": self.lost_servers, "workers_at_end": self.n_workers}

    # ---------------------------------------------------------------- lifetime

    def free(self, exc_type=None):
        """End of the run: free the current objects (collective) or, on an exception, abandon them (no MPI)."""
        if self._stuck is not None:
            self._stuck.stop()
        for owner in (self.board, self.store):
            owner.__exit__(exc_type, None, None)
        if self.enabled and exc_type is None:
            self._heartbeats.free()
            self._probe.Free()
