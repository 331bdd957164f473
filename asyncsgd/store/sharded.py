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
with it.  Hosting ranks run a ``ProgressThread`` (``asyncsgd.rma.progress_thread`` has the measurements behind it).

``poll_s`` (None by default): when set, ``fetch``, ``push`` and ``push_sparse`` issue request-based operations
(``Rget``/``Raccumulate``) and test them every ``poll_s`` seconds, sleeping in between, before the ``Flush``: MPICH
spins a core inside a blocking ``Flush`` for as long as the data travels, which a worker's communication thread
(``--overlap``) would take from the compute beside it.

The interface, the argument checks and the staleness bookkeeping are ``asyncsgd.store.base.ParameterStore``'s.
Staleness (``ParameterStore.push`` states it exactly): tau counts the other workers' pushes that started before this push and had
not landed when this worker's fetch began, measured with two counters on rank 0 (``VersionCounter``): ``started``
(taken before a push's data moves, so the staleness weight is known before the data moves) and ``landed`` (bumped
after the push's ``Flush``).  Origin buffers of every RMA call stay referenced until the ``Flush`` that completes it.
"""
from __future__ import annotations

import time

import numpy
from mpi4py import MPI

from asyncsgd.rma.counter import VersionCounter
from asyncsgd.rma.progress_thread import ProgressThread
from asyncsgd.runtime.mpi import polled_barrier
from asyncsgd.store.base import DTYPE, ParameterStore, adagrad_step, chunks, shard_bounds

__all__ = ["ShardedParameters", "shard_bounds"]

_MPI_DTYPE = MPI.FLOAT
_MAX_SHARD = (1 << 31) - 1  # elements: indexed datatypes take C int displacements
_INDEX_BYTES = 4  # one displacement of an indexed datatype, as an MPI implementation ships it


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


class ShardedParameters(ParameterStore):
    """A ``ParameterStore`` whose shards live in MPI RMA windows on ranks ``0..n_servers-1`` (see module).

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

    _NAME = "ShardedParameters"

    def __init__(self, comm, n_params: int, *, n_servers: int = 1, initial=None, adagrad: bool = False,
                 version: int = 0):
        self.poll_s = None  # seconds between tests of request-based transfers; None: blocking Flush
        super().__init__(comm, n_params, n_servers=n_servers, initial=initial, adagrad=adagrad, version=version)

    def _check_bounds(self, bounds):
        if bounds[0][1] > _MAX_SHARD:
            n_params = bounds[-1][1]
            raise ValueError(f"a shard of {bounds[0][1]} parameters is too big for MPI's int displacements of "
                             f"sparse pushes: use at least {-(-n_params // _MAX_SHARD)} servers")

    def _open(self, shard, version: int):
        rank = self._comm.rank
        nbytes = 0 if shard is None else shard.nbytes
        self._params = MPI.Win.Allocate(nbytes, DTYPE.itemsize, comm=self._comm)
        self._sums = MPI.Win.Allocate(nbytes, DTYPE.itemsize, comm=self._comm) if self._adagrad else None
        if shard is not None:
            self._init_local(self._params, rank, shard)
            if self._sums is not None:
                self._init_local(self._sums, rank, numpy.zeros(shard.size, DTYPE))
        self._counter = VersionCounter(self._comm, root=0, initial=version)  # its barrier also publishes the shard initialisation
        for win in self._windows():
            win.Lock_all(MPI.MODE_NOCHECK)  # shared epochs only, never an exclusive lock: NOCHECK is valid

        # Every rank Dups (collective); only hosts poll.  A lone rank has no peers to serve.
        self._progress_comm = self._comm.Dup()
        if self._is_server and self._comm.size > 1:
            self._progress = ProgressThread(self._progress_comm).start()

    # ---------------------------------------------------------------- transfers

    def _read(self, out: numpy.ndarray) -> numpy.ndarray:
        return self._get_all(self._params, out)

    def _read_sums(self, out: numpy.ndarray) -> numpy.ndarray:
        return self._get_all(self._sums, out)

    def _add(self, update: numpy.ndarray):
        win = self._params
        requests = []
        for rank, start, lo, hi in self._pieces():
            target = (lo - start, hi - lo, _MPI_DTYPE)
            if self.poll_s is None:
                win.Accumulate([update[lo:hi], _MPI_DTYPE], rank, target, MPI.SUM)
            else:
                requests.append(win.Raccumulate([update[lo:hi], _MPI_DTYPE], rank, target, MPI.SUM))
        self._sleep_until_done(requests)
        self._flush(win)  # ``update`` (possibly scratch) is referenced until here

    def _add_sparse(self, idx: numpy.ndarray, vals: numpy.ndarray):
        win = self._params
        issued = []  # (rank, datatype): every shard's transfer is issued before any is waited for
        requests = []
        for rank, disp, part in self._split(idx, vals):
            for lo, hi in chunks(0, disp.size):
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

    def _add_adagrad(self, grad, lr: float, eps: float, scale: float):
        """Per element: ``old = sums; sums += g*g`` (atomic ``Get_accumulate``), then ``params += adagrad_step``."""
        squares, old, step = self._scratch(3)
        numpy.multiply(grad, grad, out=squares)
        for rank, (start, stop) in enumerate(self._bounds):
            for lo, hi in chunks(start, stop):
                self._sums.Get_accumulate([squares[lo:hi], _MPI_DTYPE], [old[lo:hi], _MPI_DTYPE], rank,
                                          (lo - start, hi - lo, _MPI_DTYPE), MPI.SUM)
            self._sums.Flush(rank)
            piece = slice(start, stop)
            adagrad_step(grad[piece], old[piece], lr, eps, scale, squares=squares[piece], out=step[piece])
            for lo, hi in chunks(start, stop):
                self._params.Accumulate([step[lo:hi], _MPI_DTYPE], rank, (lo - start, hi - lo, _MPI_DTYPE),
                                        MPI.SUM)
        self._flush(self._params)

    def _add_adagrad_sparse(self, idx, vals, lr: float, eps: float, scale: float):
        for rank, disp, grad in self._split(idx, vals):
            for lo, hi in chunks(0, disp.size):
                g = grad[lo:hi]
                squares = g * g
                old = numpy.empty_like(g)
                dtype, desc_bytes = _indexed_type(disp[lo:hi])
                self._sums.Get_accumulate([squares, _MPI_DTYPE], [old, _MPI_DTYPE], rank, (0, 1, dtype), MPI.SUM)
                self._sums.Flush(rank)
                step = adagrad_step(g, old, lr, eps, scale, squares=squares)
                self._params.Accumulate([step, _MPI_DTYPE], rank, (0, 1, dtype), MPI.SUM)
                self._params.Flush(rank)  # squares, old and step are referenced until here
                dtype.Free()
                self.push_bytes += 3 * g.nbytes + 2 * desc_bytes

    def _replace(self, params: numpy.ndarray, sums: numpy.ndarray | None):
        # ``Accumulate(REPLACE)``: call it while no rank pushes, since REPLACE racing with SUM is outside the
        # window's default ``accumulate_ops`` (same_op_no_op)
        targets = [(self._params, params)] + ([] if sums is None else [(self._sums, sums)])
        for win, values in targets:
            for rank, start, lo, hi in self._pieces():
                win.Accumulate([values[lo:hi], _MPI_DTYPE], rank, (lo - start, hi - lo, _MPI_DTYPE), MPI.REPLACE)
            self._flush(win)

    def _read_own_shard(self, out: numpy.ndarray) -> numpy.ndarray:
        # A ``Get`` from this rank's own window, flushed: it holds every push that completed before the call.
        rank = self._comm.rank
        for lo, hi in chunks(0, out.size):
            self._params.Get([out[lo:hi], _MPI_DTYPE], rank, (lo, hi - lo, _MPI_DTYPE))
        self._params.Flush(rank)
        return out

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

    def __repr__(self):
        state = "freed" if self._freed else f"version={self._counter.landed()}"
        return (f"ShardedParameters(n_params={self._n_params}, n_servers={self.n_servers}, "
                f"adagrad={self._adagrad}, {state})")

    # ---------------------------------------------------------------- helpers

    def _windows(self):
        return [w for w in (self._params, self._sums) if w is not None]

    @staticmethod
    def _init_local(win, rank: int, values: numpy.ndarray):
        """Write this rank's own shard through RMA in an exclusive epoch (window memory starts undefined)."""
        win.Lock(rank, MPI.LOCK_EXCLUSIVE)
        for lo, hi in chunks(0, values.size):
            win.Put([values[lo:hi], _MPI_DTYPE], rank, (lo, hi - lo, _MPI_DTYPE))
        win.Unlock(rank)

    def _get_all(self, win, out: numpy.ndarray) -> numpy.ndarray:
        if self.poll_s is not None:
            self._sleep_until_done([win.Rget([out[lo:hi], _MPI_DTYPE], rank, (lo - start, hi - lo, _MPI_DTYPE))
                                    for rank, start, lo, hi in self._pieces()])
        for rank, (start, stop) in enumerate(self._bounds):
            if self.poll_s is None:
                for lo, hi in chunks(start, stop):
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
