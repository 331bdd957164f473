"""What every Downpour parameter store has, whatever moves its data: ``ParameterStore``.

A store is a float32 vector of ``n_params`` split into contiguous shards (``shard_bounds``), shard i hosted by rank
i of its communicator, with two push counters (``started``, ``landed``) on rank 0.  This module holds the part that
does not depend on the transport:

- the public interface (``fetch``, ``push``, ``push_sparse``, ``push_adagrad``, ``push_adagrad_sparse``, ``load``,
  ``read_all``, ``adagrad_sums``, ``local_shard``, ``version``, the statistics) and the checks of its arguments;
- the staleness bookkeeping that ``push`` states: a ticket from ``started`` before the data moves, ``landed`` after,
  and this rank's own landed positions so that its own pushes are never counted;
- the chunking of transfers (``chunks``: at most ``MAX_COUNT`` elements per MPI call) and the Adagrad step
  (``adagrad_step``, the one formula of the package).

A transport subclasses it and moves the data: ``asyncsgd.store.sharded.ShardedParameters`` over MPI RMA windows,
``asyncsgd.store.served.ServedParameters`` over two-sided messages served by a thread.  It implements ``_open``
(windows or server threads, and ``self._counter``), ``_read``, ``_add``, ``_add_sparse``, ``_replace``,
``_read_own_shard`` and ``free``, and the Adagrad transfers when it keeps the sums.
"""
from __future__ import annotations

import math
import numbers
from array import array
from bisect import bisect_left

import numpy

from asyncsgd.data.partition import contiguous_bounds
from asyncsgd.rma.owner import WindowOwner

__all__ = ["ParameterStore", "shard_bounds", "chunks", "adagrad_step", "DTYPE", "MAX_COUNT"]

DTYPE = numpy.dtype(numpy.float32)
# Elements per MPI call.  MPI counts are C ints (< 2**31); 2**28 float32 = 1 GiB keeps every count far below that.
# Read by ``chunks`` at each call, so tests can shrink it to exercise the chunked path.
MAX_COUNT = 1 << 28
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


def chunks(start: int, stop: int):
    """Yield ``(lo, hi)`` pieces of ``[start, stop)`` no longer than ``MAX_COUNT``."""
    for lo in range(start, stop, MAX_COUNT):
        yield lo, min(lo + MAX_COUNT, stop)


def adagrad_step(grad, old_sums, lr: float, eps: float, weight: float = 1.0, *, squares=None, out=None):
    """Return the Adagrad step to ADD to the parameters: ``-(weight*lr) * g / sqrt(old_sums + g*g + eps)``.

    ``old_sums`` are the sums of squared gradients before this gradient (what ``Get_accumulate`` returns while it
    adds ``g*g``), so the step uses the sums including this gradient, as DistBelief's Adagrad does.  All arrays are
    1-D of one float dtype (float32 at the store); ``squares`` (``g*g``, when the caller has it already) and ``out``
    (not aliasing the inputs) are optional.  No input is modified.  The arithmetic is that of
    ``asyncsgd.backends.sparse.fused_update`` with no momentum (``weight*lr`` rounded to the dtype as one scalar, the
    division before the scaling), so the step equals that update's change of the parameters bit for bit; it is
    done in place to spare the temporaries of a full-vector expression.
    """
    dtype = grad.dtype
    if out is None:
        out = numpy.empty_like(grad)
    denom = numpy.add(old_sums, grad * grad if squares is None else squares)
    denom += dtype.type(eps)
    numpy.sqrt(denom, out=denom)
    numpy.divide(grad, denom, out=out)
    out *= -dtype.type(weight * lr)
    return out


class ParameterStore(WindowOwner):
    """A float32 vector of ``n_params`` sharded over ranks ``0..n_servers-1`` of ``comm``; the base of the transports.

    Collective over ``comm`` (which it ``Dup``s): construction, ``free()`` and leaving the ``with`` block.  Every
    other method may be called by any rank at any time, concurrently with the others.
    ``initial`` (float [n_params], needed on hosting ranks only) sets the start values; None means zeros.
    ``n_servers == comm.size`` is allowed (every rank hosts and may push); choosing roles is the trainer's job.
    ``version`` starts the version counter there instead of 0 (a store rebuilt after a rank died continues the
    old numbering, ``asyncsgd.store.rebuild``).

    Leaving a ``with`` block by an exception on a multi-rank store does not free it (``WindowOwner``).
    One object serves one thread of its rank.

    Per-rank statistics of this rank's own calls: ``pushes``, ``push_bytes`` (payload moved by this rank's pushes),
    ``fetches``.
    """

    _NAME = "ParameterStore"   # what messages call the store

    def __init__(self, comm, n_params: int, *, n_servers: int = 1, initial=None, adagrad: bool = False,
                 version: int = 0):
        n_params = _as_count(n_params, "n_params", minimum=1)
        n_servers = _as_count(n_servers, "n_servers", minimum=1)
        if n_servers > comm.size:
            raise ValueError(f"n_servers={n_servers} exceeds the communicator's {comm.size} ranks: host the "
                             f"shards on at most {comm.size} ranks")
        bounds = shard_bounds(n_params, n_servers)
        self._check_bounds(bounds)
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
        self.pushes = 0
        self.push_bytes = 0
        self.fetches = 0
        self._progress = None  # this rank's serving thread (a hosting rank of a multi-rank store), or None

        self._comm = comm.Dup()
        self._own(self._comm)
        rank = self._comm.rank
        self._is_server = rank < n_servers
        shard = None
        if self._is_server:
            start, stop = bounds[rank]
            shard = numpy.zeros(stop - start, DTYPE) if initial is None else numpy.array(initial[start:stop], DTYPE)
        self._open(shard, version)

    # ---------------------------------------------------------------- what a transport implements

    def _check_bounds(self, bounds):
        """Raise ValueError when the transport cannot hold shards of these ``bounds`` (default: it can)."""

    def _open(self, shard, version: int):
        """Create the transport (collective): host ``shard`` (float32, this rank's start values; None on a rank
        that hosts none), set ``self._counter`` (the ``VersionCounter`` interface) starting at ``version``, and
        ``self._progress`` (the thread serving this rank's shard, if any)."""
        raise NotImplementedError

    def _read(self, out: numpy.ndarray) -> numpy.ndarray:
        """Copy every shard into ``out`` (float32 [n_params]); return it."""
        raise NotImplementedError

    def _add(self, update: numpy.ndarray):
        """Add ``update`` (float32 [n_params]) to every shard, each element atomically; complete before returning."""
        raise NotImplementedError

    def _add_sparse(self, idx: numpy.ndarray, vals: numpy.ndarray):
        """Add ``vals`` at sorted unique ``idx``; complete before returning; count the bytes in ``push_bytes``."""
        raise NotImplementedError

    def _replace(self, params: numpy.ndarray, sums: numpy.ndarray | None):
        """Overwrite the parameters (and the Adagrad sums when not None)."""
        raise NotImplementedError

    def _read_own_shard(self, out: numpy.ndarray) -> numpy.ndarray:
        """Copy this rank's shard, with every push completed before the call, into ``out``; return it."""
        raise NotImplementedError

    def _read_sums(self, out: numpy.ndarray) -> numpy.ndarray:
        raise NotImplementedError  # only a transport that keeps Adagrad sums gets here (``_need_adagrad``)

    def _add_adagrad(self, grad, lr: float, eps: float, scale: float):
        raise NotImplementedError

    def _add_adagrad_sparse(self, idx, vals, lr: float, eps: float, scale: float):
        raise NotImplementedError

    def _note_overlap(self, version: int):
        """After a fetch's reads: ``fetch_overlap`` = pushes started by now - ``version``."""
        # Pushes that started before the reads were over: the only ones whose data can be in ``out`` unless counted
        # in ``version``.  This rank's own pushes have all landed (each push lands before it returns).
        self._fetch_overlap = self._counter.started() - version

    def _settle(self):
        """Complete whatever bookkeeping the transport left in flight (default: none)."""

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
        """Whether this rank's serving thread is running (hosts of a multi-rank store, until ``free()``)."""
        return self._progress is not None and self._progress.running

    def stats(self) -> dict:
        """Return this rank's ``{'pushes', 'push_bytes', 'fetches'}``."""
        return {"pushes": self.pushes, "push_bytes": self.push_bytes, "fetches": self.fetches}

    # ---------------------------------------------------------------- reads

    def fetch(self, out: numpy.ndarray) -> int:
        """Copy every shard into ``out`` (float32 [n_params], C-contiguous); return the version it started from.

        The version is the number of pushes landed before the first read: every one of them is wholly inside
        ``out``.  Pass it to the pushes as ``base_version``.  ``fetch_overlap`` afterwards says how many pushes may
        be partly inside ``out`` without being counted in the version (the bound on tau's over-count, see ``push``).
        """
        self._check_alive()
        out = self._buffer(out, "out", writeable=True)
        version = self._counter.landed()
        self._read(out)
        self._note_overlap(version)
        self.fetches += 1
        return version

    @property
    def fetch_overlap(self) -> int:
        """Pushes that had not landed when this rank's last fetch began but had started when its reads ended.

        The only pushes that can be partly inside the fetched parameters yet uncounted in its version: tau of a push
        based on that fetch over-counts by at most this number (0: tau is exact).
        """
        self._settle()
        return self._fetch_overlap

    def version(self) -> int:
        """Return the number of pushes landed so far by all ranks (a valid ``base_version``, like ``fetch``'s)."""
        self._check_alive()
        return self._counter.landed()

    def read_all(self) -> numpy.ndarray:
        """Return a copy of the whole parameter vector (float32 [n_params]); not counted as a fetch."""
        self._check_alive()
        return self._read(numpy.empty(self._n_params, DTYPE))

    def adagrad_sums(self) -> numpy.ndarray:
        """Return a copy of the Adagrad sums of squared gradients (float32 [n_params])."""
        self._check_alive()
        self._need_adagrad("adagrad_sums")
        return self._read_sums(numpy.empty(self._n_params, DTYPE))

    def local_shard(self) -> numpy.ndarray:
        """Return a copy of the shard this rank hosts (float32; empty on a rank that hosts none).

        It holds every push that completed before the call.
        """
        self._check_alive()
        if not self._is_server:
            return numpy.empty(0, DTYPE)
        start, stop = self._bounds[self._comm.rank]
        return self._read_own_shard(numpy.empty(stop - start, DTYPE))

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
        self._add(update)
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
            vals = vals * DTYPE.type(scale)  # ``vals`` stays referenced until the transfers complete
        self._add_sparse(idx, vals)
        self._land_push()
        self.pushes += 1
        return tau

    def push_adagrad(self, grad: numpy.ndarray, lr: float, eps: float, *, base_version: int, weight=None) -> int:
        """Apply an Adagrad step for ``grad`` (float32 [n_params]) at the store; return tau.

        Per element: ``old = sums; sums += g*g`` (atomically), then
        ``params += -lr * weight(tau) * g / sqrt(old + g*g + eps)`` (``adagrad_step``).
        """
        self._check_alive()
        self._need_adagrad("push_adagrad")
        grad = self._buffer(grad, "grad")
        lr, eps = self._rates(lr, eps)
        tau, scale = self._start_push(base_version, weight)
        self._add_adagrad(grad, lr, eps, scale)
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
        self._add_adagrad_sparse(idx, vals, lr, eps, scale)
        self._land_push()
        self.pushes += 1
        return tau

    def load(self, params: numpy.ndarray, adagrad_sums: numpy.ndarray | None = None):
        """Overwrite the parameters (float [n_params]) and, if given, the Adagrad sums; called by one rank.

        Call it while no rank pushes (resuming, before workers start).  The sums are left as they are when
        ``adagrad_sums`` is None.  The version counter is not changed.
        """
        self._check_alive()
        params = self._float_vector(params, "params", self._n_params)
        if adagrad_sums is not None:
            self._need_adagrad("load(adagrad_sums=...)")
            adagrad_sums = self._float_vector(adagrad_sums, "adagrad_sums", self._n_params)
        self._replace(params, adagrad_sums)

    # ---------------------------------------------------------------- lifetime

    def __enter__(self):
        self._check_alive()
        return self

    def _abandon(self):
        # leaving by an exception (WindowOwner): no collective free, only this rank's thread stops
        if self._progress is not None:
            self._progress.stop()

    def abandon(self):
        """Stop using the store without freeing it: no collective (its communicator may hold a dead rank).

        The serving thread stops and every later call raises RuntimeError, as after ``free()``.  What the transport
        allocated stays until MPI_Finalize (``asyncsgd.store.rebuild`` builds a new store on the survivors).
        """
        self._abandon()
        self._freed = True

    # ---------------------------------------------------------------- staleness bookkeeping

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
        """Count this rank's push as landed (its data is complete at every shard)."""
        self._remember_landed(self._counter.land())

    def _remember_landed(self, position: int):
        """Remember where this rank's push fell in the landed count (the last ones only)."""
        self._own_landed.append(position)
        if len(self._own_landed) > 2 * _OWN_HISTORY:
            # Forget the oldest half: a base above every forgotten position still gets an exact own count.
            self._own_floor = self._own_landed[_OWN_HISTORY - 1] + 1
            del self._own_landed[:_OWN_HISTORY]

    # ---------------------------------------------------------------- helpers

    def _scratch(self, count: int):
        """Return ``count`` float32 [n_params] scratch vectors, allocated on first use and kept.

        Fresh full-size arrays on every push would page-fault their way in each time; dense pushes reuse these.
        """
        while len(self._work) < count:
            self._work.append(numpy.empty(self._n_params, DTYPE))
        return self._work[:count]

    def _pieces(self):
        """Yield ``(rank, start, lo, hi)``: every shard's chunks, in global element positions."""
        for rank, (start, stop) in enumerate(self._bounds):
            for lo, hi in chunks(start, stop):
                yield rank, start, lo, hi

    def _check_alive(self):
        if self._freed:
            raise RuntimeError(f"{self._NAME} used after free()")

    def _need_adagrad(self, what: str):
        if not self._adagrad:
            raise ValueError(f"{what} needs the Adagrad sums: build the store with adagrad=True")

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
