"""Downpour's parameter store: the flat float32 parameter vector in contiguous shards of MPI RMA windows.

Ranks 0..S-1 of the communicator each host one shard in an ``MPI.Win.Allocate`` window (``Win.Create`` is slower
and gets no asynchronous progress on Open MPI 5); rank 0 also hosts the version counter.  Workers use passive
target operations only, so a server's CPU never takes part in a transfer:

- fetch: per shard ``Get`` + ``Flush`` (``Get`` on an allocated window runs near memcpy speed);
- push: ``Accumulate(SUM)``, element-wise atomic, so concurrent pushes never lose an update;
- sparse push: ``Accumulate`` through an indexed target datatype, one per shard touched, freed after use;
- Adagrad: a second window per shard holds the sums of squared gradients; ``Get_accumulate(g*g, SUM)`` returns the
  old sums atomically, the worker computes ``step = -lr * g / sqrt(old + g*g + eps)`` and accumulates it.

Every rank opens one shared passive epoch per window (``Lock_all``) at construction and closes it in ``free()``;
each operation ends with ``Flush``, because within an epoch a ``Get`` issued after an ``Accumulate`` is unordered
with it.  Hosting ranks run a ``ProgressThread`` (see progress.py for the measurements behind it).

``poll_s`` (None by default): when set, ``fetch``, ``push`` and ``push_sparse`` issue request-based operations
(``Rget``/``Raccumulate``) and test them every ``poll_s`` seconds, sleeping in between, before the ``Flush``: MPICH
spins a core inside a blocking ``Flush`` for as long as the data travels, which a worker's communication thread
(``--overlap``) would take from the compute beside it.

Staleness (``push`` states it exactly): tau counts the other workers' pushes that started before this push and had
not landed when this worker's fetch began, measured with two counters on rank 0 (``VersionCounter``): ``started``
(taken before a push's data moves, so the staleness weight is known before the data moves) and ``landed`` (bumped
after the push's ``Flush``).  Origin buffers of every RMA call stay referenced until the ``Flush`` that completes it.
"""
from __future__ import annotations

import math
import numbers
import time
from array import array
from bisect import bisect_left

import numpy
from mpi4py import MPI

from asyncsgd.runtime.mpi import polled_barrier
from asyncsgd.data.partition import contiguous_bounds
from asyncsgd.rma.counter import VersionCounter
from asyncsgd.rma.owner import WindowOwner
from asyncsgd.rma.progress_thread import ProgressThread

__all__ = ["ShardedParameters", "shard_bounds"]

DTYPE = numpy.dtype(numpy.float32)
_MPI_DTYPE = MPI.FLOAT
# Elements per MPI call.  MPI counts are C ints (< 2**31); 2**28 float32 = 1 GiB keeps every count far below that.
# Module level so tests can shrink it to exercise the chunked path.
_MAX_COUNT = 1 << 28
_MAX_SHARD = (1 << 31) - 1  # elements: indexed datatypes take C int displacements
_INDEX_BYTES = 4  # one displacement of an indexed datatype, as an MPI implementation ships it
# This rank's pushes remembered for staleness (8 bytes each): a base_version older than the last ones is refused.
_OWN_HISTORY = 1 << 16


def shard_bounds(n_params: int, n_servers: int) -> tuple:
    """Split ``range(n_params)`` into ``n_servers`` contiguous ``(start, stop)`` shards whose sizes differ by <= 1.

    The first ``n_params % n_servers`` shards hold one extra element (``asyncsgd.data.partition.contiguous_bounds``).
    """
    n_params = _as_count(n_params, "n_params", minimum=1)
    n_servers = _as_count(n_servers, "n_servers", minimum=1)
    if n_servers > n_params:
        raise ValueError(f"n_servers={n_servers} is more shards than parameters ({n_params}): use at most "
                         f"{n_params} servers")
    return contiguous_bounds(n_params, n_servers)


def _as_count(value, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _chunks(start: int, stop: int):
    """Yield ``(lo, hi)`` pieces of ``[start, stop)`` no longer than ``_MAX_COUNT``."""
    for lo in range(start, stop, _MAX_COUNT):
        yield lo, min(lo + _MAX_COUNT, stop)


def _indexed_type(disp: numpy.ndarray):
    """Return a committed datatype of float32 at sorted element displacements ``disp`` (int64 [k]) and its size.

    Runs of consecutive displacements become blocks (block-sparse pushes); scattered ones use blocklength 1.
    The size is the bytes of datatype description the target has to receive (one int per block, plus one block
    length per block when blocks are longer than one element).
    """
    starts = numpy.flatnonzero(numpy.diff(disp) != 1) + 1
    starts = numpy.concatenate(([0], starts))
    if 2 * starts.size <= disp.size:
        lengths = numpy.diff(numpy.concatenate((starts, [disp.size])))
        dtype = _MPI_DTYPE.Create_indexed(lengths.tolist(), disp[starts].tolist())
        desc_bytes = 2 * _INDEX_BYTES * starts.size
    else:
        dtype = _MPI_DTYPE.Create_indexed_block(1, disp.tolist())
        desc_bytes = _INDEX_BYTES * disp.size
    return dtype.Commit(), desc_bytes


def _adagrad_step(grad, old_sums, squares, lr: float, eps: float, scale: float, out=None):
    """Return ``-lr * scale * grad / sqrt(old_sums + squares + eps)`` in float32 (all arrays float32 [k]).

    ``out`` (float32 [k], not aliasing the inputs) receives the step; the arithmetic is done in place to spare
    the temporaries of a full-vector expression.
    """
    if out is None:
        out = numpy.empty_like(grad)
    denom = numpy.add(old_sums, squares)
    denom += DTYPE.type(eps)
    numpy.sqrt(denom, out=denom)
    numpy.multiply(grad, DTYPE.type(-lr * scale), out=out)
    out /= denom
    return out


class ShardedParameters(WindowOwner):
    """A float32 vector of ``n_params`` sharded over ranks ``0..n_servers-1`` of ``comm`` in RMA windows.

    Collective over ``comm`` (which it ``Dup``s): construction, ``free()`` and leaving the ``with`` block.  Every
    other method is one-sided and may be called by any rank at any time, concurrently with the others.
    ``initial`` (float [n_params], needed on hosting ranks only) sets the start values; None means zeros.
    ``n_servers == comm.size`` is allowed (every rank hosts and may push); choosing roles is the trainer's job.
    With ``adagrad=True`` a second window per shard holds the per-parameter sums of squared gradients.

    ``version`` starts the version counter there instead of 0 (a store rebuilt after a rank died continues the
    old numbering, ``asyncsgd.store.rebuild``).

    Leaving a ``with`` block by an exception on a multi-rank store does not free it (``WindowOwner``).
    One object serves one thread of its rank.

    Per-rank statistics of this rank's own calls: ``pushes``, ``push_bytes`` (payload moved by this rank's pushes:
    values, both directions for Adagrad, plus a sparse push's index datatype: 4 bytes per scattered index, 8 per run
    of consecutive indices), ``fetches``.
    """

    def __init__(self, comm, n_params: int, *, n_servers: int = 1, initial=None, adagrad: bool = False,
                 version: int = 0):
        n_params = _as_count(n_params, "n_params", minimum=1)
        n_servers = _as_count(n_servers, "n_servers", minimum=1)
        if n_servers > comm.size:
            raise ValueError(f"n_servers={n_servers} exceeds the communicator's {comm.size} ranks: host the "
                             f"shards on at most {comm.size} ranks")
        bounds = shard_bounds(n_params, n_servers)
        if bounds[0][1] > _MAX_SHARD:
            raise ValueError(f"a shard of {bounds[0][1]} parameters is too big for MPI's int displacements of "
                             f"sparse pushes: use at least {-(-n_params // _MAX_SHARD)} servers")
        if initial is not None:
            initial = self._float_vector(initial, "initial", n_params)
        self._n_params = n_params
        self._bounds = bounds
        self._adagrad = bool(adagrad)
        self._freed = False
        self._work = []
        self._own_landed = array("q")  # where each of this rank's pushes fell in the landed count, increasing
        self._own_floor = 0  # bases below this are older than the remembered pushes
        self._fetch_overlap = 0
        self.poll_s = None  # seconds between tests of request-based transfers; None: blocking Flush
        self.pushes = 0
        self.push_bytes = 0
        self.fetches = 0

        self._comm = comm.Dup()
        self._own(self._comm)
        rank = self._comm.rank
        self._is_server = rank < n_servers
        start, stop = bounds[rank] if self._is_server else (0, 0)
        nbytes = (stop - start) * DTYPE.itemsize
        self._params = MPI.Win.Allocate(nbytes, DTYPE.itemsize, comm=self._comm)
        self._sums = MPI.Win.Allocate(nbytes, DTYPE.itemsize, comm=self._comm) if self._adagrad else None
        if self._is_server:
            shard = (numpy.zeros(stop - start, DTYPE) if initial is None
                     else numpy.ascontiguousarray(initial[start:stop]))
            self._init_local(self._params, rank, shard)
            if self._sums is not None:
                self._init_local(self._sums, rank, numpy.zeros(stop - start, DTYPE))
        self._counter = VersionCounter(self._comm, root=0, initial=version)  # its barrier also publishes the shard initialisation
        for win in self._windows():
            win.Lock_all(MPI.MODE_NOCHECK)  # shared epochs only, never an exclusive lock: NOCHECK is valid

        # Every rank Dups (collective); only hosts poll.  A lone rank has no peers to serve.
        self._progress_comm = self._comm.Dup()
        self._progress = None
        if self._is_server and self._comm.size > 1:
            self._progress = ProgressThread(self._progress_comm).start()

    # ---------------------------------------------------------------- properties

    @property
    def n_params(self) -> int:
        """Length of the parameter vector."""
        return self._n_params

    @property
    def n_servers(self) -> int:
        """Number of hosting ranks (ranks 0..n_servers-1)."""
        return len(self._bounds)

    @property
    def bounds(self) -> tuple:
        """``((start, stop), ...)`` of each shard, shard i on rank i."""
        return self._bounds

    @property
    def adagrad(self) -> bool:
        """Whether the store keeps Adagrad sums of squared gradients."""
        return self._adagrad

    @property
    def is_server(self) -> bool:
        """Whether this rank hosts a shard."""
        return self._is_server

    @property
    def progress_running(self) -> bool:
        """Whether this rank's progress thread is polling (hosts of a multi-rank store, until ``free()``)."""
        return self._progress is not None and self._progress.running

    def stats(self) -> dict:
        """Return this rank's ``{'pushes', 'push_bytes', 'fetches'}``."""
        return {"pushes": self.pushes, "push_bytes": self.push_bytes, "fetches": self.fetches}

    # ---------------------------------------------------------------- reads

    def fetch(self, out: numpy.ndarray) -> int:
        """Copy every shard into ``out`` (float32 [n_params], C-contiguous); return the version it started from.

        The version is the number of pushes landed before the first ``Get``: every one of them is wholly inside
        ``out``.  Pass it to the pushes as ``base_version``.  ``fetch_overlap`` afterwards says how many pushes may
        be partly inside ``out`` without being counted in the version (the bound on tau's over-count, see ``push``).
        """
        self._check_alive()
        out = self._buffer(out, "out", writeable=True)
        version = self._counter.landed()
        self._get_all(self._params, out)
        # Pushes that started before the Gets were over: the only ones whose data can be in ``out`` unless counted
        # in ``version``.  This rank's own pushes have all landed (each push lands before it returns).
        self._fetch_overlap = self._counter.started() - version
        self.fetches += 1
        return version

    @property
    def fetch_overlap(self) -> int:
        """Pushes that had not landed when this rank's last fetch began but had started when its Gets ended.

        The only pushes that can be partly inside the fetched parameters yet uncounted in its version: tau of a push
        based on that fetch over-counts by at most this number (0: tau is exact).
        """
        return self._fetch_overlap

    def version(self) -> int:
        """Return the number of pushes landed so far by all ranks (a valid ``base_version``, like ``fetch``'s)."""
        self._check_alive()
        return self._counter.landed()

    def read_all(self) -> numpy.ndarray:
        """Return a copy of the whole parameter vector (float32 [n_params]); not counted as a fetch."""
        self._check_alive()
        return self._get_all(self._params, numpy.empty(self._n_params, DTYPE))

    def adagrad_sums(self) -> numpy.ndarray:
        """Return a copy of the Adagrad sums of squared gradients (float32 [n_params])."""
        self._check_alive()
        self._need_adagrad("adagrad_sums")
        return self._get_all(self._sums, numpy.empty(self._n_params, DTYPE))

    # ---------------------------------------------------------------- pushes

    def push(self, delta: numpy.ndarray, *, base_version: int, weight=None) -> int:
        """Add ``weight(tau) * delta`` (float32 [n_params]) to the store atomically; return the staleness tau.

        ``base_version`` is what ``fetch`` (or ``version``) returned.  tau is the number of OTHER ranks' pushes that
        started before this one and had not landed when that fetch began: the updates this push's gradient did not
        see.  It never under-counts (a push missing from the fetched parameters, wholly or partly, had not landed
        when the fetch began, and is counted if it started before this push); it over-counts by at most the
        pushes that landed while the fetch was reading (``fetch_overlap``; none when no push overlapped the fetch).
        This rank's own pushes since the fetch are never counted: a lone worker always sees tau = 0.
        ``weight`` maps tau to a factor (None: 1), computed before any data moves.  The same tau is returned by
        ``push_sparse``, ``push_adagrad`` and ``push_adagrad_sparse``.
        """
        self._check_alive()
        delta = self._buffer(delta, "delta")
        tau, scale = self._start_push(base_version, weight)
        update = delta if scale == 1.0 else numpy.multiply(delta, DTYPE.type(scale), out=self._scratch(1)[0])
        win = self._params
        requests = []
        for rank, (start, stop) in enumerate(self._bounds):
            for lo, hi in _chunks(start, stop):
                target = (lo - start, hi - lo, _MPI_DTYPE)
                if self.poll_s is None:
                    win.Accumulate([update[lo:hi], _MPI_DTYPE], rank, target, MPI.SUM)
                else:
                    requests.append(win.Raccumulate([update[lo:hi], _MPI_DTYPE], rank, target, MPI.SUM))
        self._sleep_until_done(requests)
        self._flush(win)  # ``update`` (possibly scratch) is referenced until here
        self._land_push()
        self.pushes += 1
        self.push_bytes += update.nbytes
        return tau

    def push_sparse(self, idx: numpy.ndarray, vals: numpy.ndarray, *, base_version: int, weight=None) -> int:
        """Add ``weight(tau) * vals`` at positions ``idx`` (int [k], float32 [k]); return tau.

        Entries outside ``idx`` are untouched.  Repeated indices are summed first.
        """
        self._check_alive()
        idx, vals = self._sparse(idx, vals)
        tau, scale = self._start_push(base_version, weight)
        if scale != 1.0:
            vals = vals * DTYPE.type(scale)  # ``vals`` stays referenced until the flushes below
        win = self._params
        issued = []  # (rank, datatype): every shard's transfer is issued before any is waited for
        requests = []
        for rank, disp, part in self._split(idx, vals):
            for lo, hi in _chunks(0, disp.size):
                dtype, desc_bytes = _indexed_type(disp[lo:hi])
                if self.poll_s is None:
                    win.Accumulate([part[lo:hi], _MPI_DTYPE], rank, (0, 1, dtype), MPI.SUM)
                else:
                    requests.append(win.Raccumulate([part[lo:hi], _MPI_DTYPE], rank, (0, 1, dtype), MPI.SUM))
                issued.append((rank, dtype))
                self.push_bytes += part[lo:hi].nbytes + desc_bytes
        self._sleep_until_done(requests)
        for rank, dtype in issued:
            win.Flush(rank)  # complete before the datatype goes
            dtype.Free()
        self._land_push()
        self.pushes += 1
        return tau

    def push_adagrad(self, grad: numpy.ndarray, lr: float, eps: float, *, base_version: int, weight=None) -> int:
        """Apply an Adagrad step for ``grad`` (float32 [n_params]) at the store; return tau.

        Per element: ``old = sums; sums += g*g`` (atomic ``Get_accumulate``), then
        ``params += -lr * weight(tau) * g / sqrt(old + g*g + eps)``.
        """
        self._check_alive()
        self._need_adagrad("push_adagrad")
        grad = self._buffer(grad, "grad")
        lr, eps = self._rates(lr, eps)
        tau, scale = self._start_push(base_version, weight)
        squares, old, step = self._scratch(3)
        numpy.multiply(grad, grad, out=squares)
        for rank, (start, stop) in enumerate(self._bounds):
            for lo, hi in _chunks(start, stop):
                self._sums.Get_accumulate([squares[lo:hi], _MPI_DTYPE], [old[lo:hi], _MPI_DTYPE], rank,
                                          (lo - start, hi - lo, _MPI_DTYPE), MPI.SUM)
            self._sums.Flush(rank)
            piece = slice(start, stop)
            _adagrad_step(grad[piece], old[piece], squares[piece], lr, eps, scale, out=step[piece])
            for lo, hi in _chunks(start, stop):
                self._params.Accumulate([step[lo:hi], _MPI_DTYPE], rank, (lo - start, hi - lo, _MPI_DTYPE),
                                        MPI.SUM)
        self._flush(self._params)
        self._land_push()
        self.pushes += 1
        self.push_bytes += 3 * grad.nbytes  # squares out, old sums back, step out
        return tau

    def push_adagrad_sparse(self, idx: numpy.ndarray, vals: numpy.ndarray, lr: float, eps: float, *,
                            base_version: int, weight=None) -> int:
        """Apply an Adagrad step for a sparse gradient (int [k], float32 [k]) at the store; return tau.

        Only the entries at ``idx`` of the parameters and of the sums change.  Repeated indices are summed first.
        """
        self._check_alive()
        self._need_adagrad("push_adagrad_sparse")
        idx, vals = self._sparse(idx, vals)
        lr, eps = self._rates(lr, eps)
        tau, scale = self._start_push(base_version, weight)
        for rank, disp, grad in self._split(idx, vals):
            for lo, hi in _chunks(0, disp.size):
                g = grad[lo:hi]
                squares = g * g
                old = numpy.empty_like(g)
                dtype, desc_bytes = _indexed_type(disp[lo:hi])
                self._sums.Get_accumulate([squares, _MPI_DTYPE], [old, _MPI_DTYPE], rank, (0, 1, dtype), MPI.SUM)
                self._sums.Flush(rank)
                step = _adagrad_step(g, old, squares, lr, eps, scale)
                self._params.Accumulate([step, _MPI_DTYPE], rank, (0, 1, dtype), MPI.SUM)
                self._params.Flush(rank)  # squares, old and step are referenced until here
                dtype.Free()
                self.push_bytes += 3 * g.nbytes + 2 * desc_bytes
        self._land_push()
        self.pushes += 1
        return tau

    def load(self, params: numpy.ndarray, adagrad_sums: numpy.ndarray | None = None):
        """Overwrite the parameters (float [n_params]) and, if given, the Adagrad sums; called by one rank.

        Uses ``Accumulate(REPLACE)``; call it while no rank pushes (resuming, before workers start), since
        REPLACE racing with SUM is outside the window's default ``accumulate_ops`` (same_op_no_op).  The sums
        are left as they are when ``adagrad_sums`` is None.  The version counter is not changed.
        """
        self._check_alive()
        params = self._float_vector(params, "params", self._n_params)
        targets = [(self._params, params)]
        if adagrad_sums is not None:
            self._need_adagrad("load(adagrad_sums=...)")
            targets.append((self._sums, self._float_vector(adagrad_sums, "adagrad_sums", self._n_params)))
        for win, values in targets:
            for rank, (start, stop) in enumerate(self._bounds):
                for lo, hi in _chunks(start, stop):
                    win.Accumulate([values[lo:hi], _MPI_DTYPE], rank, (lo - start, hi - lo, _MPI_DTYPE),
                                   MPI.REPLACE)
            self._flush(win)

    # ---------------------------------------------------------------- lifetime

    def free(self):
        """Close every epoch and free every window (collective over the store's ranks); idempotent."""
        if self._freed:
            return
        self._freed = True
        self._work = []
        polled_barrier(self._comm)  # arrive together: MPICH spins in the blocking Win.Free below
        for win in self._windows():
            win.Unlock_all()
            win.Free()
        self._counter.free()
        if self._progress is not None:
            self._progress.stop()
        self._progress_comm.Free()
        self._comm.Free()

    def __enter__(self):
        self._check_alive()
        return self

    def _abandon(self):
        # leaving by an exception (WindowOwner): no collective free, only this rank's thread stops
        if self._progress is not None:
            self._progress.stop()

    def abandon(self):
        """Stop using the store without freeing it: no collective (its communicator may hold a dead rank).

        The progress thread stops and every later call raises RuntimeError, as after ``free()``.  The windows stay
        allocated until MPI_Finalize (``asyncsgd.store.rebuild`` builds a new store on the survivors).
        """
        self._abandon()
        self._freed = True

    def local_shard(self) -> numpy.ndarray:
        """Return a copy of the shard this rank hosts (float32; empty on a rank that hosts none).

        A ``Get`` from this rank's own window, flushed: it holds every push that completed before the call.
        """
        self._check_alive()
        if not self._is_server:
            return numpy.empty(0, DTYPE)
        rank = self._comm.rank
        start, stop = self._bounds[rank]
        out = numpy.empty(stop - start, DTYPE)
        for lo, hi in _chunks(0, stop - start):
            self._params.Get([out[lo:hi], _MPI_DTYPE], rank, (lo, hi - lo, _MPI_DTYPE))
        self._params.Flush(rank)
        return out

    def __repr__(self):
        state = "freed" if self._freed else f"version={self._counter.landed()}"
        return (f"ShardedParameters(n_params={self._n_params}, n_servers={self.n_servers}, "
                f"adagrad={self._adagrad}, {state})")

    # ---------------------------------------------------------------- helpers

    def _scratch(self, count: int):
        """Return ``count`` float32 [n_params] scratch vectors, allocated on first use and kept.

        Fresh full-size arrays on every push would page-fault their way in each time; dense pushes reuse these.
        """
        while len(self._work) < count:
            self._work.append(numpy.empty(self._n_params, DTYPE))
        return self._work[:count]

    def _windows(self):
        return [w for w in (self._params, self._sums) if w is not None]

    def _check_alive(self):
        if self._freed:
            raise RuntimeError("ShardedParameters used after free()")

    def _need_adagrad(self, what: str):
        if not self._adagrad:
            raise ValueError(f"{what} needs the Adagrad sums: build the store with adagrad=True")

    @staticmethod
    def _init_local(win, rank: int, values: numpy.ndarray):
        """Write this rank's own shard through RMA in an exclusive epoch (window memory starts undefined)."""
        win.Lock(rank, MPI.LOCK_EXCLUSIVE)
        for lo, hi in _chunks(0, values.size):
            win.Put([values[lo:hi], _MPI_DTYPE], rank, (lo, hi - lo, _MPI_DTYPE))
        win.Unlock(rank)

    def _get_all(self, win, out: numpy.ndarray) -> numpy.ndarray:
        if self.poll_s is not None:
            self._sleep_until_done([win.Rget([out[lo:hi], _MPI_DTYPE], rank, (lo - start, hi - lo, _MPI_DTYPE))
                                    for rank, (start, stop) in enumerate(self._bounds)
                                    for lo, hi in _chunks(start, stop)])
        for rank, (start, stop) in enumerate(self._bounds):
            if self.poll_s is None:
                for lo, hi in _chunks(start, stop):
                    win.Get([out[lo:hi], _MPI_DTYPE], rank, (lo - start, hi - lo, _MPI_DTYPE))
            win.Flush(rank)
        return out

    def _sleep_until_done(self, requests):
        """Test ``requests`` every ``poll_s`` seconds, sleeping in between (each test also drives MPI progress).

        A completed ``Rget`` has its data; a completed ``Raccumulate`` only frees its origin buffer: the ``Flush``
        that follows completes it at the target.
        """
        while requests and not MPI.Request.Testall(requests):
            time.sleep(self.poll_s)

    def _flush(self, win):
        for rank in range(len(self._bounds)):
            win.Flush(rank)

    def _start_push(self, base_version, weight):
        """Take a ticket from the started counter; return (tau, weight(tau)) before any data moves.

        tau = pushes started before this one - pushes landed before the fetch of ``base_version`` - this rank's
        own pushes landed since then (``_own_landed``: an own push is inside ``base_version`` iff it landed at a
        position below it).  Once the ticket is taken the push must land, even when it is rejected here, or every
        later tau of every rank would count it forever.
        """
        if isinstance(base_version, bool) or not isinstance(base_version, numbers.Integral) or base_version < 0:
            raise ValueError(f"base_version must be the non-negative int that fetch() returned, got {base_version!r}")
        base = int(base_version)
        if base < self._own_floor:
            raise ValueError(f"base_version={base} is older than the last {_OWN_HISTORY} pushes this rank remembers: "
                             f"fetch again and push with the version that fetch returns")
        ticket = self._counter.start()
        try:
            own_since = len(self._own_landed) - bisect_left(self._own_landed, base)
            tau = ticket - base - own_since
            if base > ticket or tau < 0:
                raise ValueError(f"base_version={base_version} is newer than the store's version: pass the value "
                                 f"fetch() or version() returned")
            scale = 1.0 if weight is None else float(weight(tau))
            if not math.isfinite(scale):
                raise ValueError(f"weight({tau}) returned {scale}; a staleness weight must be finite")
        except BaseException:
            self._land_push()  # an empty push: keeps started and landed in step
            raise
        return tau, scale

    def _land_push(self):
        """Count this rank's push as landed (its data is flushed); remember where it fell (the last ones only)."""
        self._own_landed.append(self._counter.land())
        if len(self._own_landed) > 2 * _OWN_HISTORY:
            # Forget the oldest half: a base above every forgotten position still gets an exact own count.
            self._own_floor = self._own_landed[_OWN_HISTORY - 1] + 1
            del self._own_landed[:_OWN_HISTORY]

    @staticmethod
    def _rates(lr, eps):
        # lr 0 is a legal rate: a decaying schedule (cosine, linear) ends there, and the last pushes of an epoch run
        # can see a global progress of 1 (a worker's partial last batch is counted as a whole one); the push then
        # moves no parameter but still adds its squares and counts
        lr, eps = float(lr), float(eps)
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0, got {lr}")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a positive finite number (it keeps 0/sqrt(0) away), got {eps}")
        return lr, eps

    def _buffer(self, array, name: str, *, writeable: bool = False) -> numpy.ndarray:
        """Check a dense float32 [n_params] C-contiguous numpy buffer."""
        if not isinstance(array, numpy.ndarray):
            raise ValueError(f"{name} must be a numpy.ndarray (copy GPU arrays to a host buffer first), "
                             f"got {type(array).__module__}.{type(array).__name__}")
        if array.dtype != DTYPE or array.shape != (self._n_params,):
            raise ValueError(f"{name} must be float32 of shape ({self._n_params},), got {array.dtype} of shape "
                             f"{array.shape}")
        if not array.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous: pass numpy.ascontiguousarray({name})")
        if writeable and not array.flags.writeable:
            raise ValueError(f"{name} must be writeable")
        return array

    @staticmethod
    def _float_vector(array, name: str, n: int) -> numpy.ndarray:
        """Check a floating numpy vector of length ``n``; return it as C-contiguous float32."""
        if not isinstance(array, numpy.ndarray):
            raise ValueError(f"{name} must be a numpy.ndarray, got {type(array).__module__}.{type(array).__name__}")
        if array.dtype.kind != "f" or array.shape != (n,):
            raise ValueError(f"{name} must be a float vector of shape ({n},), got {array.dtype} of shape "
                             f"{array.shape}")
        return numpy.ascontiguousarray(array, dtype=DTYPE)

    def _sparse(self, idx, vals):
        """Check a sparse update; return (sorted unique int64 indices [k], float32 values [k])."""
        if not isinstance(idx, numpy.ndarray) or not isinstance(vals, numpy.ndarray):
            raise ValueError("idx and vals must be numpy.ndarray (copy GPU arrays to host buffers first)")
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise ValueError(f"idx must be a 1-D integer array, got {idx.dtype} of shape {idx.shape}")
        if vals.dtype != DTYPE or vals.shape != idx.shape:
            raise ValueError(f"vals must be float32 of shape {idx.shape} (one value per index), got {vals.dtype} "
                             f"of shape {vals.shape}")
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= self._n_params):
            raise ValueError(f"idx must lie in [0, {self._n_params}), got values in [{int(idx.min())}, "
                             f"{int(idx.max())}]")
        idx = idx.astype(numpy.int64, copy=False)
        if idx.size > 1 and not bool(numpy.all(idx[1:] > idx[:-1])):
            # argsort + a neighbour test: several times faster than a stable sort or numpy.unique (top-k
            # selections arrive unsorted, and this runs on every sparse push).
            order = numpy.argsort(idx)
            idx, vals = idx[order], vals[order]
            repeated = idx[1:] == idx[:-1]
            if repeated.any():
                first = numpy.flatnonzero(numpy.concatenate(([True], ~repeated)))
                idx, vals = idx[first], numpy.add.reduceat(vals, first)
        return idx, numpy.ascontiguousarray(vals)

    def _split(self, idx, vals):
        """Yield (rank, shard-local displacements int64 [k_r], values float32 [k_r]) for each shard touched."""
        cuts = numpy.searchsorted(idx, [start for start, _ in self._bounds] + [self._n_params])
        for rank, (start, _) in enumerate(self._bounds):
            a, b = int(cuts[rank]), int(cuts[rank + 1])
            if b > a:
                yield rank, idx[a:b] - start, vals[a:b]
