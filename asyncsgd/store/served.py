"""The parameter store served by a thread on each server rank, with two-sided messages instead of RMA windows.

Why it exists (docs/NETWORK.md): between hosts, Open MPI 5.0 (PyPI) has no RMA transport over TCP that does not
emulate one-sided operations in software.  osc/rdma over btl/tcp (and osc/ucx over UCX's tcp transport) turn every
``MPI_Accumulate`` into lock + get + add + put + unlock, each step an active message that waits for the target's
progress engine, and workers pushing concurrently spin on that lock across the network: 5 workers x 2,000 pushes
did not finish in 280 s.  Here each server rank runs a thread that receives requests (fetch a shard, add a delta,
add a sparse delta, replace, bump or read a version counter) on a private communicator and applies them to its
shard itself: one request and one reply per shard per operation, whatever the MPI.  The thread applies requests one
at a time, so a push is atomic per shard (as ``Accumulate`` is per element) and no update is lost.

``ServedParameters`` is a ``ParameterStore`` (``asyncsgd.store.base``: the interface and the staleness bookkeeping)
like ``ShardedParameters``, its RMA sibling; only the data movement differs, and Adagrad needs the RMA store.  ``open_store`` picks the store:
``transport="messages"`` (or the environment's ``ASYNCSGD_STORE=messages``) for this one, else the RMA store.
Needs ``MPI_THREAD_MULTIPLE`` (mpi4py's default, granted by both PyPI MPIs).
"""
from __future__ import annotations

import atexit
import sys
import threading

import numpy
from mpi4py import MPI

from asyncsgd.rma.counter import LANDED, STARTED
from asyncsgd.runtime.mpi import polled_barrier
from asyncsgd.store.base import DTYPE, ParameterStore, chunks

__all__ = ["ServedParameters"]


# Request kinds (the first int64 of a request header) and the tags of the private communicators.
_FETCH, _ADD, _ADD_SPARSE, _REPLACE, _COUNTER = range(5)
_REQUEST, _PAYLOAD = 1, 2              # on the request communicator: headers, then their payloads
_REPLY = 3                              # on the reply communicator
_HEADER = 4                             # int64 words of a header: kind, a, b, c
# While a server thread runs, Python hands the GIL over at least this often (the default is 5 ms).  Every MPI call
# of the thread gives the GIL up and must get it back from a main thread that may be busy in Python, so each step of
# a request waited up to 5 ms: a fetch + push (10 requests) against servers busy in pure Python took 0.7 s.
_SWITCH_INTERVAL = 0.0005
_JOIN_TIMEOUT = 10.0                    # s to wait for a stopping server thread


# MPI error classes of a dead rank (ULFM); a failed reply send is dropped with its request
_FAILED = (MPI.ERR_PROC_FAILED, MPI.ERR_PROC_FAILED_PENDING, MPI.ERR_REVOKED)


def _failed_request(request) -> bool:
    try:
        return bool(request.Test())  # done: nothing left to keep
    except MPI.Exception:
        return True


class _Counters:
    """The ``VersionCounter`` interface (``start``, ``land``, ``started``, ``landed``) served by rank ``root``."""

    def __init__(self, client: "ServedParameters", root: int = 0):
        self._client = client
        self._root = root

    def _op(self, slot: int, add: int) -> int:
        reply = numpy.zeros(1, numpy.int64)
        self._client._request(self._root, (_COUNTER, slot, add, 0), reply=reply)
        return int(reply[0])

    def start(self) -> int:
        return self._op(STARTED, 1)

    def land(self) -> int:
        return self._op(LANDED, 1)

    def started(self) -> int:
        return self._op(STARTED, 0)

    def landed(self) -> int:
        return self._op(LANDED, 0)

    def read(self) -> int:
        return self.landed()


class _ShardServer:
    """The thread of a server rank: applies the requests of every rank to this rank's shard, one at a time.

    Polls with ``Iprobe`` every ``interval`` seconds while idle (as ``ProgressThread``), drains every waiting
    request before sleeping again, and ends on ``stop()``.
    """

    def __init__(self, requests, replies, shard: numpy.ndarray, counters, *, interval: float = 0.001,
                 fault_tolerant: bool = False):
        self._requests, self._replies = requests, replies
        self.shard = shard
        self.counters = counters            # numpy int64 [2] on the counters' rank, else None
        self._interval = interval
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="asyncsgd-shard-server", daemon=True)
        self.served = 0
        self._saved_switch = None
        self.failed = None                  # the exception that ended the thread, if any
        self._sending = []                  # (request, buffer) of replies on their way
        self.fault_tolerant = fault_tolerant  # run through a dead client (ULFM) instead of stopping
        self.dead_seen = False

    def start(self) -> "_ShardServer":
        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            raise RuntimeError("the served store needs MPI_THREAD_MULTIPLE; leave mpi4py.rc.thread_level at its "
                               "default ('multiple')")
        self._saved_switch = sys.getswitchinterval()
        sys.setswitchinterval(min(self._saved_switch, _SWITCH_INTERVAL))
        self._thread.start()
        atexit.register(self.stop)          # before mpi4py's own exit hook finalizes MPI
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self):
        """Stop serving and join the thread; idempotent."""
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            # Bounded: abandoned after an exception, the thread may be blocked sending to a rank that died.
            self._thread.join(timeout=_JOIN_TIMEOUT)
        if self._saved_switch is not None:
            sys.setswitchinterval(self._saved_switch)
            self._saved_switch = None
        atexit.unregister(self.stop)

    def _run(self):
        status = MPI.Status()
        header = numpy.zeros(_HEADER, numpy.int64)
        try:
            while not self._stopping.is_set():
                try:
                    self._reap()
                    if not self._requests.Iprobe(MPI.ANY_SOURCE, _REQUEST, status):
                        self._stopping.wait(self._interval)
                        continue
                    source = status.Get_source()
                    self._requests.Recv([header, MPI.INT64_T], source=source, tag=_REQUEST)
                    self._serve(source, *(int(v) for v in header))
                    self.served += 1
                except MPI.Exception as exc:
                    if not self._run_through(exc):
                        raise
            if not self._stopping.is_set() or not self.dead_seen:
                MPI.Request.Waitall([r for r, _ in self._sending])
        except Exception as exc:  # noqa: BLE001 - a bug, or a dead rank without fault tolerance: say so
            self.failed = exc
            sys.stderr.write(f"asyncsgd: shard server thread stopped: {exc!r}\n")

    def _run_through(self, exc) -> bool:
        """A client died (ULFM, fault tolerance on): forget what it sent or is owed and serve the others until the
        recovery abandons this store.  Return False when ``exc`` is no such failure (the thread then stops)."""
        if not self.fault_tolerant or exc.Get_error_class() not in _FAILED:
            return False
        self.dead_seen = True
        # An ANY_SOURCE probe raises until the failure is acknowledged; replies to the dead rank never complete.
        self._requests.Ack_failed()
        self._sending = [(r, b) for r, b in self._sending if not _failed_request(r)]
        return True

    def _reply(self, buf, datatype, dest: int):
        """Send a reply without waiting for it to leave: over TCP a blocking Send waits until the client's process
        has been scheduled to read it, which on busy cores stalled the thread (and every other client) for seconds.
        Replies to one client still arrive in order (MPI does not overtake between a pair, on one tag)."""
        self._sending.append((self._replies.Isend([buf, datatype], dest=dest, tag=_REPLY), buf))

    def _reap(self):
        if self._sending:
            self._sending = [(r, b) for r, b in self._sending if not r.Test()]

    def _serve(self, source: int, kind: int, a: int, b: int, c: int):
        shard, requests = self.shard, self._requests
        if kind == _FETCH:                  # [a, b) of the shard, copied: later pushes must not tear the reply
            self._reply(shard[a:b].copy(), MPI.FLOAT, source)
            return
        if kind == _COUNTER:                # slot a, add b; reply the value before
            before = self.counters[a:a + 1].copy()
            self.counters[a] += b
            self._reply(before, MPI.INT64_T, source)
            return
        if kind in (_ADD, _REPLACE):        # a dense piece for [a, b)
            piece = numpy.empty(b - a, DTYPE)
            requests.Recv([piece, MPI.FLOAT], source=source, tag=_PAYLOAD)
            if kind == _ADD:
                shard[a:b] += piece
            else:
                shard[a:b] = piece
        elif kind == _ADD_SPARSE:           # a unique shard-local indices (int64), then a values
            idx = numpy.empty(a, numpy.int64)
            vals = numpy.empty(a, DTYPE)
            requests.Recv([idx, MPI.INT64_T], source=source, tag=_PAYLOAD)
            requests.Recv([vals, MPI.FLOAT], source=source, tag=_PAYLOAD)
            shard[idx] += vals              # indices are unique (the client deduplicates): no lost entry
        self._reply(numpy.zeros(1, numpy.int64), MPI.INT64_T, source)  # applied


class ServedParameters(ParameterStore):
    """A ``ParameterStore`` with the shards kept in server ranks' memory and served by a thread (see module).

    The constructor of ``ShardedParameters`` (``adagrad=True`` is refused: use the RMA store), the same methods and
    staleness statement.  Collective over ``comm``: construction, ``free()`` and leaving the ``with`` block.
    """

    _NAME = "ServedParameters"

    def __init__(self, comm, n_params: int, *, n_servers: int = 1, initial=None, adagrad: bool = False,
                 version: int = 0, fault_tolerant: bool = False):
        # fault_tolerant (ULFM): a server thread serves on when a client dies, until the store is abandoned
        self.fault_tolerant = bool(fault_tolerant)
        if adagrad:
            raise ValueError("adagrad=True needs the RMA store: use transport='rma' (ASYNCSGD_STORE=rma)")
        if isinstance(version, bool) or not isinstance(version, (int, numpy.integer)) or version < 0:
            raise ValueError(f"version must be a non-negative int (the version to start from), got {version!r}")
        self._deferred = []                 # (MPI request, callback) of replies collected later (_defer)
        super().__init__(comm, n_params, n_servers=n_servers, initial=initial, version=version)

    def _open(self, shard, version: int):
        self._requests = self._comm.Dup()
        self._replies = self._comm.Dup()
        rank = self._comm.rank
        if shard is not None:               # this rank's _ShardServer is its ``_progress`` thread
            counters = numpy.full(2, int(version), numpy.int64) if rank == 0 else None
            self._progress = _ShardServer(self._requests, self._replies, shard, counters,
                                          fault_tolerant=self.fault_tolerant).start()
        self._counter = _Counters(self)
        polled_barrier(self._comm)          # every server listens before anyone asks

    # ---------------------------------------------------------------- transport

    def _request(self, server: int, header, *, payloads=(), reply=None):
        """Send one request (header, then payload buffers) to ``server`` and wait for its reply; return the reply."""
        if reply is None:
            reply = numpy.zeros(1, numpy.int64)
        self._exchange([(server, header, payloads, reply)])
        return reply

    def _exchange(self, requests):
        """Send every ``(server, header, payloads, reply buffer or None)`` at once and wait for all the replies.

        One round trip for all the shards instead of one per shard.  A rank has at most one request with a payload
        in flight per server (a server reads a request's payload right after its header), replies from one server
        arrive in request order, and every buffer stays referenced (``keep``) until ``Waitall`` has completed it.
        """
        pending, keep = [r for r, _ in self._deferred], []
        done, self._deferred = [f for _, f in self._deferred], []
        for server, header, payloads, reply in requests:
            if reply is None:
                reply = numpy.zeros(1, numpy.int64)
            pending.append(self._replies.Irecv(reply if isinstance(reply, list) else [reply, MPI.INT64_T],
                                               source=server, tag=_REPLY))
            head = numpy.array(header, numpy.int64)
            keep.append(head)
            pending.append(self._requests.Isend([head, MPI.INT64_T], dest=server, tag=_REQUEST))
            for buf in payloads:
                pending.append(self._requests.Isend(buf, dest=server, tag=_PAYLOAD))
        MPI.Request.Waitall(pending)
        for finish in done:
            finish()

    def _defer(self, server: int, header, finish):
        """Send a request whose reply is needed later: ``finish(reply value)`` runs when the next exchange (or
        ``_settle``) has it.  Replies from one server arrive in request order, so the next exchange with that
        server completes this one in the same round trip.
        """
        reply = numpy.zeros(1, numpy.int64)
        head = numpy.array(header, numpy.int64)
        recv = self._replies.Irecv([reply, MPI.INT64_T], source=server, tag=_REPLY)
        send = self._requests.Isend([head, MPI.INT64_T], dest=server, tag=_REQUEST)
        self._deferred += [(recv, lambda: finish(int(reply[0]))), (send, lambda: head)]

    def _settle(self):
        """Wait for every deferred reply."""
        if self._deferred:
            self._exchange([])

    def _read(self, out: numpy.ndarray) -> numpy.ndarray:
        for piece in self._rounds([(rank, (_FETCH, lo - start, hi - start, 0), (), [out[lo:hi], MPI.FLOAT])
                                   for rank, start, lo, hi in self._pieces()]):
            self._exchange(piece)
        return out

    @staticmethod
    def _rounds(requests):
        """Split requests into rounds with at most one request per server (replies match by source and tag)."""
        rounds = []
        for req in requests:
            for r in rounds:
                if all(other[0] != req[0] for other in r):
                    r.append(req)
                    break
            else:
                rounds.append([req])
        return rounds

    # ---------------------------------------------------------------- deferred counter replies

    def _note_overlap(self, version: int):
        # ``started`` after the reads, as the base's; its reply is only needed for fetch_overlap.
        self._defer(0, (_COUNTER, STARTED, 0, 0), lambda started: setattr(self, "_fetch_overlap", started - version))

    def _land_push(self):
        # As the base's (the data is applied at every server), but the position the push fell at is collected with
        # the next request to rank 0: a push costs two round trips instead of three.
        self._defer(0, (_COUNTER, LANDED, 1, 0), self._remember_landed)

    # version(): the landed read is ordered after this rank's deferred land (same server, same tag)

    # ---------------------------------------------------------------- pushes

    def _add(self, update: numpy.ndarray):
        self._send_dense(_ADD, update)

    def _add_sparse(self, idx: numpy.ndarray, vals: numpy.ndarray):
        requests = []
        for rank, disp, part in self._split(idx, vals):
            for lo, hi in chunks(0, disp.size):
                d = numpy.ascontiguousarray(disp[lo:hi], numpy.int64)
                v = numpy.ascontiguousarray(part[lo:hi])
                requests.append((rank, (_ADD_SPARSE, hi - lo, 0, 0), ([d, MPI.INT64_T], [v, MPI.FLOAT]), None))
                self.push_bytes += v.nbytes + d.nbytes
        for piece in self._rounds(requests):
            self._exchange(piece)

    def _replace(self, params: numpy.ndarray, sums: numpy.ndarray | None):
        self._send_dense(_REPLACE, params)  # sums is None: ``adagrad=True`` was refused

    def _send_dense(self, kind: int, values: numpy.ndarray):
        for piece in self._rounds([(rank, (kind, lo - start, hi - start, 0), ([values[lo:hi], MPI.FLOAT],), None)
                                   for rank, start, lo, hi in self._pieces()]):
            self._exchange(piece)

    def _read_own_shard(self, out: numpy.ndarray) -> numpy.ndarray:
        for lo, hi in chunks(0, out.size):     # through the server thread: ordered after every applied push
            self._request(self._comm.rank, (_FETCH, lo, hi, 0), reply=[out[lo:hi], MPI.FLOAT])
        return out

    @property
    def served(self) -> int:
        """Requests this rank's server thread has applied (0 on a rank that hosts no shard)."""
        return self._progress.served if self._progress is not None else 0

    # ---------------------------------------------------------------- lifetime

    def free(self):
        """Stop the server threads and free the communicators (collective over the store's ranks); idempotent."""
        if self._freed:
            return
        self._settle()
        self._freed = True
        self._work = []
        polled_barrier(self._comm)          # every rank's requests have been answered
        if self._progress is not None:
            self._progress.stop()
        polled_barrier(self._comm)          # no thread uses the communicators any more
        for c in (self._requests, self._replies, self._comm):
            c.Free()

    def __repr__(self):
        state = "freed" if self._freed else f"version={self._counter.landed()}"
        return f"ServedParameters(n_params={self._n_params}, n_servers={self.n_servers}, {state})"
