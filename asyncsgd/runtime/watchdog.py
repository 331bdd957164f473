"""Detect a dead rank and end the whole job with a message naming it, instead of hanging.

Two mechanisms, because launchers differ (measured with the PyPI MPIs):

* Heartbeats.  Rank 0 and every other rank exchange a small message every ``interval`` seconds on a private
  communicator, from a daemon thread.  A peer silent for ``timeout`` seconds is reported by the surviving side
  ("rank 3 (pid 4711 on node7) stopped responding ...") and the job is aborted.  This covers ``srun`` (which by
  default lets the other tasks run on) and MPICH's ``mpiexec -disable-auto-cleanup``.
* Signals from the launcher.  The moment a rank dies, Open MPI's ``mpiexec`` sends SIGTERM to the survivors and
  MPICH's ``mpiexec -disable-auto-cleanup`` sends SIGUSR1; rank 0 then checks which of its node's peers are gone
  and names them before exiting.  MPICH's ``mpiexec`` with its default auto-cleanup kills the survivors with SIGKILL
  at once, so there only its own "BAD TERMINATION ... PID" banner appears; the job still ends within seconds.

With ``fault_tolerant=True`` (Downpour under ``mpirun --with-ft ulfm``, docs/FAULT_TOLERANCE.md) the watchdog hands a
dead or silent rank to the run-through path instead of aborting: a silent peer on this host is SIGKILLed, which
ULFM then reports as a failure to the trainer's safe points; a dead peer stops the heartbeat thread quietly (its
communicator holds a dead rank from then on, and the trainer's own heartbeats on the shrunk communicator take over);
``stop()`` then frees nothing.

A SIGTERM is also how SLURM ends a job (``scancel``, the time limit, preemption: SIGKILL follows ``KillWait`` seconds
later).  When the run has a stop file (``--stop-file``, asyncsgd.runtime.stop_request) and no peer on this host is
gone, a SIGTERM is taken as a stop request instead: rank 0 hands it to the run's active request (or, before its
monitor loop runs, creates the stop file), and a rank given ``stop_file`` ignores it and trains on until rank 0's stop
flag ends its step.  SIGUSR1 keeps its one meaning (MPICH's launcher: a peer died); SLURM's time-limit warning
(``--signal=B:USR1@60``) goes to the batch shell, which creates the stop file (jobs/*.sh).
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import warnings

import numpy
from mpi4py import MPI

from asyncsgd.rma.owner import WindowOwner
from asyncsgd.runtime.env import heartbeat_timeout
from asyncsgd.runtime.faults import fault_point
from asyncsgd.runtime.mpi import abort_job
from asyncsgd.runtime import stop_request
from asyncsgd.ulfm.primitives import RankFailure, failed_ranks, is_failure, safe_point
from asyncsgd.ulfm.processes import kill_local_process, starved

__all__ = ["Watchdog"]

_TAG = 7301


class Watchdog(WindowOwner):
    """Heartbeats between rank 0 and the other ranks of ``comm``; collective constructor, ``stop()`` collective.

    A ``with`` block stops it on success; on an exception it keeps beating until the job is aborted
    (``WindowOwner``: no collective on an error path).
    """

    def __init__(self, comm, *, interval: float = 1.0, timeout: float | None = None, stream=None,
                 fault_tolerant: bool = False, stop_file: str | None = None):
        self.comm = comm.Dup()
        self.stop_file = stop_file  # the run's --stop-file: a SIGTERM with no local peer gone is a stop request
        self.fault_tolerant = bool(fault_tolerant)
        self.peer_failed = False  # fault tolerance: the thread saw a dead rank and stopped
        self._own(self.comm)
        self.interval = interval
        self.timeout = heartbeat_timeout() if timeout is None else timeout
        self.stream = sys.stderr if stream is None else stream
        self.peers_info = self.comm.allgather((os.getpid(), socket.gethostname()))
        rank, size = self.comm.rank, self.comm.size
        self.peers = [r for r in range(size) if r != rank] if rank == 0 else ([0] if size > 1 else [])
        self._halt = threading.Event()
        self._sends = []
        self._thread = None
        self._previous_handlers = {}
        # The heartbeat thread calls MPI while the main thread does too, which MPI allows only at
        # MPI_THREAD_MULTIPLE (mpi4py's default; a user can lower it with mpi4py.rc.thread_level).  Below that,
        # concurrent calls are undefined (crashes, corrupted queues), so the job runs without heartbeats: the
        # launcher's signals still end it when a rank dies, and a warning says what is lost.
        threaded = MPI.Query_thread() >= MPI.THREAD_MULTIPLE
        if size > 1 and not threaded and rank == 0:
            warnings.warn("MPI was initialised below MPI_THREAD_MULTIPLE, so the heartbeat watchdog is off: a hung "
                          "rank will not be detected (leave mpi4py.rc.thread_level at 'multiple')", RuntimeWarning,
                          stacklevel=2)
        if size > 1 and threaded:
            self._thread = threading.Thread(target=self._loop, name="asyncsgd-watchdog", daemon=True)
            self._thread.start()
        if size > 1 and rank == 0 and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self._previous_handlers[sig] = signal.signal(sig, self._on_launcher_signal)
        elif size > 1 and stop_file and threading.current_thread() is threading.main_thread():
            self._previous_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_stop_signal)

    def describe(self, rank: int) -> str:
        pid, host = self.peers_info[rank]
        return f"rank {rank} (pid {pid} on {host})"

    def _say(self, text: str):
        self.stream.write(f"asyncsgd: error: {text}\n")
        self.stream.flush()

    def _loop(self):
        try:
            self._watch()
        except MPI.Exception as exc:
            if not is_failure(self.comm, exc):  # only under ULFM does MPI report a dead peer instead of ending
                raise
            if self.fault_tolerant:
                self.peer_failed = True  # handed over: the trainer's safe points recover from it
                return
            dead = failed_ranks(self.comm)
            self._say(f"{', '.join(self.describe(r) for r in dead) or 'a rank'} died; fault tolerance is off "
                      f"(--fault-tolerance), so {self.describe(self.comm.rank)} is ending the job")
            abort_job(self.comm, 1)

    def _watch(self):
        now = time.monotonic()
        last_seen = {p: now for p in self.peers}
        beat = numpy.zeros(1, dtype=numpy.int64)
        inbox = numpy.zeros(1, dtype=numpy.int64)
        status = MPI.Status()
        next_beat = 0.0
        while not self._halt.is_set():
            fault_point("heartbeat")
            now = time.monotonic()
            if now >= next_beat:
                self._sends = [r for r in self._sends if not r.Test()]
                for p in self.peers:
                    self._sends.append(self.comm.Isend(beat, dest=p, tag=_TAG))
                next_beat = now + self.interval
            while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG, status=status):
                self.comm.Recv(inbox, source=status.Get_source(), tag=_TAG)
                last_seen[status.Get_source()] = now
            for p, seen in list(last_seen.items()):
                pid, host = self.peers_info[p]
                if self.fault_tolerant and starved(host, pid, now - seen, self.timeout):
                    continue  # runnable: starved on an overloaded host, not hung (asyncsgd.ulfm.processes.starved)
                if now - seen > self.timeout and self.fault_tolerant and self._kill(p):
                    del last_seen[p]  # now a dead rank: the trainer's recovery takes it from here
                    continue
                if now - seen > self.timeout:
                    self._say(f"{self.describe(p)} stopped responding for {now - seen:.0f} s (it died or hangs); "
                              f"{self.describe(self.comm.rank)} is ending the job")
                    abort_job(self.comm, 1)
            self._halt.wait(0.1)

    def _kill(self, rank: int) -> bool:
        """Fault tolerance: SIGKILL a silent peer on this host (a stopped process is alive to MPI); say so."""
        pid, host = self.peers_info[rank]
        if not kill_local_process(host, pid):
            return False
        self.stream.write(f"asyncsgd: {self.describe(rank)} stopped responding for more than {self.timeout:g} s: "
                          f"killed it; fault tolerance is on, the others continue\n")
        self.stream.flush()
        return True

    def _local_peers_gone(self) -> list:
        gone = []
        here = socket.gethostname()
        for r, (pid, host) in enumerate(self.peers_info):
            if r == self.comm.rank or host != here:
                continue
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                gone.append(r)
        return gone

    def _note(self, text: str):
        """A line on stderr from a signal handler (os.write: the stream may be in the middle of a write)."""
        os.write(2, f"asyncsgd: {text}\n".encode())

    def _on_stop_signal(self, signum, frame):
        """A rank other than 0 with a stop file: SIGTERM is a stop request unless a peer here died (then it ends
        this rank, as SIGTERM's default would)."""
        if self._local_peers_gone():
            os._exit(128 + signum)
        self._note(f"{self.describe(self.comm.rank)}: SIGTERM taken as a stop request (--stop-file): training "
                   f"on until rank 0 stops the run")

    def _on_launcher_signal(self, signum, frame):
        gone = self._local_peers_gone()
        request = stop_request.active()
        if not gone and signum == signal.SIGTERM and (request is not None or self.stop_file):
            if request is not None:
                request.signalled(signal.Signals(signum).name)
            else:  # before rank 0's monitor loop runs: it finds the file when it starts
                with open(self.stop_file, "a"):
                    pass
            self._note(f"SIGTERM taken as a stop request: every worker ends its step, then rank 0 writes the "
                       f"checkpoint")
            return
        if gone:
            self._say(", ".join(self.describe(r) for r in gone) + " died; the launcher is ending the job")
        else:
            self._say(f"terminated by the launcher ({signal.Signals(signum).name})")
        os._exit(128 + signum)

    def stop(self):
        """Stop the heartbeats (collective: every rank calls it when it is about to finish normally)."""
        from asyncsgd.runtime.mpi import polled_barrier

        if self.comm == MPI.COMM_NULL:
            return
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers = {}
        if self._thread is None:  # a one-rank job (no peers to watch), or heartbeats off (see __init__)
            self.comm.Free()
            self.comm = MPI.COMM_NULL
            return
        if self.fault_tolerant and not self._stop_fault_tolerant():
            return
        polled_barrier(self.comm)  # nobody stops listening while a peer could still time it out
        self._halt.set()
        self._thread.join()
        self._thread = None
        polled_barrier(self.comm)
        status = MPI.Status()
        inbox = numpy.zeros(1, dtype=numpy.int64)
        while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG, status=status):  # drain late heartbeats
            self.comm.Recv(inbox, source=status.Get_source(), tag=_TAG)
        deadline = time.monotonic() + 5
        while self._sends and time.monotonic() < deadline:
            self._sends = [r for r in self._sends if not r.Test()]
            time.sleep(0.001)
        self.comm.Free()
        self.comm = MPI.COMM_NULL

    def _stop_fault_tolerant(self) -> bool:
        """Meet the peers if all are alive (return True: stop as usual); else stop this rank's thread and free
        nothing (the communicator holds a dead rank) and return False."""
        if not self.peer_failed:
            try:
                safe_point(self.comm, timeout=60)
                return True
            except (RankFailure, TimeoutError):
                pass
        self._halt.set()
        self._thread.join()
        self._thread = None
        self.comm = MPI.COMM_NULL  # not freed: a dead rank is in it
        return False

    free = stop  # the WindowOwner name: leaving a ``with`` block normally stops the watchdog
