"""Sparse pushes and the fused local update on CuPy arrays, with the kernels of ``kernels/sparse.cu``/``update.cu``.

Same contracts as the numpy reference ``asyncsgd.backends.sparse`` (read its docstring), on cupy arrays:

- ``select_topk(accrued, fraction, residual, tolerance=0.0) -> (idx, values)``: idx int64 sorted ascending.
  ``tolerance=0`` returns exactly ``k = topk_count(n, fraction)`` entries, the k largest in magnitude (ties at the
  threshold taken in index order); ``tolerance > 0`` may return up to ``k + floor(tolerance*k)`` entries, all at least
  as large as every entry left behind, and usually needs fewer passes.  ``residual`` is updated in place as in the
  reference: ``residual_after + scatter(idx, values) == accrued + residual_before`` bit for bit.
- ``scatter_add(dense, idx, values)`` and ``fused_update(params, grad, lr=..., ...)`` as in the reference.

Selection never sorts the vector.  Magnitudes are compared as integer keys (the bits of |v|; their integer order is
the value order), a random sample of keys gives a first bracket for the k-th largest key, and every pass of
``count_at_least`` counts the keys above up to 16 probe thresholds at once, shrinking the bracket at least 17-fold
(bisection with 16 probes per pass instead of one; a float32 bracket is exact after at most 8 passes).  Then a
block prefix sum compacts the chosen entries in index order and zeroes them in the residual.

``find_threshold`` is the pure-Python driver of that search, tested on the CPU with a numpy counter.
"""
from __future__ import annotations

import math

import numpy

from asyncsgd.backends import device as _device
from asyncsgd.backends import cuda_kernels as kernels
from asyncsgd.backends.sparse import check_vector, topk_count

__all__ = ["select_topk", "scatter_add", "fused_update", "find_threshold", "key_dtype", "KEY_END"]

N_PROBES = 16            # probe thresholds per counting pass (<= MAX_PROBES in sparse.cu)
SAMPLE_SIZE = 4096       # keys sampled to place the first probes
COMPACT_BLOCK = 256      # must match sparse.cu
COMPACT_TILE = 256 * 8   # COMPACT_BLOCK * COMPACT_ITEMS in sparse.cu
_COUNT_MAX_BLOCKS = 2048

# Keys of float32 are uint32 below 2**31, of float64 uint64 below 2**63 (the sign bit is cleared); KEY_END is one
# past the largest key, a threshold no key reaches.
KEY_END = {numpy.dtype(numpy.float32): 1 << 31, numpy.dtype(numpy.float64): 1 << 63}
_KEY_DTYPE = {numpy.dtype(numpy.float32): numpy.dtype(numpy.uint32),
              numpy.dtype(numpy.float64): numpy.dtype(numpy.uint64)}
_SIGN_MASK = {numpy.dtype(numpy.float32): 0x7FFFFFFF, numpy.dtype(numpy.float64): 0x7FFFFFFFFFFFFFFF}


def key_dtype(dtype) -> numpy.dtype:
    """Return the unsigned integer dtype of the magnitude keys of float ``dtype``."""
    return _KEY_DTYPE[numpy.dtype(dtype)]


def magnitude_keys(v, xp=numpy):
    """Return the keys of ``v`` (any shape, float32/float64): the bits of |v| as unsigned integers (NaN largest)."""
    dtype = numpy.dtype(v.dtype)
    kd = key_dtype(dtype)
    return xp.ascontiguousarray(v).view(kd) & kd.type(_SIGN_MASK[dtype])


# ------------------------------------------------------------------ the threshold search (no CuPy needed)

def _initial_probes(sample_sorted, n: int, k: int, n_probes: int):
    """Return up to ``n_probes`` sorted keys around the sample's estimate of the k-th largest key."""
    m = len(sample_sorted)
    if m == 0:
        return []
    f = k / n
    target = m * (1.0 - f)                               # sample rank of the k-th largest key (from the bottom)
    spread = 3.0 * math.sqrt(m * f * (1.0 - f)) + 2.0    # a few binomial standard deviations
    ranks = numpy.linspace(target - spread, target + spread, n_probes)
    ranks = numpy.clip(numpy.round(ranks), 0, m - 1).astype(numpy.int64)
    return sorted({int(sample_sorted[r]) for r in ranks})


def find_threshold(count_at_least, sample_sorted, n: int, k: int, slack: int, key_end: int,
                   n_probes: int = N_PROBES):
    """Return ``(t_lo, t_hi, allowed, total)`` such that choosing every key >= t_hi plus the first ``allowed`` keys in
    [t_lo, t_hi) (in index order) chooses ``total`` of the largest keys, ``k <= total <= k + slack``.

    ``count_at_least(probes)`` takes a sorted list of distinct int thresholds and returns the list of
    ``count(key >= probe)``; ``sample_sorted`` is an ascending sequence of sampled keys (may be empty);
    ``n`` keys in all, ``1 <= k <= n``; every key is < ``key_end``.
    Either ``t_lo == t_hi`` (all keys >= t_lo, no ties to break, ``total = count(key >= t_lo)``) or
    ``t_hi == t_lo + 1`` (the band holds the ties at the k-th largest key, ``total == k``).
    """
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, n={n}], got {k}")
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    # Invariant: count(>= lo) = c_lo >= k > count(>= hi) = c_hi.
    lo, c_lo, hi, c_hi = 0, n, key_end, 0
    probes = _initial_probes(sample_sorted, n, k, n_probes)
    while True:
        probes = sorted({p for p in probes if lo < p < hi})
        if probes:
            counts = count_at_least(probes)
            for p, c in zip(probes, counts):
                if c >= k:
                    lo, c_lo = p, c                      # probes ascend: the last one counting >= k is the best lo
                else:
                    hi, c_hi = p, c
                    break                                # the first one counting < k is the best hi
        if c_lo <= k + slack:
            return lo, lo, 0, c_lo
        if hi - lo == 1:
            return lo, hi, k - c_hi, k
        step = hi - lo
        probes = [lo + step * j // (n_probes + 1) for j in range(1, n_probes + 1)]


# ------------------------------------------------------------------ input checks

def _cupy():
    cupy = _device.import_cupy()
    if cupy is None:
        raise RuntimeError("asyncsgd.backends needs CuPy (pip install 'asyncsgd[gpu]'); use --device cpu without it")
    return cupy


# ------------------------------------------------------------------ selection

def _gpu_counter(cupy, residual, n):
    """Return count_at_least(probes) for find_threshold, running the count_at_least kernel over ``residual``."""
    dtype = residual.dtype
    kd = key_dtype(dtype)
    kern = kernels.kernel("sparse", "count_at_least", dtype)
    blocks = min(_COUNT_MAX_BLOCKS, kernels.launch_blocks(n))

    def count_at_least(probes):
        probes_d = cupy.asarray(numpy.asarray(probes, dtype=kd))
        hist = cupy.zeros(len(probes), dtype=cupy.uint64)
        kern((blocks,), (kernels.THREADS,), (residual, numpy.int64(n), probes_d, numpy.int32(len(probes)), hist))
        h = hist.get().astype(numpy.int64)
        return [int(c) for c in numpy.cumsum(h[::-1])[::-1]]      # count(key >= probe j) = sum of bins j..end

    return count_at_least


def select_topk(accrued, fraction: float, residual, *, tolerance: float = 0.0, sample_size: int = SAMPLE_SIZE):
    """Choose the largest-magnitude ``fraction`` of ``accrued + residual`` on the GPU; keep the rest in ``residual``.

    accrued, residual: (n,) cupy float32/float64, C-contiguous; residual is updated in place (see the module doc).
    Returns ``(idx, values)`` cupy arrays: idx int64 (m,) ascending, values (m,) = (accrued + residual)[idx], with
    ``m == k`` when ``tolerance == 0`` and ``k <= m <= k + floor(tolerance*k)`` otherwise.
    """
    cupy = _cupy()
    check_vector("accrued", accrued, xp=cupy)
    n = accrued.shape[0]
    check_vector("residual", residual, accrued.dtype, n, xp=cupy)
    if not 0.0 <= tolerance:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    k = topk_count(n, fraction)
    dtype = residual.dtype
    residual += accrued                         # v = accrued + residual, rounded as numpy.add rounds
    if k == n:
        idx = cupy.arange(n, dtype=cupy.int64)
        values = residual.copy()
        residual.fill(0)
        return idx, values
    m = min(n, int(sample_size))
    sample = magnitude_keys(residual[cupy.random.randint(0, n, m)], cupy) if m > 0 else cupy.empty(0)
    sample_sorted = numpy.sort(cupy.asnumpy(sample))
    t_lo, t_hi, allowed, total = find_threshold(_gpu_counter(cupy, residual, n), sample_sorted, n, k,
                                                int(math.floor(tolerance * k)), KEY_END[numpy.dtype(dtype)])
    kd = key_dtype(dtype).type
    blocks = -(-n // COMPACT_TILE)
    above = cupy.empty(blocks, dtype=cupy.int64)
    band = cupy.empty(blocks, dtype=cupy.int64)
    kernels.kernel("sparse", "band_counts", dtype)(
        (blocks,), (COMPACT_BLOCK,), (residual, numpy.int64(n), kd(t_lo), kd(t_hi), above, band))
    above_before = cupy.cumsum(above) - above
    band_before = cupy.cumsum(band) - band
    idx = cupy.empty(total, dtype=cupy.int64)
    values = cupy.empty(total, dtype=dtype)
    kernels.kernel("sparse", "compact", dtype)(
        (blocks,), (COMPACT_BLOCK,),
        (residual, numpy.int64(n), kd(t_lo), kd(t_hi), numpy.int64(allowed), above_before, band_before, idx, values))
    return idx, values


def scatter_add(dense, idx, values, *, check_bounds: bool = True):
    """Add ``values`` (m,) at ``idx`` (m,) of ``dense`` (n,) in place on the GPU; repeated indices are summed.

    dense/values: cupy float32/float64 of one dtype; idx: cupy int64, C-contiguous.  ``check_bounds`` verifies
    ``0 <= idx < n`` first (one small reduction and a synchronisation); the kernel never writes outside dense.
    """
    cupy = _cupy()
    check_vector("dense", dense, xp=cupy)
    check_vector("values", values, dense.dtype, xp=cupy)
    if not isinstance(idx, cupy.ndarray) or idx.dtype != numpy.int64:
        raise TypeError(f"idx must be a cupy int64 array, got {getattr(idx, 'dtype', type(idx).__name__)}")
    if idx.shape != values.shape or not idx.flags.c_contiguous:
        raise ValueError(f"idx must be C-contiguous with the shape of values {values.shape}, got {idx.shape}")
    m, n = idx.shape[0], dense.shape[0]
    if m == 0:
        return dense
    if check_bounds:
        lo, hi = (int(x) for x in cupy.stack([idx.min(), idx.max()]).get())
        if lo < 0 or hi >= n:
            raise ValueError(f"idx must lie in [0, {n}), got range [{lo}, {hi}]")
    kernels.kernel("sparse", "scatter_add", dense.dtype)(
        (kernels.launch_blocks(m),), (kernels.THREADS,), (dense, numpy.int64(n), idx, values, numpy.int64(m)))
    return dense


# ------------------------------------------------------------------ fused update

_ADAGRAD, _MOMENTUM, _ACCRUE = 1, 2, 4    # flags of update.cu


def fused_update(params, grad, *, lr: float, momentum: float = 0.0, velocity=None, weight: float = 1.0,
                 sum_sq=None, eps: float = 1e-8, accrued=None):
    """Apply one local update in place with one kernel; the contract of ``asyncsgd.backends.sparse.fused_update``.

    All arrays (n,) cupy of one float dtype, C-contiguous; velocity, sum_sq and accrued optional.
    """
    cupy = _cupy()
    check_vector("params", params, xp=cupy)
    n, dtype = params.shape[0], params.dtype
    check_vector("grad", grad, dtype, n, xp=cupy)
    flags = 0
    for name, a, flag in (("velocity", velocity, _MOMENTUM), ("sum_sq", sum_sq, _ADAGRAD),
                          ("accrued", accrued, _ACCRUE)):
        if a is not None:
            check_vector(name, a, dtype, n, xp=cupy)
            flags |= flag
    if velocity is None and momentum != 0.0:
        raise ValueError("momentum != 0 needs a velocity array to keep between steps")
    if lr < 0 or weight < 0 or eps < 0:
        raise ValueError(f"lr, weight and eps must be >= 0, got lr={lr}, weight={weight}, eps={eps}")
    t = numpy.dtype(dtype).type
    unused = grad                               # any valid pointer for disabled arrays; the kernel never reads it
    kernels.kernel("update", "fused_update", dtype)(
        (kernels.launch_blocks(n),), (kernels.THREADS,),
        (params, grad, unused if velocity is None else velocity, unused if sum_sq is None else sum_sq,
         unused if accrued is None else accrued, numpy.int64(n), t(weight * lr), t(momentum), t(eps),
         numpy.int32(flags)))
