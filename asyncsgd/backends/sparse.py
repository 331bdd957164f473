"""Numpy reference of sparse gradient pushes and of the fused per-replica update.

Sparse pushes follow Deep Gradient Compression's error feedback: a worker pushes only the largest-magnitude
``fraction`` of ``accrued + residual`` and keeps everything else in ``residual`` for later pushes, so no gradient is
ever lost, only delayed.  ``asyncsgd.backends.cuda_sparse`` implements the same contracts with CUDA kernels and is tested against
this module.

Contracts (all arrays 1-D and C-contiguous, float32 or float64; ``n`` = vector length):

- ``topk_count(n, fraction) -> k = max(1, ceil(fraction * n))``, at most ``n``.
- ``select_topk(accrued, fraction, residual) -> (idx, values)``: ``idx`` int64 ``(k,)`` sorted ascending,
  ``values`` ``(k,)`` of residual's dtype.  ``residual`` becomes ``v = accrued + residual`` with the chosen entries
  zeroed, so ``residual_after[idx] + values == v`` exactly and ``residual_after + scatter(values) == v`` bit for bit.
- ``select_topk_blocks(accrued, fraction, residual, block) -> (idx, values)``: the same contract, but whole blocks
  of ``block`` consecutive entries are chosen (the ``ceil(k / block)`` of largest L2 norm), so a push's indices
  form a few long runs: the store sends them as one MPI datatype of ``block``-long pieces, which costs the sender
  and the target ``block`` times fewer entries than scattered indices (docs/NETWORK.md).  numpy or CuPy arrays.
- ``scatter_add(dense, idx, values)``: ``dense[idx] += values`` in place; repeated indices are summed.
- ``fused_update(params, grad, lr=..., ...)``: one local step of a replica (momentum, Adagrad, staleness weight).
  The Adagrad step a worker pushes to the store is ``asyncsgd.store.base.adagrad_step``: this update's change of
  the parameters with no momentum, bit for bit.
"""
from __future__ import annotations

import math

import numpy

__all__ = ["topk_count", "select_topk", "select_topk_blocks", "scatter_add", "fused_update"]

# Above this size select_topk estimates the threshold from a sample and partitions only the candidates above it.
_SAMPLE_MIN_N = 1 << 16
_SAMPLE_SIZE = 1 << 14


def check_vector(name, a, dtype=None, n=None, *, xp=numpy):
    """Raise TypeError/ValueError unless ``a`` is a 1-D C-contiguous float32/float64 array of ``xp`` (numpy, or cupy
    for ``asyncsgd.backends.cuda_sparse``), of ``dtype`` and length ``n`` when they are given."""
    module = "numpy" if xp is numpy else "cupy"   # a test's CPU emulation of CuPy has another module name
    if not isinstance(a, xp.ndarray):
        where = "" if xp is numpy else " on the GPU"
        raise TypeError(f"{name} must be a {module}.ndarray{where}, got {type(a).__module__}.{type(a).__name__}")
    if a.dtype not in (numpy.float32, numpy.float64):
        raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
    if dtype is not None and a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {numpy.dtype(dtype)} like the other arrays, got {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) like the parameter vector, got {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (pass {module}.ascontiguousarray({name}))")


def topk_count(n: int, fraction: float) -> int:
    """Return how many entries a push of ``fraction`` of an ``n``-vector sends: ``max(1, ceil(fraction*n))``, <= n."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"sparse fraction must be in (0, 1], got {fraction}")
    if n < 1:
        raise ValueError(f"cannot select from an empty vector (n={n})")
    return min(n, max(1, math.ceil(fraction * n)))


def select_topk(accrued, fraction: float, residual, *, rng=None):
    """Choose the largest-magnitude ``fraction`` of ``accrued + residual``; keep the rest in ``residual``.

    accrued:  (n,) float32/float64, the gradient accrued since the last push (read only).
    residual: (n,) same dtype, updated IN PLACE to ``v = accrued + residual`` with the chosen entries zeroed.
    Returns ``(idx, values)``: idx int64 (k,) sorted ascending, values (k,) = v[idx], k = topk_count(n, fraction).
    Ties at the threshold are broken arbitrarily but exactly k entries are returned.  NaN counts as the largest.
    ``rng`` (numpy Generator) only picks the sample used to estimate the threshold; the result does not depend on it
    except in the order of ties.
    """
    check_vector("accrued", accrued)
    n = accrued.shape[0]
    check_vector("residual", residual, accrued.dtype, n)
    k = topk_count(n, fraction)
    numpy.add(residual, accrued, out=residual)
    v = residual
    if k == n:
        idx = numpy.arange(n, dtype=numpy.int64)
    else:
        idx = _largest_k(numpy.abs(v), k, rng)
    values = v[idx]
    v[idx] = 0
    return idx, values


def select_topk_blocks(accrued, fraction: float, residual, block: int, *, rng=None):
    """Choose whole blocks of ``accrued + residual``; keep the rest in ``residual`` (``select_topk``'s contract).

    The vector is cut into blocks of ``block`` consecutive entries (the last one may be shorter); the
    ``ceil(topk_count(n, fraction) / block)`` blocks of largest sum of squares are chosen whole (NaN counts as the
    largest).  Returns ``(idx, values)``: idx int64 sorted ascending, the entries of the chosen blocks (about
    ``fraction * n``, rounded up to whole blocks), values = v[idx]; ``residual`` becomes ``v`` with them zeroed, so
    ``residual_after + scatter(values) == v`` bit for bit and nothing is lost.  ``block=1`` is ``select_topk``.
    Works on numpy arrays and, with the same code, on CuPy arrays (GPU ranks select where the accrual lives).
    """
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be an int >= 1 (entries per block), got {block!r}")
    xp = _array_module(accrued)
    if xp is numpy:
        check_vector("accrued", accrued)
        check_vector("residual", residual, accrued.dtype, accrued.shape[0])
    if block == 1 and xp is numpy:
        return select_topk(accrued, fraction, residual, rng=rng)
    n = accrued.shape[0]
    k = topk_count(n, fraction)
    n_blocks = -(-n // block)
    kb = min(n_blocks, -(-k // block))
    xp.add(residual, accrued, out=residual)
    v = residual
    if kb == n_blocks:
        idx = xp.arange(n, dtype=xp.int64)
    else:
        full = n // block
        scores = xp.empty(n_blocks, dtype=v.dtype)
        body = v[:full * block].reshape(full, block)
        # einsum: the row sums of squares without a temporary of the whole vector
        scores[:full] = xp.einsum("ij,ij->i", body, body)
        if full < n_blocks:
            tail = v[full * block:]
            scores[full] = xp.dot(tail, tail)
        if xp is numpy:
            chosen = _largest_k(scores, kb, rng)
        else:
            chosen = xp.sort(xp.argpartition(scores, n_blocks - kb)[n_blocks - kb:])
        idx = (chosen[:, None] * block + xp.arange(block, dtype=xp.int64)[None, :]).ravel()
        if full < n_blocks and int(chosen[-1]) == full:
            idx = idx[idx < n]  # the short last block
        idx = idx.astype(xp.int64, copy=False)
    values = v[idx]
    v[idx] = 0
    return idx, values


def _array_module(a):
    """numpy for numpy arrays, else the array's own module (CuPy) found without importing it here."""
    if isinstance(a, numpy.ndarray):
        return numpy
    import importlib
    return importlib.import_module(type(a).__module__.split(".")[0])


def _largest_k(mag, k, rng):
    """Return the sorted int64 indices of the k largest entries of ``mag`` (n,), without sorting all of it.

    Large vectors: a random sample gives a threshold a little below the k-th largest value, so only the few entries
    above it are partitioned; if the sample was unlucky (fewer than k candidates) fall back to a full argpartition.
    """
    n = mag.shape[0]
    if n >= _SAMPLE_MIN_N and k <= n // 4:
        rng = numpy.random.default_rng() if rng is None else rng
        sample = mag[rng.integers(0, n, _SAMPLE_SIZE)]
        # Aim for ~1.5x k candidates plus a few sample standard deviations, so the sample rarely undershoots.
        expected = min(n, 1.5 * k + 4.0 * math.sqrt(k) + 64)
        q = max(0.0, 1.0 - expected / n)
        threshold = numpy.quantile(sample, q)
        candidates = numpy.flatnonzero(mag >= threshold)
        if candidates.shape[0] >= k:
            part = numpy.argpartition(mag[candidates], candidates.shape[0] - k)[candidates.shape[0] - k:]
            idx = candidates[part]
            idx.sort()
            return idx.astype(numpy.int64, copy=False)
    idx = numpy.argpartition(mag, n - k)[n - k:]
    idx.sort()
    return idx.astype(numpy.int64, copy=False)


def _check_indices(idx, values, n, dtype):
    if not isinstance(idx, numpy.ndarray) or idx.dtype.kind not in "iu":
        raise TypeError(f"idx must be an integer numpy array, got {getattr(idx, 'dtype', type(idx).__name__)}")
    if not isinstance(values, numpy.ndarray) or values.dtype != dtype:
        raise TypeError(f"values must be a numpy array of dtype {dtype} like dense, "
                        f"got {getattr(values, 'dtype', type(values).__name__)}")
    if idx.ndim != 1 or values.shape != idx.shape:
        raise ValueError(f"idx and values must be 1-D of equal length, got {idx.shape} and {values.shape}")
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"idx must lie in [0, {n}), got range [{int(idx.min())}, {int(idx.max())}]")


def scatter_add(dense, idx, values):
    """Add ``values`` (m,) at positions ``idx`` (m,) of ``dense`` (n,) in place: ``dense[idx] += values``.

    Repeated indices are summed (numpy.add.at semantics); select_topk's indices are unique.
    """
    check_vector("dense", dense)
    _check_indices(idx, values, dense.shape[0], dense.dtype)
    numpy.add.at(dense, idx, values)


def fused_update(params, grad, *, lr: float, momentum: float = 0.0, velocity=None, weight: float = 1.0,
                 sum_sq=None, eps: float = 1e-8, accrued=None):
    """Apply one local update of a replica to ``params`` in place, in the order a fused kernel does it.

    All arrays are (n,) of one float dtype; ``velocity``, ``sum_sq`` and ``accrued`` are optional and updated in place.
        d = grad                                             (plain SGD direction)
        if sum_sq is given (Adagrad):  sum_sq += grad*grad;  d = grad / sqrt(sum_sq + eps)
        if velocity is given (momentum):  velocity = momentum*velocity + d;  d = velocity
        params -= (weight*lr) * d                            (weight: staleness decay, 1.0 = none)
        if accrued is given:  accrued += d                   (what a later push replays with the same lr)
    Scalars are rounded to the arrays' dtype first (``weight*lr`` as one scalar), so a kernel that performs the
    same operations without fused multiply-adds reproduces this bit for bit.
    """
    check_vector("params", params)
    n, dtype = params.shape[0], params.dtype
    for name, a in (("grad", grad), ("velocity", velocity), ("sum_sq", sum_sq), ("accrued", accrued)):
        if a is not None:
            check_vector(name, a, dtype, n)
    if velocity is None and momentum != 0.0:
        raise ValueError("momentum != 0 needs a velocity array to keep between steps")
    if lr < 0 or weight < 0 or eps < 0:
        raise ValueError(f"lr, weight and eps must be >= 0, got lr={lr}, weight={weight}, eps={eps}")
    step_scale = dtype.type(weight * lr)
    d = grad
    if sum_sq is not None:
        sum_sq += grad * grad
        d = grad / numpy.sqrt(sum_sq + dtype.type(eps))
    if velocity is not None:
        velocity *= dtype.type(momentum)
        velocity += d
        d = velocity
    params -= step_scale * d
    if accrued is not None:
        accrued += d
